"""A run is certified (final/ + COMPLETE.json) only when its last step trained and its
weights are finite, under every nan_policy; every checkpoint a run starts from (init_from,
a study's seed, its own step checkpoints) is checked finite, naming file and tensor."""

from __future__ import annotations

import json
import math
import os
import shutil
import typing

import pytest
import torch
from conftest import assert_nothing_final, one_error_line, read_complete, tiny_overrides

from megablocks_ablate.checkpoint import load_model_checkpoint, save_model_checkpoint
from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.errors import NonFiniteError
from megablocks_ablate.train import state as st
from megablocks_ablate.train.config import TrainConfig
from megablocks_ablate.train.divergence import INJECT_ENV, POLICIES, DivergenceGuard
from megablocks_ablate.train.trainer import Trainer, train
from megablocks_ablate.utils.hashing import sha256_file

# lr=1e6 with no warmup: step 1 is finite, its update makes every later forward pass NaN
# (the weights stay finite, only huge): a run that diverges for good.
DIVERGE = {"optimizer.lr": 1e6, "schedule.warmup_steps": 0}
SEED = {"kind": "seed", "data.mixture": "['*']"}
STEPS = 8  # tiny_overrides: train_tokens = 8 global batches


def _cfg(manifest, out, **extra) -> TrainConfig:
    return TrainConfig.load(None, tiny_overrides(manifest, out, **{**SEED, **extra}))


def _assert_not_certified(out_dir):
    assert_nothing_final(out_dir)
    assert not st.is_complete(out_dir)


def test_the_policies_covered_are_every_value_the_config_takes():
    # the parametrized tests below run every policy in POLICIES: all the config allows
    hint = typing.get_type_hints(TrainConfig)["nan_policy"]
    assert set(typing.get_args(hint)) == set(POLICIES) == {"stop", "skip", "rollback"}


def test_guard_check_end():
    guard = DivergenceGuard("skip", 10, "runs/x")
    guard.load_state_dict({"skipped_steps": [2, 5, 7, 8]})
    assert guard.trailing_skips(8) == 2 and guard.trailing_skips(9) == 0
    with pytest.raises(
        NonFiniteError, match=r"^runs/x: training ended on skipped steps: steps 7-8 of 8 "
    ):
        guard.check_end(8, 1.5)
    guard.check_end(9, 1.5)  # skips earlier in the run, then trained: certified
    for loss in (None, float("nan"), float("inf")):
        with pytest.raises(
            NonFiniteError, match=r"^runs/x: the final loss \(step 9\) is undefined"
        ):
            guard.check_end(9, loss)


# ----------------------------------------------------------------------------- skip


