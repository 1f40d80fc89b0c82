"""Distributed evaluation: 2 gloo ranks under torchrun and mpiexec equal 1 rank bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # 2-process torchrun / mpiexec runs

WORKER = os.path.join(os.path.dirname(__file__), "_eval_worker.py")
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def single(eval_dir, sp_model_path, tmp_path_factory):
    """The one-process result, computed in this process with the same thread count."""
    import torch

    sys.path.insert(0, os.path.dirname(WORKER))
    try:
        from _eval_worker import run
    finally:
        sys.path.pop(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(eval_dir, sp_model_path, str(tmp_path_factory.mktemp("cache1")))
    finally:
        torch.set_num_threads(threads)


def _check(out_dir, single):
    results = []
    for r in range(2):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            data = json.load(f)
        assert data["world"] == 2
        results.append(data["result"])
    assert results[0] == results[1] == single


def _run(cmd, env, timeout=120):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_torchrun_two_ranks_equal_one(eval_dir, sp_model_path, tmp_path, single, launcher_env):
    # --standalone: the agent picks a free rendezvous port itself
    cmd = [
        os.path.join(BIN, "torchrun"),
        "--standalone",
        "--nproc-per-node",
        "2",
        WORKER,
        eval_dir,
        sp_model_path,
        str(tmp_path / "cache"),
        str(tmp_path),
    ]
    _run(cmd, launcher_env)
    _check(str(tmp_path), single)


@pytest.mark.skipif(
    shutil.which("mpiexec", path=BIN) is None, reason="mpiexec not installed (pip install mpich)"
)
def test_mpiexec_two_ranks_equal_one(eval_dir, sp_model_path, tmp_path, single, launcher_env):
    # rank 0 picks a free port and broadcasts it over MPI (train/distributed.py)
    cmd = [
        os.path.join(BIN, "mpiexec"),
        "-n",
        "2",
        sys.executable,
        WORKER,
        eval_dir,
        sp_model_path,
        str(tmp_path / "cache"),
        str(tmp_path),
    ]
    _run(cmd, launcher_env)
    _check(str(tmp_path), single)
