"""`study run --cpu-workers N`: independent models trained and scored in worker processes.

Against the serial run of the same tiny study (the ``base`` fixture): scoring in two
workers gives the same rows to the last bits (the models are the same files); training
in two workers trains every model once, records each in the registry (a rerun trains
nothing) and scores within float rounding of the serial run (one thread per worker);
a diverged model stops the study naming it, as a serial run does.
"""

from __future__ import annotations

import os

import pytest
from runner_fixtures import rows, write_spec

from megablocks_ablate.ablate.runner import RunOptions, StudyRunner, resolve, run_study
from megablocks_ablate.ablate.runner.workers import threads_per_worker, use_workers
from megablocks_ablate.ablate.spec import StudySpec
from megablocks_ablate.errors import ConfigError

pytestmark = pytest.mark.integration  # spawned worker processes, whole studies


def _study(base, tmp_path, **changes) -> str:
    spec, root, _ = base
    return write_spec(
        str(tmp_path / "s.yaml"),
        spec,
        out_dir=str(tmp_path / "study"),
        seed={"checkpoint": os.path.join(str(root), "seed", "final")},
        **changes,
    )


def test_workers_only_on_one_cpu_process_and_threads_split():
    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert use_workers(2, 1, cpu) and not use_workers(1, 1, cpu)
    assert not use_workers(2, 2, cpu) and not use_workers(2, 1, cuda)
    threads = torch.get_num_threads()
    assert threads_per_worker(1) == threads
    assert threads_per_worker(10**6) == 1
    with pytest.raises(ConfigError, match="cpu_workers: expected an integer >= 1, got 0"):
        RunOptions(cpu_workers=0)


def test_bad_cpu_workers_is_one_line_exit_2(capsys, tmp_path):
    from megablocks_ablate.cli import main

    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as e:
            main(["study", "run", str(tmp_path / "none.yaml"), "--cpu-workers", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--cpu-workers: expected an integer >= 1" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_scoring_in_workers_writes_the_serial_rows(base, tmp_path):
    spec, root, _ = base
    path = _study(base, tmp_path)
    run_study(resolve(StudySpec.load(path)), RunOptions(registry=spec["out_dir"], cpu_workers=2))
    got = rows(str(tmp_path / "study" / "results.sqlite"))
    want = rows(os.path.join(spec["out_dir"], "results.sqlite"))
    assert set(got) == set(want)
    for k, (nll, tok) in want.items():
        assert got[k][1] == tok and got[k][0] == pytest.approx(nll, rel=1e-9), k


def test_training_in_workers_trains_each_model_once(base, tmp_path, caplog):
    spec, root, _ = base
    path = _study(base, tmp_path)
    with caplog.at_level("INFO", logger="megablocks_ablate"):
        run_study(resolve(StudySpec.load(path)), RunOptions(cpu_workers=2))
    log = caplog.text
    assert "[train] 5 models in 2 worker processes" in log
    assert sum(f"[train] {i}/5 done:" in log for i in range(1, 6)) == 5
    assert "[eval] scoring in 2 worker processes" in log
    got = rows(str(tmp_path / "study" / "results.sqlite"))
    want = rows(os.path.join(spec["out_dir"], "results.sqlite"))
    assert set(got) == set(want)
    for k, (nll, tok) in want.items():  # one thread per worker: rounding, nothing more
        assert got[k][1] == tok and got[k][0] == pytest.approx(nll, rel=2e-3), k
    # every model is in the registry: a rerun has nothing to train or score
    plan = StudyRunner(resolve(StudySpec.load(path)), RunOptions()).plan()
    assert plan.missing() == []


def test_a_diverged_model_in_a_worker_stops_the_study_naming_it(base, tmp_path, capsys):
    from megablocks_ablate.cli import main

    spec, _, _ = base
    unit = dict(spec["unit"])
    unit["overrides"] = [
        *unit["overrides"],
        "optimizer.lr=1e6",
        "schedule.warmup_steps=0",
        "schedule.warmup_fraction=0",
    ]
    path = _study(base, tmp_path, unit=unit)
    assert main(["study", "run", path, "--cpu-workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "unit model " in err and "diverged" in err and "Traceback" not in err
    assert "models already trained are kept" in err
    assert not os.path.exists(str(tmp_path / "study" / "results.sqlite"))


def test_killing_the_run_ends_its_workers_and_a_rerun_resumes(base, tmp_path):
    """SIGKILL to the `study run` process alone: its workers exit within seconds (they
    do not train on for nobody), and a rerun finishes with the serial run's rows."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    spec, _, _ = base
    path = _study(base, tmp_path)
    env = dict(os.environ, MBA_NO_PROGRESS="1", MBA_TRAIN_STEP_DELAY="0.3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "megablocks_ablate", "study", "run", path, "--cpu-workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 120
    workers: list[psutil.Process] = []
    while len(workers) < 2:  # both workers started and training
        assert proc.poll() is None and time.time() < deadline
        workers = psutil.Process(proc.pid).children()
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, [p.pid for p in alive]
    run_study(resolve(StudySpec.load(path)), RunOptions(cpu_workers=2))
    got = rows(str(tmp_path / "study" / "results.sqlite"))
    want = rows(os.path.join(spec["out_dir"], "results.sqlite"))
    assert set(got) == set(want)
    for k, (nll, tok) in want.items():
        assert got[k][1] == tok and got[k][0] == pytest.approx(nll, rel=2e-3), k
