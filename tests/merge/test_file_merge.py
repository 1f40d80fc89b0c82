"""Streaming file merge and the `merge` command: results, lineage, and refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from megablocks_ablate.checkpoint import (
    load_model_checkpoint,
    model_hash,
    save_model_checkpoint,
)
from megablocks_ablate.cli import main
from megablocks_ablate.errors import ConfigError, DataFormatError, NonFiniteError
from megablocks_ablate.merge.file_merge import merge_checkpoints
from megablocks_ablate.merge.spec import MergeSpec


def _spec(ckpts, **mixture) -> MergeSpec:
    return MergeSpec.from_dict(
        {"checkpoints": ckpts, **(mixture or {"uniform": True})}, source="test.yaml"
    )


def _expected(ckpts, weights):
    states = {u: load_model_checkpoint(p)[0] for u, p in ckpts.items()}
    first = next(iter(states.values()))
    return {k: sum(weights[u] * states[u][k].double() for u in ckpts) for k in first}


def test_merge_matches_weighted_sum_and_records_lineage(family, tmp_path):
    seed, ckpts = family
    spec = _spec(ckpts, macro={"cs": ["cs_0", "cs_1"], "bio": ["bio_0"]})
    out = str(tmp_path / "merged")
    lineage = merge_checkpoints(spec, out, show_progress=False)
    state, config, lin = load_model_checkpoint(out)
    want = _expected(ckpts, {"cs_0": 0.25, "cs_1": 0.25, "bio_0": 0.5})
    for k, v in want.items():
        torch.testing.assert_close(state[k].double(), v, rtol=1e-6, atol=1e-6)
    assert lin == lineage and lin.kind == "merged" and lin.seed_hash == model_hash(seed)
    assert lin.units == ["cs_0", "cs_1", "bio_0"] and lin.weights == pytest.approx(
        [0.25, 0.25, 0.5]
    )
    assert lin.tokens_seen == 600 and lin.tokenizer_fingerprint == "tok-abc"
    assert lin.parents == [os.path.abspath(p) for p in ckpts.values()]
    assert config == load_model_checkpoint(ckpts["cs_0"])[1]


def _record_trained_len(ckpt: str, length: int) -> None:
    path = os.path.join(ckpt, "lineage.json")
    with open(path) as f:
        lineage = json.load(f)
    lineage["trained_seq_len"] = length
    with open(path, "w") as f:
        json.dump(lineage, f)


def test_merge_inherits_the_trained_length(family, tmp_path, caplog):
    import logging

    _, ckpts = family
    # the fixture's inputs record none: nor does the merge (its reader falls back)
    lin = merge_checkpoints(_spec(ckpts), str(tmp_path / "none"), show_progress=False)
    assert lin.trained_seq_len is None
    for unit in ckpts:
        _record_trained_len(ckpts[unit], 64)
    lin = merge_checkpoints(_spec(ckpts), str(tmp_path / "same"), show_progress=False)
    assert lin.trained_seq_len == 64
    _record_trained_len(ckpts["bio_0"], 32)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        lin = merge_checkpoints(_spec(ckpts), str(tmp_path / "differ"), show_progress=False)
    assert (
        lin.trained_seq_len
        == 32
        == load_model_checkpoint(str(tmp_path / "differ"))[2].trained_seq_len
    )
    (msg,) = [r.getMessage() for r in caplog.records if "different lengths" in r.getMessage()]
    assert "test.yaml" in msg and "bio_0 32" in msg and "the minimum, 32" in msg


def test_chunking_and_dtype(family, tmp_path):
    _, ckpts = family
    spec = _spec(ckpts, weights={"cs_0": 1, "bio_0": 3})
    merge_checkpoints(spec, str(tmp_path / "a"), show_progress=False)
    merge_checkpoints(spec, str(tmp_path / "b"), chunk=7, show_progress=False)  # odd chunks
    a, b = (
        load_model_checkpoint(str(tmp_path / "a"))[0],
        load_model_checkpoint(str(tmp_path / "b"))[0],
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    merge_checkpoints(spec, str(tmp_path / "c"), dtype="bf16", show_progress=False)
    c = load_model_checkpoint(str(tmp_path / "c"))[0]
    assert all(c[k].dtype == torch.bfloat16 and torch.equal(c[k], a[k].bfloat16()) for k in a)
    lin = load_model_checkpoint(str(tmp_path / "c"))[2]
    assert lin.units == ["cs_0", "bio_0"]  # zero-weight units are not inputs


def _corrupt(ckpts, problem):
    """Rewrite cs_1 so that it differs from the others in one way."""
    state, config, lin = load_model_checkpoint(ckpts["cs_1"])
    if problem == "shape":
        state["up.weight"] = torch.zeros(21, 12)
    elif problem == "missing":
        del state["norm.bias"]
    elif problem == "seed":
        lin.seed_hash = "f" * 64
    elif problem == "tokenizer":
        lin.tokenizer_fingerprint = "tok-other"
    elif problem == "config":
        config = dict(config, hidden_size=13)
    save_model_checkpoint(ckpts["cs_1"], state, config, lin)


@pytest.mark.parametrize(
    "problem, error, match",
    [
        (
            "shape",
            DataFormatError,
            r"cs_1/model.safetensors: tensor 'up.weight' has shape \[21, 12\]",
        ),
        ("missing", DataFormatError, r"cs_1/model.safetensors: missing tensor 'norm.bias'"),
        ("seed", ConfigError, "same seed.*--allow-different-seed"),
        ("tokenizer", ConfigError, r"cs_1/lineage.json: tokenizer fingerprint 'tok-other'"),
        ("config", ConfigError, r"cs_1/config.json: model config differs.*hidden_size"),
    ],
)
def test_refusals_name_file_and_tensor(family, tmp_path, problem, error, match):
    _, ckpts = family
    _corrupt(ckpts, problem)
    out = str(tmp_path / "merged")
    with pytest.raises(error, match=match):
        merge_checkpoints(_spec(ckpts), out, show_progress=False)
    assert not os.path.exists(out)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".merged")] == []


def test_different_seed_allowed_with_flag(family, tmp_path):
    _, ckpts = family
    _corrupt(ckpts, "seed")
    lin = merge_checkpoints(
        _spec(ckpts), str(tmp_path / "m"), allow_different_seed=True, show_progress=False
    )
    assert lin.seed_hash is None


def test_truncated_input_refused(family, tmp_path):
    _, ckpts = family
    path = os.path.join(ckpts["bio_0"], "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(DataFormatError, match=r"bio_0/model.safetensors: truncated"):
        merge_checkpoints(_spec(ckpts), str(tmp_path / "m"), show_progress=False)


def test_cli_merge(family, tmp_path, capsys):
    _, ckpts = family
    spec_path = tmp_path / "merge.yaml"
    rel = {u: os.path.relpath(p, tmp_path) for u, p in ckpts.items()}
    spec_path.write_text(yaml.safe_dump({"checkpoints": rel, "by_tokens": True}, sort_keys=False))
    out = str(tmp_path / "out")
    assert main(["merge", "--spec", str(spec_path), "--print-weights"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == pytest.approx({"cs_0": 1 / 6, "cs_1": 2 / 6, "bio_0": 3 / 6})
    assert main(["merge", "--spec", str(spec_path), "--out", out, "--dtype", "fp16"]) == 0
    state, _, lin = load_model_checkpoint(out)
    assert lin.weights == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert all(v.dtype == torch.float16 for v in state.values())

    out = str(tmp_path / "out2")  # (out now holds a merge: replacing it needs --overwrite)
    spec_path.write_text(yaml.safe_dump({"checkpoints": rel, "weights": {"cs_0": float("nan")}}))
    assert main(["merge", "--spec", str(spec_path), "--out", out]) == 2
    assert "weights.cs_0: weight must be finite" in capsys.readouterr().err
    spec_path.write_text(yaml.safe_dump({"checkpoints": rel, "weights": {"cs_0": 0, "bio_0": 0}}))
    assert main(["merge", "--spec", str(spec_path), "--out", out]) == 2
    assert "sum to 0" in capsys.readouterr().err


def _poison(ckpt: str, name: str, values: list[float]) -> None:
    """Rewrite a checkpoint with the first ``len(values)`` elements of ``name`` replaced."""
    state, config, lin = load_model_checkpoint(ckpt)
    state[name].view(-1)[: len(values)] = torch.tensor(values)
    save_model_checkpoint(ckpt, state, config, lin)


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_non_finite_input_is_refused_naming_checkpoint_and_tensor(family, tmp_path, chunk):
    _, ckpts = family
    _poison(ckpts["cs_1"], "up.weight", [float("nan"), float("inf"), -float("inf")])
    out = str(tmp_path / "merged")
    with pytest.raises(
        NonFiniteError,
        match=r"pool/cs_1/model.safetensors: tensor 'up.weight' has 3 non-finite values "
        r"\(NaN/inf\); a unit model with NaN weights means its training diverged",
    ):
        merge_checkpoints(_spec(ckpts), out, chunk=chunk, show_progress=False)
    assert not os.path.exists(out)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".merged")] == []
    # a zero-weight input is not read, so its NaN does not matter
    merge_checkpoints(
        _spec(ckpts, weights={"cs_0": 1, "bio_0": 1}), out, chunk=chunk, show_progress=False
    )
    assert all(torch.isfinite(v).all() for v in load_model_checkpoint(out)[0].values())


def test_output_overflow_is_refused_naming_tensor_and_dtype(family, tmp_path, capsys):
    _, ckpts = family
    _poison(ckpts["bio_0"], "norm.weight", [40000.0, 50000.0])  # finite in fp32 and fp16
    spec = _spec(ckpts, weights={"cs_0": 1, "bio_0": 1})  # normalized: 0.5 each, fits fp16
    merge_checkpoints(spec, str(tmp_path / "ok"), dtype="fp16", show_progress=False)
    spec = MergeSpec.from_dict(
        {"checkpoints": ckpts, "weights": {"cs_0": 1, "bio_0": 2}, "normalize": False},
        source="test.yaml",
    )
    out = str(tmp_path / "merged")
    with pytest.raises(
        NonFiniteError,
        match=r"merged tensor 'norm.weight' has 2 non-finite values \(NaN/inf\) in the output "
        r"dtype fp16: the weighted sum of finite inputs overflows fp16",
    ):
        merge_checkpoints(spec, out, dtype="fp16", chunk=5, show_progress=False)
    assert not os.path.exists(out)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".merged")] == []
    merge_checkpoints(spec, out, dtype="fp32", show_progress=False)  # fp32 holds it
    assert load_model_checkpoint(out)[0]["norm.weight"][1] == pytest.approx(100000.0, rel=1e-2)


def test_cli_merge_non_finite_input_exits_2(family, tmp_path, capsys):
    _, ckpts = family
    _poison(ckpts["bio_0"], "down.weight", [float("nan")])
    spec_path = tmp_path / "merge.yaml"
    spec_path.write_text(yaml.safe_dump({"checkpoints": ckpts, "uniform": True}))
    out = tmp_path / "out"
    assert main(["merge", "--spec", str(spec_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "error: " in err and "bio_0/model.safetensors: tensor 'down.weight' has 1 non-finite" in err
    )
    assert not out.exists()