def test_skip_run_that_diverges_for_good_is_not_certified(train_manifest, tmp_path, capsys):
    """The hostile case: steps 2-8 all NaN, fewer than nan_max_skips (10), so the run
    used to exit 0 with a final/ whose every forward pass is NaN."""
    out = str(tmp_path / "run")
    extra = {**SEED, **DIVERGE, "nan_policy": "skip", "checkpoint.every": 1}
    args = tiny_overrides(train_manifest, out, **extra)
    assert cli_main(["train", *args]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {out}: training ended on skipped steps: steps 2-8 of 8")
    assert "nan_policy=skip" in err and "final loss is undefined" in err
    assert "no final model or COMPLETE.json is written" in err
    _assert_not_certified(out)
    assert [s for s, _ in st.list_checkpoints(out)] == [6, 7]  # kept for debugging
    # nothing downstream can take it: a run directory without final/ is refused
    assert cli_main(["export-hf", out, str(tmp_path / "hf")]) == 2
    capsys.readouterr()
    assert not os.path.exists(tmp_path / "hf")
    # rerunning resumes from step 7 and refuses again: never certified
    assert cli_main(["train", *args]) == 2
    assert "training ended on skipped steps: steps 2-8 of 8" in one_error_line(capsys)
    _assert_not_certified(out)


@pytest.mark.parametrize("tensor", ["loss", "layers.0.in_proj.weight"])
def test_skip_run_whose_last_step_is_skipped_is_not_certified(
    train_manifest, tmp_path, monkeypatch, tensor
):
    out = str(tmp_path / "run")
    monkeypatch.setenv(INJECT_ENV, f"{STEPS}:{tensor}")  # only the last step, once
    cfg = _cfg(train_manifest, out, nan_policy="skip", **{"checkpoint.every": 4})
    with pytest.raises(NonFiniteError, match=r"step 8 of 8 had a non-finite .* was skipped"):
        train(cfg)
    _assert_not_certified(out)
    # the NaN was transient: a rerun resumes from step 4 and certifies a finite run
    monkeypatch.delenv(INJECT_ENV)
    summary = train(cfg)
    assert summary["start_step"] == 4 and summary["skipped_steps"] == []
    assert math.isfinite(read_complete(out)["final_loss"])


def test_skip_run_that_recovers_is_still_certified(train_manifest, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    monkeypatch.setenv(INJECT_ENV, "3:loss,7:loss")  # skipped, then trained again
    train(_cfg(train_manifest, out, nan_policy="skip"))
    done = read_complete(out)
    assert done["skipped_steps"] == [3, 7] and math.isfinite(done["final_loss"])


# ----------------------------------------------------------------------------- every policy


@pytest.mark.parametrize("policy", POLICIES)
def test_non_finite_final_weights_are_never_certified(
    train_manifest, tmp_path, monkeypatch, policy
):
    """Every step finite, yet a weight is NaN when training ends: no final/, whatever
    the policy (the weights are checked, not only the losses)."""
    finish = Trainer._finish

    def poisoned(self, model, optimizer, total, loss):
        with torch.no_grad():
            dict(model.named_parameters())["layers.1.mlp_out.weight"].view(-1)[:3] = torch.tensor(
                [float("nan"), float("inf"), 1.0]
            )
        return finish(self, model, optimizer, total, loss)

    monkeypatch.setattr(Trainer, "_finish", poisoned)
    out = str(tmp_path / "run")
    cfg = _cfg(train_manifest, out, nan_policy=policy, **{"checkpoint.every": 4})
    with pytest.raises(NonFiniteError) as e:
        train(cfg)
    assert str(e.value) == (
        f"{out}: the trained model after step 8: tensor 'layers.1.mlp_out.weight' has 2 "
        "non-finite values (NaN/inf); no final model or COMPLETE.json is written; step "
        "checkpoints before it are kept for debugging"
    )
    _assert_not_certified(out)
    assert [s for s, _ in st.list_checkpoints(out)] == [4]


@pytest.mark.parametrize("policy", POLICIES)
def test_a_nan_last_step_never_leaves_an_undefined_final_loss(
    train_manifest, tmp_path, monkeypatch, policy
):
    """A NaN at the last step: stop and skip end without final/; rollback trains the
    step again from its checkpoint, so what it certifies has a finite final loss."""
    out = str(tmp_path / "run")
    monkeypatch.setenv(INJECT_ENV, f"{STEPS}:loss")
    cfg = _cfg(train_manifest, out, nan_policy=policy, **{"checkpoint.every": 4})
    if policy == "rollback":
        summary = train(cfg)
        assert summary["rollbacks"] == [{"step": 8, "to": 4}]
        assert math.isfinite(read_complete(out)["final_loss"])
        return
    with pytest.raises(NonFiniteError, match="at step 8|step 8 of 8"):
        train(cfg)
    _assert_not_certified(out)


# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def seed_run(train_manifest, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("seed") / "seed")
    cfg = _cfg(train_manifest, out, train_tokens=256 * 2, **{"checkpoint.final_optimizer": True})
    train(cfg)
    return out


def _poison_weights(ckpt_dir, name="layers.0.attn_out.weight"):
    state, config, lineage = load_model_checkpoint(ckpt_dir)
    state[name].view(-1)[:2] = float("nan")
    save_model_checkpoint(ckpt_dir, state, config, lineage)


def _unit_args(manifest, out, init_from, **extra):
    return tiny_overrides(
        manifest,
        out,
        kind="unit",
        init_from=init_from,
        train_tokens=256 * 2,
        **{"data.unit": "physics-0001"},
        **extra,
    )


def _no_lr_advice(err: str, tmp_path) -> None:
    text = err.replace(str(tmp_path), "")
    assert "lr" not in text and "learning rate" not in text and "nan_policy" not in text


def test_nan_init_from_is_refused_naming_file_and_tensor(
    seed_run, train_manifest, tmp_path, capsys
):
    ckpt = str(tmp_path / "nan-seed")  # a plain checkpoint (no run record, no hash)
    shutil.copytree(os.path.join(seed_run, st.FINAL_DIR), ckpt)
    _poison_weights(ckpt)
    out = str(tmp_path / "unit")
    assert cli_main(["train", *_unit_args(train_manifest, out, ckpt)]) == 2
    err = one_error_line(capsys)
    weights = os.path.join(ckpt, "model.safetensors")
    assert err == (
        f"error: {weights}: tensor 'layers.0.attn_out.weight' has 2 non-finite values "
        f"(NaN/inf); the init_from checkpoint {ckpt} holds broken weights and no run can "
        "start from it: give another init_from, or train that model again"
    )
    _no_lr_advice(err, tmp_path)
    _assert_not_certified(out)
    assert st.list_checkpoints(out) == []


def test_a_certified_seed_with_nan_weights_is_refused(seed_run, train_manifest, tmp_path, capsys):
    """A study's seed: a run directory whose COMPLETE.json vouches for NaN weights (as an
    older version wrote them) passes the sha256 check, and is refused as non-finite."""
    run = str(tmp_path / "seed")
    shutil.copytree(seed_run, run)
    final = os.path.join(run, st.FINAL_DIR)
    _poison_weights(final, "embed.weight")
    record = read_complete(run)
    record["model_sha256"] = sha256_file(os.path.join(final, "model.safetensors"))
    with open(os.path.join(run, st.COMPLETE_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f)
    out = str(tmp_path / "unit")
    assert cli_main(["train", *_unit_args(train_manifest, out, run)]) == 2
    err = one_error_line(capsys)
    assert err.startswith(
        f"error: {final}/model.safetensors: tensor 'embed.weight' has 2 non-finite values"
    )
    assert f"init_from checkpoint {final} holds broken weights" in err
    _no_lr_advice(err, tmp_path)
    _assert_not_certified(out)


def test_nan_seed_optimizer_state_is_refused(seed_run, train_manifest, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = str(tmp_path / "seed")
    shutil.copytree(seed_run, run)
    final = os.path.join(run, st.FINAL_DIR)
    path = os.path.join(final, st.OPTIM_TENSORS)
    tensors = load_file(path)
    name = "layers.1.in_proj.weight/exp_avg_sq"
    tensors[name].view(-1)[0] = float("inf")
    save_file(tensors, path, metadata={"format": "pt"})
    record = read_complete(run)
    record["optimizer_sha256"] = sha256_file(path)
    with open(os.path.join(run, st.COMPLETE_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f)
    out = str(tmp_path / "unit")
    args = _unit_args(train_manifest, out, run, init_optimizer="seed")
    assert cli_main(["train", *args]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {path}: tensor '{name}' has 1 non-finite values (NaN/inf)")
    assert "optimizer state is broken" in err
    _assert_not_certified(out)


def test_a_step_checkpoint_with_nan_weights_is_not_resumed(train_manifest, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = tiny_overrides(train_manifest, out, **{**SEED, **DIVERGE, "checkpoint.every": 1})
    assert cli_main(["train", *args]) == 2  # stops at step 2, the step-1 checkpoint stays
    capsys.readouterr()
    step1 = st.step_dir(out, 1)
    _poison_weights(step1, "norm.weight")
    state_file = os.path.join(step1, st.STATE_FILE)
    with open(state_file, encoding="utf-8") as f:
        state = json.load(f)
    state["sha256"]["model.safetensors"] = sha256_file(os.path.join(step1, "model.safetensors"))
    with open(state_file, "w", encoding="utf-8") as f:
        json.dump(state, f)
    assert cli_main(["train", *args]) == 2
    err = one_error_line(capsys)
    assert err.startswith(
        f"error: {step1}/model.safetensors: tensor 'norm.weight' has 2 non-finite values"
    )
    assert "delete its step directory to resume from an earlier one" in err
    _assert_not_certified(out)
