"""One header validator for every reader of weights (docs/reliability.md "Verify every
byte trusted"): the merge's memory-mapping reader refuses exactly what safetensors'
own reader (used by eval and train) refuses, naming the file and the tensor."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megablocks_ablate.checkpoint import (
    Lineage,
    MappedSafetensors,
    load_model_checkpoint,
    safetensors_header,
    save_model_checkpoint,
)
from megablocks_ablate.errors import DataFormatError


def _write(path, header: dict, data: bytes) -> str:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def _entry(begin: int, end: int, shape=None, dtype="F32") -> dict:
    return {"dtype": dtype, "shape": shape or [(end - begin) // 4], "data_offsets": [begin, end]}


# name -> (header, data, what the error says); each is also refused by safetensors itself
BAD = {
    "overlap": (
        {"a": _entry(0, 16), "b": _entry(8, 24)},
        bytes(24),
        r"tensor 'b' starts at byte 8 .* overlaps tensor 'a'",
    ),
    "alias": (  # two names for the same bytes
        {"a": _entry(0, 16), "b": _entry(0, 16)},
        bytes(16),
        r"tensor '[ab]' starts at byte 0 .* overlaps",
    ),
    "gap": (
        {"a": _entry(0, 8), "b": _entry(12, 20)},
        bytes(20),
        r"tensor 'b' .* leaves a gap: bytes 8-12",
    ),
    "not from 0": ({"a": _entry(4, 12)}, bytes(12), r"tensor 'a' starts at byte 4 .* gap"),
    "trailing bytes": ({"a": _entry(0, 8)}, bytes(12), r"4 bytes after the end of the last"),
    "truncated": ({"a": _entry(0, 8), "b": _entry(8, 16)}, bytes(12), r"truncated: tensor 'b'"),
    "span vs shape": (
        {"a": _entry(0, 12, shape=[2])},
        bytes(12),
        r"tensor 'a': data_offsets span 12 bytes, F32 \[2\] needs 8",
    ),
    "unknown dtype": ({"a": _entry(0, 8, dtype="Q7")}, bytes(8), r"tensor 'a': unknown dtype"),
    "negative dim": (
        {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}},
        b"",
        r"tensor 'a': shape is not a list of non-negative integers",
    ),
    "float dim": (
        {"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}},
        bytes(8),
        r"tensor 'a': shape",
    ),
    "offsets reversed": (
        {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}},
        bytes(8),
        r"tensor 'a': data_offsets is not \[begin, end\]",
    ),
    "offsets missing": (
        {"a": {"dtype": "F32", "shape": [2]}},
        bytes(8),
        r"tensor 'a': data_offsets",
    ),
    "entry not an object": ({"a": [1, 2]}, b"", r"tensor 'a': header entry is not an object"),
    "not an object": ([1, 2], b"", r"not a JSON object"),
    "metadata": (
        {"__metadata__": {"format": 1}, "a": _entry(0, 8)},
        bytes(8),
        r"__metadata__ must map strings to strings",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_reader_refuses_the_same_headers(tmp_path, case):
    header, data, message = BAD[case]
    path = _write(tmp_path / "model.safetensors", header, data)
    for read in (safetensors_header, MappedSafetensors):
        with pytest.raises(DataFormatError, match=message) as exc:
            read(path)
        assert str(exc.value).startswith(path)
    with pytest.raises(Exception):  # noqa: B017 (safetensors' own error types)
        with safe_open(path, framework="pt") as f:
            for k in f.keys():  # noqa: SIM118
                f.get_tensor(k)


def test_header_length_is_bounded(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(DataFormatError, match=r"header length 1099511627776, file size 10"):
        safetensors_header(str(path))
    path.write_bytes(b"\x01\x00")
    with pytest.raises(DataFormatError, match=r"truncated safetensors file \(2 bytes\)"):
        MappedSafetensors(str(path))


def test_valid_files_pass_including_empty_tensors(tmp_path):
    tensors = {
        "w": torch.arange(6, dtype=torch.float32).view(2, 3),
        "e": torch.zeros(0, 4),
        "i": torch.arange(3, dtype=torch.int64),
        "u": torch.arange(5, dtype=torch.int32).to(torch.uint16),
    }
    save_file(tensors, tmp_path / "ok.safetensors", metadata={"format": "pt"})
    m = MappedSafetensors(str(tmp_path / "ok.safetensors"))
    for name, t in tensors.items():
        assert m.tensor(name).dtype == t.dtype
        assert torch.equal(m.tensor(name).to(torch.int64), t.to(torch.int64))
    # no tensors at all: an empty data section is exact
    path = _write(tmp_path / "none.safetensors", {"__metadata__": {"a": "b"}}, b"")
    assert safetensors_header(path) == {"__metadata__": {"a": "b"}}


def test_overlapping_checkpoint_is_refused_by_eval_and_merge_alike(tmp_path):
    from megablocks_ablate.merge.file_merge import merge_checkpoints
    from megablocks_ablate.merge.spec import MergeSpec

    dirs = {}
    for unit in ("a", "b"):
        d = str(tmp_path / unit)
        lineage = Lineage(
            kind="unit", units=[unit], weights=[1.0], seed_hash="0" * 64, tokens_seen=10
        )
        save_model_checkpoint(d, {"x": torch.ones(4), "y": torch.ones(4)}, {"v": 1}, lineage)
        dirs[unit] = d
    # b's tensors alias each other's bytes (the same file size: only the header lies)
    path = os.path.join(dirs["b"], "model.safetensors")
    header = safetensors_header(path)
    del header["__metadata__"]
    header["y"]["data_offsets"] = header["x"]["data_offsets"]
    _write(path, header, bytes(32))
    want = rf"{path}: tensor '[xy]' starts at byte 0 .* overlaps"
    with pytest.raises(DataFormatError, match=want):
        load_model_checkpoint(dirs["b"])
    spec = MergeSpec.from_dict({"checkpoints": dirs, "uniform": ["a", "b"]})
    with pytest.raises(DataFormatError, match=want):
        merge_checkpoints(spec, str(tmp_path / "out"), show_progress=False)
    assert not os.path.exists(tmp_path / "out")
