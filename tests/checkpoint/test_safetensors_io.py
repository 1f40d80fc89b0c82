"""The streaming safetensors writer against safetensors' own reader and writer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from megablocks_ablate.checkpoint import MappedSafetensors, SafetensorsStreamWriter


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "a.weight": torch.randn(7, generator=g),
        "steps": torch.arange(4, dtype=torch.int64),
        "empty": torch.zeros(0),
    }


def test_stream_writer_matches_safetensors(tmp_path):
    tensors = _tensors()
    path = tmp_path / "stream.safetensors"
    with open(path, "wb") as f:
        w = SafetensorsStreamWriter(f, [(n, t.dtype, list(t.shape)) for n, t in tensors.items()])
        assert w.order == ["steps", "a.weight", "empty", "b.weight"]  # widest dtype first
        for name in w.order:
            flat = tensors[name].reshape(-1)
            for start in range(0, flat.numel(), 3):  # in chunks, as a streaming merge does
                w.write(flat[start : start + 3])
        w.close()
    ours = load_file(path)
    assert set(ours) == set(tensors)
    for name, t in tensors.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t)
    # and our zero-copy reader reads what safetensors wrote
    save_file(tensors, tmp_path / "ref.safetensors")
    mapped = MappedSafetensors(str(tmp_path / "ref.safetensors"))
    for name, t in tensors.items():
        assert torch.equal(mapped.tensor(name), t)
        if t.numel():
            assert torch.equal(mapped.flat(name, 1, t.numel() - 1), t.reshape(-1)[1:])


def test_stream_writer_refuses_short_or_long_data(tmp_path):
    with open(tmp_path / "x.safetensors", "wb") as f:
        w = SafetensorsStreamWriter(f, [("x", torch.float32, [4])])
        w.write(torch.zeros(3))
        with pytest.raises(ValueError, match="incomplete: 12 of 16 bytes"):
            w.close()
        with pytest.raises(ValueError, match="more tensor data"):
            w.write(torch.zeros(2))
