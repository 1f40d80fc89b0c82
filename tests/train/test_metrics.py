"""MetricsLogger across a resume: TensorBoard purges redone steps, W&B continues its run."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

from megablocks_ablate.train.metrics import WANDB_ID_FILE, MetricsLogger


def _record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "mfu": None}


def _log(metrics: MetricsLogger, steps, offset: float) -> None:
    for s in steps:
        metrics.log(_record(s, offset + s))


def _tb_losses(out_dir: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out_dir, "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


def _jsonl(out_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


RESUMED = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0), (8, 108.0)]


def test_tensorboard_resume_shows_each_step_once(tmp_path):
    pytest.importorskip("tensorboard")
    out = str(tmp_path)
    first = MetricsLogger(out, True, tensorboard=True)
    assert first._tb is not None
    _log(first, range(1, 7), 0.0)
    first.close()  # killed after step 6, last checkpoint at step 4

    from megablocks_ablate.train.metrics import truncate_jsonl

    truncate_jsonl(os.path.join(out, "metrics.jsonl"), 4)  # as Trainer.run does
    resumed = MetricsLogger(out, True, tensorboard=True, start_step=4)  # as _open_metrics
    _log(resumed, range(5, 9), 100.0)
    resumed.close()

    assert len(os.listdir(os.path.join(out, "tb"))) == 2  # one event file per start
    assert _tb_losses(out) == RESUMED
    assert _jsonl(out) == RESUMED


def test_tensorboard_restart_without_checkpoint_purges_all(tmp_path):
    """A run killed before its first checkpoint starts again at step 0."""
    pytest.importorskip("tensorboard")
    out = str(tmp_path)
    first = MetricsLogger(out, True, tensorboard=True)
    _log(first, range(1, 4), 0.0)
    first.close()
    again = MetricsLogger(out, True, tensorboard=True, start_step=0)
    _log(again, range(1, 3), 50.0)
    again.close()
    assert _tb_losses(out) == [(1, 51.0), (2, 52.0)]


def test_tensorboard_rollback_purges_redone_steps(tmp_path):
    pytest.importorskip("tensorboard")
    out = str(tmp_path)
    metrics = MetricsLogger(out, True, tensorboard=True)
    _log(metrics, range(1, 7), 0.0)
    metrics.rewind(4)  # nan_policy=rollback to the step-4 checkpoint
    _log(metrics, range(5, 9), 100.0)
    metrics.close()
    assert _tb_losses(out) == RESUMED
    assert _jsonl(out) == RESUMED


def test_disabled_rank_writes_nothing(tmp_path):
    metrics = MetricsLogger(str(tmp_path), False, tensorboard=True, wandb_project="p")
    metrics.log(_record(1, 1.0))
    metrics.rewind(0)
    metrics.close()
    assert os.listdir(tmp_path) == []


class _FakeRun:
    def __init__(self, run_id: str):
        self.id, self.logged, self.finished = run_id, [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def _fake_wandb(calls: list[dict]):
    fake = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(kwargs)
        return _FakeRun(kwargs.get("id") or f"new{len(calls)}")

    fake.init = init
    return fake


def test_wandb_run_id_saved_and_passed_on_resume(tmp_path, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    out = str(tmp_path)
    first = MetricsLogger(out, True, tensorboard=False, wandb_project="proj", run_name="r")
    _log(first, range(1, 3), 0.0)
    first.close()
    assert "id" not in calls[0] and calls[0]["resume"] == "allow"
    assert calls[0]["project"] == "proj" and calls[0]["name"] == "r"
    with open(os.path.join(out, WANDB_ID_FILE), encoding="utf-8") as f:
        assert f.read().strip() == "new1"

    second = MetricsLogger(out, True, tensorboard=False, wandb_project="proj", start_step=2)
    second.close()
    assert calls[1]["id"] == "new1" and calls[1]["resume"] == "allow"
    assert second._wandb.id == "new1"


def test_wandb_offline_resume_continues_the_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_SILENT": "true",
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    calls: list[dict] = []
    real_init = wandb.init

    def spy(**kwargs):
        calls.append(kwargs)
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    out = str(tmp_path / "run")
    os.makedirs(out)

    first = MetricsLogger(out, True, tensorboard=False, wandb_project="proj", config={"a": 1})
    first_id = wandb.run.id
    _log(first, range(1, 7), 0.0)
    first.close()
    with open(os.path.join(out, WANDB_ID_FILE), encoding="utf-8") as f:
        assert f.read().strip() == first_id

    second = MetricsLogger(out, True, tensorboard=False, wandb_project="proj", start_step=4)
    assert wandb.run.id == first_id
    _log(second, range(5, 9), 100.0)
    second.close()
    assert calls[1]["id"] == first_id and calls[1]["resume"] == "allow"
