"""A training run directory where a checkpoint is expected: its final/, or a refusal."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from megablocks_ablate.checkpoint import (
    Lineage,
    is_run_dir,
    latest_run_checkpoint,
    load_model_checkpoint,
    resolve_checkpoint_dir,
    save_model_checkpoint,
)
from megablocks_ablate.checkpoint import run_dir as rd
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.train import state as st


def _checkpoint(path: str) -> str:
    save_model_checkpoint(
        path, {"w": torch.arange(6.0).reshape(2, 3)}, {"hidden_size": 3}, Lineage(kind="seed")
    )
    return path


def _run(root, *, steps=(40, 80), finished=True) -> str:
    """A run directory laid out as the trainer leaves it (final/ + COMPLETE.json through
    train.state.save_final when ``finished``)."""
    run = os.path.join(str(root), "run")
    os.makedirs(run)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write("seed: 0\n")
    for step in steps:
        _checkpoint(st.step_dir(run, step))
    if finished:
        state, config, lineage = load_model_checkpoint(_checkpoint(str(root / "src")))
        st.save_final(run, state, config, lineage, {"step": max(steps, default=0)})
    return run


def _snapshot(path: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, n), path) for d, _, ns in os.walk(path) for n in ns
    )


def test_names_agree_with_the_trainer():
    assert rd.RUN_COMPLETE_FILE == st.COMPLETE_FILE
    assert rd.RUN_FINAL_DIR == st.FINAL_DIR
    assert rd.RUN_CHECKPOINTS_DIR == st.CHECKPOINTS_DIR
    assert rd.STEP_DIR_RE.pattern == st._STEP_RE.pattern


def test_checkpoint_dir_is_returned_unchanged(tmp_path, caplog):
    ckpt = _checkpoint(str(tmp_path / "ckpt"))
    with caplog.at_level(logging.INFO, logger="megablocks_ablate"):
        assert resolve_checkpoint_dir(ckpt) == ckpt
    assert not is_run_dir(ckpt) and not caplog.records
    # a step checkpoint and a run's final/ are checkpoints too
    run = _run(tmp_path)
    step = st.step_dir(run, 40)
    assert resolve_checkpoint_dir(step) == step
    final = os.path.join(run, "final")
    assert resolve_checkpoint_dir(final) == final


def test_complete_run_means_its_final(tmp_path, caplog):
    run = _run(tmp_path)
    assert st.is_complete(run) and is_run_dir(run)
    with caplog.at_level(logging.INFO, logger="megablocks_ablate"):
        got = resolve_checkpoint_dir(run)
    assert got == os.path.join(run, "final")
    assert [r.getMessage() for r in caplog.records] == [f"using {got} (the run's final checkpoint)"]
    assert resolve_checkpoint_dir(run + os.sep) == got  # a trailing slash too
    assert load_model_checkpoint(got)[1] == {"hidden_size": 3}


def test_complete_run_without_checkpoints_left(tmp_path):
    run = _run(tmp_path, steps=())
    assert resolve_checkpoint_dir(run) == os.path.join(run, "final")


def test_unfinished_run_names_its_latest_checkpoint(tmp_path):
    run = _run(tmp_path, steps=(40, 80, 120), finished=False)
    os.makedirs(os.path.join(run, "checkpoints", ".step_00000160.x.tmp"))  # half-written
    os.makedirs(os.path.join(run, "checkpoints", "step_1"))  # not a step name
    before = _snapshot(str(tmp_path))
    latest = st.step_dir(run, 120)
    assert latest_run_checkpoint(run) == latest == st.list_checkpoints(run)[-1][1]
    with pytest.raises(DataFormatError) as e:
        resolve_checkpoint_dir(run)
    assert str(e.value) == (
        f"{run} is a training run that has not finished (no final/); its latest "
        f"checkpoint is {latest}: pass that, or finish the run"
    )
    assert "\n" not in str(e.value)
    assert _snapshot(str(tmp_path)) == before  # nothing written


def test_run_killed_before_its_marker_is_unfinished(tmp_path):
    run = _run(tmp_path)
    os.remove(os.path.join(run, "COMPLETE.json"))  # final/ written, COMPLETE.json not yet
    assert not st.is_complete(run)
    with pytest.raises(DataFormatError, match=r"has not finished \(no COMPLETE.json\); its "):
        resolve_checkpoint_dir(run)
    shutil.rmtree(os.path.join(run, "final"))
    with open(os.path.join(run, "COMPLETE.json"), "w") as f:
        f.write("{}")
    with pytest.raises(DataFormatError, match=r"\(no final/\); its latest checkpoint is "):
        resolve_checkpoint_dir(run)


def test_run_without_any_checkpoint(tmp_path):
    run = _run(tmp_path, steps=(), finished=False)
    # a run that only started: config.yaml and the output marker `train` claims it with
    from megablocks_ablate.utils.outputs import write_marker

    assert not is_run_dir(run)  # config.yaml alone is not proof of a run
    write_marker(run, "train-run")
    assert is_run_dir(run)
    with pytest.raises(DataFormatError, match=r"has not finished \(no final/\) and has no "):
        resolve_checkpoint_dir(run)
    assert latest_run_checkpoint(run) is None


def test_non_directories_are_left_to_the_reader(tmp_path):
    missing = str(tmp_path / "missing")
    assert resolve_checkpoint_dir(missing) == missing
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"x")
    assert resolve_checkpoint_dir(str(a_file)) == str(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_checkpoint_dir(str(empty)) == str(empty)
    # ...which refuses them as before
    with pytest.raises(DataFormatError, match="checkpoint directory does not exist"):
        load_model_checkpoint(resolve_checkpoint_dir(missing))
    with pytest.raises(DataFormatError, match="missing checkpoint file"):
        load_model_checkpoint(resolve_checkpoint_dir(str(empty)))
