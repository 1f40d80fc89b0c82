"""MetricsLogger across a resume: TensorBoard purges redone steps, W&B continues its run;
the MFU peak table and its overrides; the throughput meter syncs the device before timing."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.train import metrics as metrics_mod
from megablocks_ablate.train.metrics import (
    PEAK_ENV,
    WANDB_ID_FILE,
    MetricsLogger,
    ThroughputMeter,
    gpu_peak_tflops,
    peak_tflops,
)


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


# ---- MFU peak table -------------------------------------------------------------------

# torch.cuda.get_device_name() strings as NVIDIA reports them -> dense BF16 TFLOP/s
# (datasheet sparse figure / 2; see the table's comment in metrics.py).
KNOWN_GPUS = [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM5
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA H800", 989.0),
    ("NVIDIA H800 PCIe", 756.0),
    ("NVIDIA B200", 2250.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A800-SXM4-80GB", 312.0),
    ("NVIDIA A30", 165.0),
    ("NVIDIA A40", 149.7),
    ("NVIDIA A10", 125.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA RTX A6000", 154.8),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", 71.0),
]

# Unlisted, or a listed name's neighbour that must not borrow its figure.
UNKNOWN_GPUS = [
    "Tesla V100-SXM2-16GB",  # no BF16 tensor cores
    "NVIDIA A10G",  # not "A10"
    "NVIDIA H20",  # not "H200"
    "NVIDIA RTX 6000 Ada Generation",  # not "A6000"
    "NVIDIA GeForce RTX 3080",
    "Some Future GPU",
]


@pytest.mark.parametrize("name, peak", KNOWN_GPUS)
def test_peak_table_by_device_name(name, peak):
    assert gpu_peak_tflops(name) == peak


@pytest.mark.parametrize("name", UNKNOWN_GPUS)
def test_unlisted_gpu_has_no_peak(name):
    assert gpu_peak_tflops(name) is None


def _fake_cuda_name(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_peak_of_a_cuda_device_and_unknown_logged_once(monkeypatch, caplog):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    monkeypatch.setattr(metrics_mod, "_reported_unknown", set())
    cuda = torch.device("cuda", 0)
    _fake_cuda_name(monkeypatch, "NVIDIA H100 PCIe")
    assert peak_tflops(cuda, None) == 756.0
    _fake_cuda_name(monkeypatch, "Some Future GPU")
    with caplog.at_level("INFO", logger=metrics_mod.__name__):
        assert peak_tflops(cuda, None) is None
        assert peak_tflops(cuda, None) is None
    lines = [r.getMessage() for r in caplog.records if "Some Future GPU" in r.getMessage()]
    assert len(lines) == 1 and PEAK_ENV in lines[0] and "MFU is not reported" in lines[0]


def test_peak_overrides(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    _fake_cuda_name(monkeypatch, "NVIDIA H100 80GB HBM3")
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_tflops(cpu, None) is None  # CPU: no MFU unless told
    assert peak_tflops(cuda, None) == 989.0
    monkeypatch.setenv(PEAK_ENV, "700.5")
    assert peak_tflops(cuda, None) == 700.5  # the environment beats the table
    assert peak_tflops(cpu, None) == 700.5
    assert peak_tflops(cuda, 500.0) == 500.0  # the config beats the environment
    for bad in ("fast", "0", "-3", "inf", "nan"):
        monkeypatch.setenv(PEAK_ENV, bad)
        with pytest.raises(ConfigError, match=PEAK_ENV):
            peak_tflops(cuda, None)
    monkeypatch.delenv(PEAK_ENV)
    with pytest.raises(ConfigError, match="logging.peak_tflops"):
        peak_tflops(cuda, 0.0)


# ---- the meter times finished device work --------------------------------------------


class _Clock:
    """Stands in for the ``time`` module in metrics.py: perf_counter returns 0, 1, 2, ...
    seconds and notes each read in ``events``."""

    def __init__(self, events):
        self.events, self.t = events, -1.0

    def perf_counter(self):
        self.events.append("clock")
        self.t += 1.0
        return self.t


def _spy(monkeypatch, cuda_initialized=True):
    events: list = []
    monkeypatch.setattr(metrics_mod, "time", _Clock(events))
    monkeypatch.setattr(
        torch.cuda, "synchronize", lambda device=None: events.append(("sync", device))
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_initialized)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda_initialized)
    return events


def test_meter_syncs_the_cuda_device_before_each_clock_read(monkeypatch):
    events = _spy(monkeypatch)
    dev = torch.device("cuda", 1)
    meter = ThroughputMeter(6.0e9, 1000.0, 2, tokens_at_start=100, device=dev)
    record = meter.record(10, tokens=4100, loss=2.0, lr=1e-3, grad_norm=0.5)
    meter.rewind(2100)
    meter.elapsed_s()
    assert events == [("sync", dev), "clock"] * 4  # start, record, rewind, elapsed
    # 4000 tokens in the 1 s between the first two (synced) clock reads
    assert record["tokens_per_s"] == 4000.0
    assert record["tflops_per_device"] == pytest.approx(6.0e9 * 4000 / 2 / 1e12)
    assert record["mfu"] == pytest.approx(6.0e9 * 4000 / (1000.0e12 * 2), abs=1e-4)


def test_meter_default_device_syncs_only_when_cuda_is_in_use(monkeypatch):
    events = _spy(monkeypatch, cuda_initialized=True)
    ThroughputMeter(1.0, None, 1, 0).record(1, 10, 1.0, 1e-3, 0.1)  # today's trainer call
    assert events == [("sync", None), "clock"] * 2
    events = _spy(monkeypatch, cuda_initialized=False)
    ThroughputMeter(1.0, None, 1, 0).record(1, 10, 1.0, 1e-3, 0.1)
    assert events == ["clock", "clock"]


def test_meter_on_cpu_never_syncs(monkeypatch):
    events = _spy(monkeypatch, cuda_initialized=True)
    record = ThroughputMeter(1.0, None, 1, 0, device=torch.device("cpu")).record(
        1, 10, 1.0, 1e-3, 0.1
    )
    assert events == ["clock", "clock"] and record["mfu"] is None
