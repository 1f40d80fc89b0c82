"""A finished run is compared, not assumed: `train` into a run directory holding
COMPLETE.json and final/ reuses it only when its recorded config matches the request on
the fields a resume is checked on (state.TRAJECTORY_FIELDS); otherwise it refuses with
the fields that differ, and the directory is left byte for byte as it was."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
from conftest import tiny_overrides, tree_sha256

from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.train import state as st
from megablocks_ablate.train.config import TrainConfig
from megablocks_ablate.train.trainer import train

UNIT = "physics-0002"
SETTINGS = dict(kind="unit", train_tokens=256 * 2, **{"data.unit": UNIT, "checkpoint.every": 1})


@pytest.fixture(scope="module")
def finished(train_manifest, tmp_path_factory):
    """A finished two-step unit run (a step checkpoint kept beside final/)."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    summary = train(TrainConfig.load(None, tiny_overrides(train_manifest, out, **SETTINGS)))
    assert st.is_complete(out) and summary["steps"] == 2
    return out


def _args(manifest: str, out: str, *extra: str) -> list[str]:
    return ["train", *tiny_overrides(manifest, out, **SETTINGS), *extra]


def test_same_settings_reuse_the_run_and_change_nothing(finished, train_manifest, caplog):
    before = tree_sha256(finished)
    caplog.set_level(logging.INFO, logger="megablocks_ablate")
    assert cli_main(_args(train_manifest, finished)) == 0
    assert any("already complete, nothing to do" in r.getMessage() for r in caplog.records)
    cfg = TrainConfig.load(None, tiny_overrides(train_manifest, finished, **SETTINGS))
    assert train(cfg) == {"out_dir": finished, "skipped": True}
    assert tree_sha256(finished) == before


@pytest.mark.parametrize(
    "override, shown",
    [
        (f"train_tokens={256 * 4}", "train_tokens: recorded 512 vs now 1024"),
        ("data.unit=physics-0003", "data.unit: recorded 'physics-0002' vs now 'physics-0003'"),
        ("optimizer.lr=0.01", "optimizer.lr: recorded 0.003 vs now 0.01"),
        ("seed=7", "seed: recorded 1234 vs now 7"),
    ],
)
def test_other_settings_are_refused_naming_the_fields(
    finished, train_manifest, capsys, override, shown
):
    before = tree_sha256(finished)
    capsys.readouterr()
    assert cli_main(_args(train_manifest, finished, override)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {finished}: "), err
    assert "finished run trained with other settings" in err and shown in err
    assert os.path.join(finished, st.CONFIG_FILE) in err and "Traceback" not in err
    assert tree_sha256(finished) == before


def test_two_fields_are_both_named(finished, train_manifest, capsys):
    before = tree_sha256(finished)
    capsys.readouterr()
    assert cli_main(_args(train_manifest, finished, "optimizer.lr=0.01", "seq_len=64")) == 2
    err = capsys.readouterr().err
    assert "seq_len: recorded 32 vs now 64" in err and "optimizer.lr: recorded 0.003" in err
    assert tree_sha256(finished) == before


# settings that do not define the trajectory, and one that does, for the comparison below
_OVERRIDES = [
    "logging.every=5",
    "logging.progress=true",
    "checkpoint.every=7",
    "checkpoint.keep_last=4",
    "micro_batch=2",
    "nan_policy=skip",
    "out_dir=elsewhere/{unit}",
    "optimizer.lr=0.01",
    "schedule.warmup_steps=1",
]


@pytest.mark.parametrize("override", _OVERRIDES)
def test_finished_runs_are_compared_as_interrupted_ones_are(finished, train_manifest, override):
    """A finished run is reused exactly when an interrupted one would resume: the same
    comparison (state.check_compatible against its step checkpoint) decides both."""
    cfg = TrainConfig.load(None, tiny_overrides(train_manifest, finished, **SETTINGS))
    now = cfg.replace([override]).to_dict()
    saved = st.read_trainer_state(st.list_checkpoints(finished)[-1][1])["config"]
    try:
        st.check_compatible(saved, now, "ckpt")
        resumes = True
    except DataFormatError:
        resumes = False
    try:
        st.check_complete(finished, now)
        reused = True
    except DataFormatError:
        reused = False
    assert reused == resumes
    assert reused == (override.split("=")[0] not in ("optimizer.lr", "schedule.warmup_steps"))


def test_other_logging_reuses_the_run(finished, train_manifest):
    before = tree_sha256(finished)
    extra = ("logging.every=5", "checkpoint.every=7", "micro_batch=2", "logging.tensorboard=true")
    assert cli_main(_args(train_manifest, finished, *extra)) == 0
    assert tree_sha256(finished) == before


def test_an_old_record_without_init_optimizer_counts_as_fresh(finished, train_manifest, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(finished, run)
    path = os.path.join(run, st.CONFIG_FILE)
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if not line.startswith("init_optimizer:")]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    cfg = TrainConfig.load(None, tiny_overrides(train_manifest, run, **SETTINGS))
    st.check_complete(run, cfg.to_dict())  # reused, as an old checkpoint resumes


@pytest.mark.parametrize(
    "damage, named, why",
    [
        ("truncate-complete", st.COMPLETE_FILE, "invalid JSON"),
        ("no-sha-complete", st.COMPLETE_FILE, "no valid sha256"),
        ("remove-config", st.CONFIG_FILE, "missing"),
        ("garble-config", st.CONFIG_FILE, "invalid YAML"),
        ("list-config", st.CONFIG_FILE, "expected a mapping"),
    ],
)
def test_a_damaged_record_is_refused_naming_the_file(
    finished, train_manifest, tmp_path, capsys, damage, named, why
):
    run = str(tmp_path / "run")
    shutil.copytree(finished, run)
    complete, config = os.path.join(run, st.COMPLETE_FILE), os.path.join(run, st.CONFIG_FILE)
    if damage == "truncate-complete":
        with open(complete, "r+b") as f:
            f.truncate(10)
    elif damage == "no-sha-complete":
        with open(complete, "w", encoding="utf-8") as f:
            f.write('{"step": 2}')
    elif damage == "remove-config":
        os.remove(config)
    elif damage == "garble-config":
        with open(config, "a", encoding="utf-8") as f:
            f.write("seed: [unclosed\n")
    else:
        with open(config, "w", encoding="utf-8") as f:
            f.write("- a list\n")
    before = tree_sha256(run)
    capsys.readouterr()
    assert cli_main(_args(train_manifest, run)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {os.path.join(run, named)}: ") and why in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert tree_sha256(run) == before
