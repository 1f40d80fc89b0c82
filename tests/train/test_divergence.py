"""Non-finite training (nan_policy stop/skip/rollback) and the integrity checks before a
run uses its inputs (init_from weights, unit data, token ids)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_nothing_final, flip_byte, one_error_line, read_complete, tiny_overrides

from megablocks_ablate.checkpoint import load_model_checkpoint, model_hash
from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.data.manifest import Manifest
from megablocks_ablate.errors import ConfigError, NonFiniteError
from megablocks_ablate.train import state as st
from megablocks_ablate.train.config import TrainConfig
from megablocks_ablate.train.divergence import (
    INJECT_ENV,
    DivergenceGuard,
    NanInjector,
    StepCheck,
    check_step,
    first_nonfinite_grad,
)
from megablocks_ablate.train.trainer import train
from megablocks_ablate.utils.hashing import sha256_file

# lr=1e6 with no warmup: step 1 is finite, its update makes every later forward pass NaN.
DIVERGE = {"optimizer.lr": 1e6, "schedule.warmup_steps": 0}
SEED = {"kind": "seed", "data.mixture": "['*']"}


def _cfg(manifest, out, **extra) -> TrainConfig:
    return TrainConfig.load(None, tiny_overrides(manifest, out, **{**SEED, **extra}))


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- pieces


def test_config_fields_and_validation():
    cfg = TrainConfig.load(None, ["nan_policy=rollback", "nan_max_skips=3"])
    assert (cfg.nan_policy, cfg.nan_max_skips) == ("rollback", 3)
    assert TrainConfig.load(None).nan_policy == "stop"
    with pytest.raises(ConfigError, match="nan_policy"):
        TrainConfig.load(None, ["nan_policy=ignore"])
    with pytest.raises(ConfigError, match="nan_max_skips"):
        TrainConfig.load(None, ["nan_max_skips=-1"])


def test_first_nonfinite_grad_is_in_model_order():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model(torch.ones(2, 3)).sum().backward()
    named = list(model.named_parameters())
    params = [p for _, p in named]
    assert check_step(1, torch.tensor(1.0), torch.tensor(2.0), named).finite
    model[1].weight.grad[0, 1] = float("inf")
    model[0].bias.grad[2] = float("nan")
    assert first_nonfinite_grad(named) == "0.bias"
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    check = check_step(4, torch.tensor(2.5), norm, named)
    assert (check.step, check.loss, check.tensor) == (4, 2.5, "0.bias")
    assert check.describe() == "the gradient of 0.bias"
    check = check_step(4, torch.tensor(float("inf")), norm, named)  # the loss comes first
    assert check.tensor == "loss" and "loss" in check.describe()


def test_guard_decisions():
    nan = float("nan")
    guard = DivergenceGuard("skip", 2, "runs/x")
    assert guard.decide(StepCheck(3, nan, nan, "loss"), None) == "skip"
    guard.finite_step()
    assert guard.decide(StepCheck(5, nan, nan, "loss"), None) == "skip"
    assert guard.decide(StepCheck(6, nan, nan, "loss"), None) == "skip"
    with pytest.raises(NonFiniteError, match=r"at step 7: the loss .*nan_max_skips=2"):
        guard.decide(StepCheck(7, nan, nan, "loss"), None)
    assert guard.state_dict() == {"skipped_steps": [3, 5, 6], "rollbacks": []}
    guard.rewind(5)
    assert guard.skipped == [3, 5]

    guard = DivergenceGuard("rollback", 10, "runs/x")
    with pytest.raises(NonFiniteError, match="no step checkpoint"):
        guard.decide(StepCheck(2, 1.0, nan, "w"), None)
    assert guard.decide(StepCheck(5, 1.0, nan, "w"), 4) == "rollback"
    with pytest.raises(NonFiniteError, match=r"step 5: the gradient of w .*diverged again"):
        guard.decide(StepCheck(5, 1.0, nan, "w"), 4)
    assert guard.rollbacks == [{"step": 5, "to": 4}]
    with pytest.raises(NonFiniteError, match="nan_policy=stop"):
        DivergenceGuard("stop", 10, "runs/x").decide(StepCheck(1, nan, nan, "loss"), 4)
    with pytest.raises(ConfigError, match=INJECT_ENV):
        NanInjector("3")


# ----------------------------------------------------------------------------- nan_policy


def test_diverged_run_stops_through_the_cli(train_manifest, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = tiny_overrides(train_manifest, out, **{**SEED, **DIVERGE, "checkpoint.every": 1})
    assert cli_main(["train", *args]) == 2
    err = one_error_line(capsys)
    assert f"error: {out}: training diverged at step 2: the loss" in err
    assert "loss nan" in err and "nan_policy=stop" in err
    assert_nothing_final(out)
    # the step-1 checkpoint, written before the divergence, stays and is valid
    assert [s for s, _ in st.list_checkpoints(out)] == [1]
    st.load_train_checkpoint(st.step_dir(out, 1))
    assert [r["step"] for r in _metrics(out)] == [1]


def test_first_nonfinite_parameter_is_named(train_manifest, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    # two gradients go NaN at step 3; the first in model order is named
    monkeypatch.setenv(INJECT_ENV, "3:layers.1.mlp_out.weight,3:layers.0.attn_out.weight")
    with pytest.raises(NonFiniteError) as e:
        train(_cfg(train_manifest, out))
    msg = str(e.value)
    assert "at step 3: the gradient of layers.0.attn_out.weight is non-finite" in msg
    assert "grad norm nan" in msg and "layers.1" not in msg
    assert_nothing_final(out)


def test_skip_policy_finishes_and_records_the_skips(train_manifest, tmp_path, monkeypatch, caplog):
    out = str(tmp_path / "run")
    monkeypatch.setenv(INJECT_ENV, "3:layers.0.in_proj.weight,5:loss")
    caplog.set_level(logging.WARNING, logger="megablocks_ablate")
    summary = train(_cfg(train_manifest, out, nan_policy="skip", **{"logging.every": 4}))
    assert summary["skipped_steps"] == [3, 5]
    done = read_complete(out)
    assert done["skipped_steps"] == [3, 5] and done["rollbacks"] == []
    assert st.is_complete(out) and done["final_loss"] is not None
    rows = {r["step"]: r for r in _metrics(out)}
    assert sorted(rows) == [3, 4, 5, 8]  # logged every 4 steps, and every skipped step
    assert rows[3]["skipped"] and rows[3]["nonfinite"] == "layers.0.in_proj.weight"
    assert rows[3]["grad_norm"] is None and rows[3]["loss"] > 0  # the loss was finite
    assert rows[5]["nonfinite"] == "loss" and rows[5]["loss"] is None
    assert rows[5]["skipped_steps"] == 2 and "skipped" not in rows[8]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3: the gradient of layers.0.in_proj.weight" in w for w in warnings)
    assert any("step 5: the loss" in w and "skipped" in w for w in warnings)


def test_skip_policy_stops_after_nan_max_skips(train_manifest, tmp_path):
    out = str(tmp_path / "run")
    cfg = _cfg(train_manifest, out, nan_policy="skip", nan_max_skips=2, **DIVERGE)
    with pytest.raises(NonFiniteError, match=r"at step 4: the loss .*nan_max_skips=2"):
        train(cfg)  # steps 2 and 3 skipped (the weights stay those making NaN), 4 stops
    assert_nothing_final(out)
    assert [(r["step"], r.get("skipped", False)) for r in _metrics(out)] == [
        (1, False),
        (2, True),
        (3, True),
    ]


def test_rollback_policy_restores_the_last_checkpoint(
    train_manifest, tmp_path, monkeypatch, caplog
):
    every = {"checkpoint.every": 2}
    ref = str(tmp_path / "ref")
    train(_cfg(train_manifest, ref, **every))
    out = str(tmp_path / "run")
    monkeypatch.setenv(INJECT_ENV, "5:loss")  # a transient NaN: only the first time
    caplog.set_level(logging.WARNING, logger="megablocks_ablate")
    summary = train(_cfg(train_manifest, out, nan_policy="rollback", **every))
    assert any(
        "step 5: the loss" in r.getMessage() and "rolling back to the step-4" in r.getMessage()
        for r in caplog.records
    )
    assert summary["rollbacks"] == [{"step": 5, "to": 4}]
    assert read_complete(out)["rollbacks"] == [{"step": 5, "to": 4}]
    # steps 5.. trained again from the step-4 state: the run is exactly the clean one
    a, b = _metrics(ref), _metrics(out)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert model_hash(os.path.join(ref, "final")) == model_hash(os.path.join(out, "final"))


def test_rollback_policy_stops_when_it_cannot_help(train_manifest, tmp_path, capsys):
    out = str(tmp_path / "again")
    args = tiny_overrides(
        train_manifest,
        out,
        **{**SEED, **DIVERGE, "nan_policy": "rollback", "checkpoint.every": 1},
    )
    assert cli_main(["train", *args]) == 2  # step 2 diverges again from the step-1 state
    err = one_error_line(capsys)
    assert "at step 2: the loss" in err and "diverged again" in err and "step-1" in err
    assert_nothing_final(out)
    out = str(tmp_path / "none")
    with pytest.raises(NonFiniteError, match="at step 2: .*no step checkpoint"):
        train(_cfg(train_manifest, out, nan_policy="rollback", **DIVERGE))
    assert_nothing_final(out)


# ----------------------------------------------------------------------------- integrity


@pytest.fixture(scope="module")
def seed_final(train_manifest, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("seed") / "seed")
    train(_cfg(train_manifest, out, train_tokens=256 * 2))
    return os.path.join(out, st.FINAL_DIR)


def _unit_args(manifest, out, init_from, unit="physics-0001"):
    return tiny_overrides(
        manifest,
        out,
        kind="unit",
        init_from=init_from,
        train_tokens=256 * 2,
        **{"data.unit": unit},
    )


def test_init_from_is_verified_and_its_hash_recorded(seed_final, train_manifest, tmp_path, capsys):
    recorded = read_complete(os.path.dirname(seed_final))["model_sha256"]
    out = str(tmp_path / "unit")
    assert cli_main(["train", *_unit_args(train_manifest, out, seed_final)]) == 0
    capsys.readouterr()
    _, _, lineage = load_model_checkpoint(os.path.join(out, "final"))
    assert lineage.seed_hash == recorded
    # a flipped byte in a copy of the finished seed: refused, naming the file
    copy = str(tmp_path / "seed")
    shutil.copytree(os.path.dirname(seed_final), copy)
    weights = os.path.join(copy, st.FINAL_DIR, "model.safetensors")
    flip_byte(weights)
    out = str(tmp_path / "unit2")
    assert cli_main(["train", *_unit_args(train_manifest, out, os.path.dirname(weights))]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {weights}: sha256 ") and "COMPLETE.json" in err
    assert_nothing_final(out)
    assert st.list_checkpoints(out) == []


def _data_copy(train_manifest, tmp_path) -> Manifest:
    dst = str(tmp_path / "data")
    shutil.copytree(train_manifest, dst)
    return Manifest.load(dst)


def test_corrupted_unit_data_is_refused(train_manifest, tmp_path, capsys):
    m = _data_copy(train_manifest, tmp_path)
    bin_path = m.unit_prefix("physics-0001") + ".bin"
    flip_byte(bin_path)
    out = str(tmp_path / "run")
    args = tiny_overrides(m.root, out, kind="seq", **{"data.mixture": "[physics-0001]"})
    assert cli_main(["train", *args]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {bin_path}: sha256 ") and "physics-0001" in err
    assert_nothing_final(out)
    # a unit outside the run's mixture is not read, so not checked
    out = str(tmp_path / "other")
    args = tiny_overrides(
        m.root, out, kind="seq", train_tokens=512, **{"data.mixture": "[biology]"}
    )
    assert cli_main(["train", *args]) == 0


def test_out_of_vocabulary_token_is_refused(train_manifest, tmp_path, capsys):
    m = _data_copy(train_manifest, tmp_path)
    unit = "history-0000"
    bin_path = m.unit_prefix(unit) + ".bin"
    tokens = np.fromfile(bin_path, dtype=np.dtype(m.data["dtype"]))
    tokens[7] = 60000  # same size; the manifest's hash is updated to match
    tokens.tofile(bin_path)
    m.units[unit]["bin"]["sha256"] = sha256_file(bin_path)
    m.save()
    m.verify(units=[unit])  # the hash check passes: only the token check can catch it
    out = str(tmp_path / "run")
    args = tiny_overrides(m.root, out, kind="unit", **{"data.unit": unit})
    assert cli_main(["train", *args]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {bin_path}: ") and "token id 60000" in err
    assert "512" in err
    assert_nothing_final(out)


# ----------------------------------------------------------------------------- ranks agree


def _torchrun(manifest, out, inject, **extra):
    import subprocess

    from conftest import PYTHON, subprocess_env

    args = tiny_overrides(
        manifest, out, micro_batch=2, train_tokens=256 * 4, **{"data.unit": "biology-0001"}, **extra
    )
    torchrun = os.path.join(os.path.dirname(PYTHON), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "megablocks_ablate", "train"]
    return subprocess.run(
        cmd + args,
        env=subprocess_env(**{INJECT_ENV: inject}),
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.integration
def test_ranks_agree_on_a_nan_seen_by_one_rank(train_manifest, tmp_path):
    """A NaN on rank 1 only: every rank skips (DDP) or stops (FSDP2) at the same step,
    naming the same tensor, instead of hanging in mismatched collectives."""
    out = str(tmp_path / "ddp")
    r = _torchrun(train_manifest, out, "2:loss@1,3:layers.0.attn_out.weight@1", nan_policy="skip")
    assert r.returncode == 0, r.stderr
    assert read_complete(out)["skipped_steps"] == [2, 3]
    assert "step 3: the gradient of layers.0.attn_out.weight" in r.stderr
    out = str(tmp_path / "fsdp")
    r = _torchrun(
        train_manifest, out, "3:layers.1.in_proj.weight@1", **{"distributed.parallel": "fsdp"}
    )
    assert r.returncode != 0
    # one error per rank (their lines may interleave), the same on both
    assert r.stderr.count("training diverged at step 3: ") == 2, r.stderr
    assert r.stderr.count("at step 3: the gradient of layers.1.in_proj.weight is") == 2
    assert_nothing_final(out)
    out = str(tmp_path / "rollback")
    r = _torchrun(train_manifest, out, "3:loss@1", nan_policy="rollback", **{"checkpoint.every": 2})
    assert r.returncode == 0, r.stderr
    assert read_complete(out)["rollbacks"] == [{"step": 3, "to": 2}]


@pytest.mark.integration
def test_rank0_data_check_fails_every_rank(train_manifest, tmp_path):
    m = _data_copy(train_manifest, tmp_path)
    bin_path = m.unit_prefix("biology-0001") + ".bin"
    flip_byte(bin_path)
    r = _torchrun(m.root, str(tmp_path / "run"), "")
    assert r.returncode != 0
    assert r.stderr.count(f"{bin_path}: sha256 ") == 2, r.stderr  # from both ranks
