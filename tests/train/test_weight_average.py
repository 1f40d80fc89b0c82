"""weight_average: final/ holds the tail mean or the EMA of the weights a run passed
through, checked against the run's own step checkpoints (the same trajectory: averaging
never changes training); resumption is bit-exact; settings are checked and recorded."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import tiny_overrides

from megablocks_ablate.checkpoint import load_model_checkpoint
from megablocks_ablate.errors import ConfigError, DataFormatError
from megablocks_ablate.train import state as st
from megablocks_ablate.train.config import TrainConfig, WeightAverageConfig
from megablocks_ablate.train.trainer import train
from megablocks_ablate.train.weight_average import start_step

STEPS = 8


def _run(manifest, out_dir, **extra):
    extra = {"kind": "seq", "data.mixture": "[biology, physics-0001]", **extra}
    return train(TrainConfig.load(None, tiny_overrides(manifest, out_dir, **extra)))


def _final(out_dir):
    return load_model_checkpoint(os.path.join(out_dir, st.FINAL_DIR))[0]


@pytest.fixture(scope="module")
def every_step(train_manifest, tmp_path_factory):
    """A plain run keeping a checkpoint after every step: ``{step: weights}``."""
    out = str(tmp_path_factory.mktemp("wa") / "plain")
    _run(train_manifest, out, **{"checkpoint.every": 1, "checkpoint.keep_last": STEPS})
    weights = {s: load_model_checkpoint(p)[0] for s, p in st.list_checkpoints(out)}
    weights[STEPS] = _final(out)
    assert sorted(weights) == list(range(1, STEPS + 1))
    return weights


def test_start_step_is_inside_the_run():
    assert start_step(WeightAverageConfig(start_fraction=0.5), 8) == 5
    assert start_step(WeightAverageConfig(start_fraction=0.0), 8) == 1
    assert start_step(WeightAverageConfig(start_fraction=0.99), 8) == 8
    assert start_step(WeightAverageConfig(start_fraction=0.99), 1) == 1


def test_tail_is_the_mean_of_the_last_steps(every_step, train_manifest, tmp_path):
    out = str(tmp_path / "tail")
    summary = _run(
        train_manifest, out, **{"weight_average.kind": "tail", "weight_average.start_fraction": 0.5}
    )
    got = _final(out)
    for name, value in got.items():
        expected = torch.stack([every_step[s][name] for s in range(5, STEPS + 1)]).mean(0)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(got["embed.weight"], every_step[STEPS]["embed.weight"])
    # training itself is untouched: the same losses as the plain run's
    assert summary["final_loss"] is not None
    complete = json.load(open(os.path.join(out, st.COMPLETE_FILE)))
    record = {"kind": "tail", "start_step": 5, "steps_averaged": 4}
    assert complete["weight_average"] == record
    lineage = json.load(open(os.path.join(out, st.FINAL_DIR, "lineage.json")))
    assert lineage["extra"]["weight_average"] == record


def test_ema_follows_its_recursion(every_step, train_manifest, tmp_path):
    out = str(tmp_path / "ema")
    _run(
        train_manifest,
        out,
        **{
            "weight_average.kind": "ema",
            "weight_average.start_fraction": 0.25,
            "weight_average.ema_decay": 0.7,
        },
    )
    got = _final(out)
    for name, value in got.items():
        expected = every_step[3][name].clone()
        for s in range(4, STEPS + 1):
            expected = 0.7 * expected + 0.3 * every_step[s][name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
    complete = json.load(open(os.path.join(out, st.COMPLETE_FILE)))
    assert complete["weight_average"]["ema_decay"] == 0.7
    assert complete["weight_average"]["steps_averaged"] == 6


def test_none_writes_the_last_weights_and_records_nothing(every_step, train_manifest, tmp_path):
    out = str(tmp_path / "none")
    _run(train_manifest, out, **{"weight_average.ema_decay": 0.5})  # kind none: ignored
    for name, value in _final(out).items():
        assert torch.equal(value, every_step[STEPS][name]), name
    assert "weight_average" not in json.load(open(os.path.join(out, st.COMPLETE_FILE)))


def test_resume_mid_average_is_bitwise_identical(train_manifest, tmp_path):
    """A checkpoint inside the averaged span holds the average; resuming from it gives
    the uninterrupted run's final/ bit for bit."""
    ov = {
        "weight_average.kind": "tail",
        "weight_average.start_fraction": 0.25,
        "checkpoint.every": 3,
        "checkpoint.keep_last": 5,
    }
    full = str(tmp_path / "full")
    _run(train_manifest, full, **ov)
    step6 = st.step_dir(full, 6)
    state = st.read_trainer_state(step6)
    assert state["weight_average_steps"] == 4  # steps 3..6
    assert st.AVERAGE_FILE in state["sha256"]
    resumed = str(tmp_path / "resumed")
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, st.FINAL_DIR))
    os.remove(os.path.join(resumed, st.COMPLETE_FILE))
    summary = _run(train_manifest, resumed, **ov)
    assert summary["start_step"] == 6
    a, b = _final(full), _final(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_checkpoint_without_its_average_is_refused(train_manifest, tmp_path):
    ov = {
        "weight_average.kind": "tail",
        "weight_average.start_fraction": 0.25,
        "checkpoint.every": 6,
    }
    out = str(tmp_path / "run")
    _run(train_manifest, out, **ov)
    shutil.rmtree(os.path.join(out, st.FINAL_DIR))
    os.remove(os.path.join(out, st.COMPLETE_FILE))
    step6 = st.step_dir(out, 6)
    path = os.path.join(step6, st.STATE_FILE)
    state = json.load(open(path))
    del state["sha256"][st.AVERAGE_FILE]  # as if written without it
    json.dump(state, open(path, "w"))
    with pytest.raises(DataFormatError, match="averaged steps but holds no average"):
        _run(train_manifest, out, **ov)


def test_resume_under_other_average_settings_is_refused(train_manifest, tmp_path):
    out = str(tmp_path / "run")
    _run(train_manifest, out, **{"checkpoint.every": 6})
    shutil.rmtree(os.path.join(out, st.FINAL_DIR))
    os.remove(os.path.join(out, st.COMPLETE_FILE))
    with pytest.raises(DataFormatError, match=r"weight_average\.kind: checkpoint 'none'"):
        _run(train_manifest, out, **{"checkpoint.every": 6, "weight_average.kind": "ema"})


def test_a_run_recorded_before_the_field_counts_as_none():
    now = TrainConfig().to_dict()
    without = {k: v for k, v in now.items() if k != "weight_average"}
    assert st.trajectory_differences(without, now) == []
    tail = TrainConfig.load(None, ["weight_average.kind=tail"]).to_dict()
    diffs = st.trajectory_differences(without, tail)
    assert diffs[0] == ("weight_average.kind", "none", "tail")


@pytest.mark.parametrize(
    "override, message",
    [
        ("weight_average.start_fraction=1.0", r"start_fraction: must be in \[0, 1\)"),
        ("weight_average.ema_decay=1.0", r"ema_decay: must be in \(0, 1\)"),
        ("weight_average.kind=swa", "weight_average.kind"),
    ],
)
def test_bad_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(None, [override])
