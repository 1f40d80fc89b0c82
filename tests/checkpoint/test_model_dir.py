"""Model checkpoint I/O: round trip, atomic replacement, and errors that name the file."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megablocks_ablate.checkpoint import (
    Lineage,
    load_model_checkpoint,
    map_model_weights,
    model_hash,
    read_checkpoint_meta,
    save_model_checkpoint,
)
from megablocks_ablate.errors import ConfigError, DataFormatError
from megablocks_ablate.utils.hashing import sha256_file


def _state():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(11, 4, generator=g)
    return {
        "embed.weight": emb,
        "lm_head.weight": emb,  # tied: shares storage with the embedding
        "norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, generator=g).to(torch.float16),
        "count": torch.tensor([7], dtype=torch.int64),
    }


def _lineage(**kw):
    base = dict(
        kind="unit",
        seed_hash="ab" * 32,
        units=["cs_0"],
        weights=[1.0],
        tokens_seen=1000,
        tokenizer_fingerprint="tok123",
        parents=[],
        extra={"lr": 1e-4},
    )
    base.update(kw)
    return Lineage(**base)


def test_round_trip(tmp_path):
    d = str(tmp_path / "ckpt")
    state, cfg, lin = _state(), {"hidden_size": 4, "name": "tiny"}, _lineage()
    save_model_checkpoint(d, state, cfg, lin)
    assert sorted(os.listdir(d)) == ["config.json", "lineage.json", "model.safetensors"]
    got, got_cfg, got_lin = load_model_checkpoint(d)
    assert got_cfg == cfg and got_lin == lin
    assert set(got) == set(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert read_checkpoint_meta(d) == (cfg, lin)
    assert model_hash(d) == sha256_file(os.path.join(d, "model.safetensors"))
    mapped = map_model_weights(d)
    assert set(mapped) == set(state)
    for k, v in state.items():
        assert torch.equal(mapped[k], v), k


def test_replace_existing_is_clean(tmp_path):
    d = str(tmp_path / "ckpt")
    save_model_checkpoint(d, {"w": torch.zeros(2)}, {"v": 1}, _lineage())
    save_model_checkpoint(d, {"w": torch.ones(3)}, {"v": 2}, _lineage(tokens_seen=5))
    state, cfg, lin = load_model_checkpoint(d)
    assert torch.equal(state["w"], torch.ones(3)) and cfg == {"v": 2} and lin.tokens_seen == 5
    assert os.listdir(tmp_path) == ["ckpt"]  # no temp or backup directory left behind


def test_failed_save_keeps_old_checkpoint(tmp_path):
    d = str(tmp_path / "ckpt")
    save_model_checkpoint(d, {"w": torch.zeros(2)}, {"v": 1}, _lineage())
    with pytest.raises(TypeError):
        save_model_checkpoint(d, {"w": "not a tensor"}, {"v": 2}, _lineage())
    assert read_checkpoint_meta(d)[0] == {"v": 1}
    assert os.listdir(tmp_path) == ["ckpt"]


def test_lineage_validation_names_field():
    with pytest.raises(DataFormatError, match="kind"):
        Lineage(kind="bogus")
    with pytest.raises(DataFormatError, match="weights"):
        Lineage(kind="merged", units=["a", "b"], weights=[1.0])
    with pytest.raises(DataFormatError, match="weights"):
        Lineage(kind="merged", units=["a"], weights=[float("nan")])
    with pytest.raises(DataFormatError, match="tokens_seen"):
        Lineage(kind="seed", tokens_seen=-1)
    assert Lineage.from_dict(_lineage().to_dict()) == _lineage()


@pytest.mark.parametrize(
    "problem",
    [
        "missing_dir",
        "missing_model",
        "missing_lineage",
        "bad_json",
        "bad_lineage",
        "truncated",
        "garbage",
    ],
)
def test_errors_name_the_file(tmp_path, problem):
    d = str(tmp_path / "ckpt")
    save_model_checkpoint(d, {"w": torch.randn(1000)}, {"v": 1}, _lineage())
    model = os.path.join(d, "model.safetensors")
    expect = model
    if problem == "missing_dir":
        d, expect = str(tmp_path / "nope"), "nope"
    elif problem == "missing_model":
        os.unlink(model)
    elif problem == "missing_lineage":
        os.unlink(os.path.join(d, "lineage.json"))
        expect = "lineage.json"
    elif problem == "bad_json":
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write("{not json")
        expect = "config.json"
    elif problem == "bad_lineage":
        with open(os.path.join(d, "lineage.json"), "w") as f:
            json.dump({"kind": "unit", "units": "cs_0"}, f)
        expect = "lineage.json.*units"
    elif problem == "truncated":
        size = os.path.getsize(model)
        with open(model, "r+b") as f:
            f.truncate(size - 100)
        expect = "model.safetensors: truncated"
    elif problem == "garbage":
        with open(model, "wb") as f:
            f.write(b"\xff" * 64)
        expect = "model.safetensors"
    with pytest.raises(DataFormatError, match=expect):
        load_model_checkpoint(d)
    if problem in ("truncated", "garbage"):
        with pytest.raises(DataFormatError, match=expect):
            map_model_weights(d)


def test_replacing_never_removes_a_directory_that_is_not_ours(tmp_path):
    """Beside a user's files, a same-named directory blocks the replacement untouched."""
    d = tmp_path / "ckpt"
    save_model_checkpoint(str(d), {"w": torch.zeros(2)}, {"a": 1}, Lineage(kind="seed"))
    (d / "notes.txt").write_text("mine")
    os.unlink(d / "config.json")
    (d / "config.json").mkdir()
    (d / "config.json" / "draft.txt").write_text("also mine")
    with pytest.raises(ConfigError, match="holds a directory 'config.json'"):
        save_model_checkpoint(str(d), {"w": torch.ones(2)}, {"a": 2}, Lineage(kind="seed"))
    assert (d / "config.json" / "draft.txt").read_text() == "also mine"
    assert (d / "notes.txt").read_text() == "mine"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
