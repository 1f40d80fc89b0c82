"""Evaluation windows default to the length a model was trained at (evaluate/windows.py
``resolve_window``, ``evaluate(trained_len=...)``, ``megablocks-ablate eval``)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from megablocks_ablate.cli import main
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.evaluate import EvalSuite, evaluate
from megablocks_ablate.evaluate.windows import resolve_window
from megablocks_ablate.model.loading import load_model


def _trained_at(src: str, dst: str, length: int | None) -> str:
    """A copy of checkpoint ``src`` whose lineage records ``trained_seq_len=length``."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "lineage.json")
    with open(path) as f:
        lineage = json.load(f)
    lineage["trained_seq_len"] = length
    with open(path, "w") as f:
        json.dump(lineage, f)
    return dst


def _eval(model: str, eval_dir: str, tmp_path, *extra: str) -> tuple[int, dict | None]:
    out = tmp_path / "r.json"
    rc = main(
        ["eval", "--model", model, "--eval-sets", f"{eval_dir}/bio.jsonl", "--out", str(out)]
        + ["--cache-dir", str(tmp_path / "c"), *extra]
    )
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def test_resolve_window_defaults_and_refusals():
    assert resolve_window(None, 16, 32, "m") == 16
    assert resolve_window(8, 16, 32, "m") == 8
    assert resolve_window(None, None, 32, "m") == 32  # unknown: the model's max_seq_len
    assert resolve_window(None, 64, 32, "m") == 32  # never past max_seq_len
    with pytest.raises(ConfigError) as e:
        resolve_window(32, 16, 32, "runs/m", flag="--max-len", beyond_flag="--beyond-x")
    assert str(e.value) == (
        "--max-len 32 exceeds the 16 tokens runs/m was trained at; "
        "pass --beyond-x to score untrained positions"
    )
    assert resolve_window(32, 16, 32, "m", beyond=True) == 32
    with pytest.raises(ConfigError, match="max_len 64 exceeds the max_seq_len=32 of m"):
        resolve_window(64, 16, 32, "m", beyond=True)
    with pytest.raises(ConfigError, match="must be positive"):
        resolve_window(0, 16, 32, "m")


def test_library_evaluate_checks_the_trained_length(tiny_checkpoint, eval_dir, sp_model_path):
    model, _ = load_model(tiny_checkpoint)
    suite = EvalSuite.load(f"{eval_dir}/bio.jsonl", sp_model_path)
    default = evaluate(model, suite, trained_len=16)
    assert default == evaluate(model, suite, max_len=16)  # the trained length is the default
    with pytest.raises(ConfigError, match="max_len 32 exceeds the 16 tokens the model was"):
        evaluate(model, suite, max_len=32, trained_len=16)
    assert evaluate(model, suite, max_len=32, trained_len=16, beyond_trained_context=True) == (
        evaluate(model, suite)
    )


def test_eval_defaults_to_the_trained_length_and_records_it(
    tiny_checkpoint, eval_dir, sp_model_path, tmp_path
):
    ckpt = _trained_at(tiny_checkpoint, str(tmp_path / "m16"), 16)  # max_seq_len 32
    rc, data = _eval(ckpt, eval_dir, tmp_path)
    assert rc == 0
    got = data["models"][ckpt]
    assert got["max_len"] == 16 and got["trained_seq_len"] == 16
    assert data["settings"]["max_len"] is None
    assert data["settings"]["beyond_trained_context"] is False
    model, _ = load_model(ckpt)
    suite = EvalSuite.load(f"{eval_dir}/bio.jsonl", sp_model_path, cache_dir=str(tmp_path / "c"))
    ref = evaluate(model, suite, max_len=16)
    assert got["results"]["bio"]["nll_sum"] == ref["bio"].nll_sum


def test_eval_refuses_a_longer_window_before_any_output(
    tiny_checkpoint, eval_dir, tmp_path, capsys
):
    ckpt = _trained_at(tiny_checkpoint, str(tmp_path / "m16"), 16)
    rc, data = _eval(ckpt, eval_dir, tmp_path, "--max-len", "32")
    assert rc == 2 and data is None and not (tmp_path / "c").exists()  # nothing tokenized
    err = capsys.readouterr().err
    assert err.strip() == (
        f"error: --max-len 32 exceeds the 16 tokens {ckpt} was trained at; "
        "pass --beyond-trained-context to score untrained positions"
    )
    # a second model that is refused stops the first one too: all checks come first
    rc, data = _eval(tiny_checkpoint, eval_dir, tmp_path, "--model", ckpt, "--max-len", "32")
    assert rc == 2 and data is None
    # past max_seq_len even with the flag
    rc, data = _eval(ckpt, eval_dir, tmp_path, "--max-len", "64", "--beyond-trained-context")
    assert rc == 2 and data is None
    assert "--max-len 64 exceeds the max_seq_len=32" in capsys.readouterr().err


def test_beyond_trained_context_scores_the_longer_window(tiny_checkpoint, eval_dir, tmp_path):
    ckpt = _trained_at(tiny_checkpoint, str(tmp_path / "m16"), 16)
    rc, data = _eval(ckpt, eval_dir, tmp_path, "--max-len", "32", "--beyond-trained-context")
    assert rc == 0 and data["settings"]["beyond_trained_context"] is True
    assert data["models"][ckpt]["max_len"] == 32 and data["models"][ckpt]["trained_seq_len"] == 16


def test_old_checkpoint_falls_back_to_max_seq_len_with_a_warning(
    tiny_checkpoint, eval_dir, tmp_path, caplog
):
    old = _trained_at(tiny_checkpoint, str(tmp_path / "old"), None)  # no record at all
    with caplog.at_level(logging.WARNING):
        rc, data = _eval(old, eval_dir, tmp_path)
    assert rc == 0 and data["models"][old]["max_len"] == 32
    warned = [r.getMessage() for r in caplog.records if "trained_seq_len" in r.getMessage()]
    assert len(warned) == 1 and old in warned[0] and "max_seq_len=32" in warned[0]
