"""Data parallelism: the same loss curve from 1 process and from 2 gloo processes.

2 ranks x 2 micro batches of 2 sequences and 1 rank x 4 micro batches of 2 read the
same global batch of 8, so the losses must agree (to float reassociation). Launched
by torchrun, by mpiexec (MPICH from PyPI, mpi4py rendezvous) and as a simulated Slurm
job step (SLURM_* variables), with DDP and with FSDP2; FSDP2 reduce-scattering after
every micro batch trains the same weights as once per step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import PYTHON, subprocess_env, tiny_overrides

from megablocks_ablate.model.config import ModelConfig
from megablocks_ablate.train.distributed import detect_launcher, first_slurm_host

pytestmark = pytest.mark.integration  # 2-process torchrun / mpiexec / Slurm runs

BIN = os.path.dirname(PYTHON)
TRAIN = ["-m", "megablocks_ablate", "train"]


def _overrides(manifest, out, **extra):
    return tiny_overrides(
        manifest, out, micro_batch=2, train_tokens=256 * 4, **{"data.unit": "biology-0001"}, **extra
    )


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f]


def _run(cmd, env=None, timeout=120):
    r = subprocess.run(
        cmd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr  # log lines are on stderr


@pytest.fixture(scope="module")
def reference(train_manifest, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dp") / "single")
    _run([PYTHON, *TRAIN, *_overrides(train_manifest, out)])
    return _losses(out)


def _check(reference, out, stdout, launcher, world=2):
    assert f"[rank 0] launcher {launcher}: {world} rank(s)" in stdout
    assert "[rank 1] launcher" not in stdout  # info lines from rank 0 only, by default
    got = _losses(out)
    assert len(got) == len(reference) == 4
    assert max(abs(a - b) for a, b in zip(got, reference)) < 1e-5, (got, reference)


def test_torchrun_ddp_matches_single_process(reference, train_manifest, tmp_path):
    out = str(tmp_path / "ddp")
    stdout = _run(
        [
            os.path.join(BIN, "torchrun"),
            "--standalone",
            "--nproc-per-node",
            "2",
            *TRAIN,
            *_overrides(train_manifest, out),
        ]
    )
    _check(reference, out, stdout, "torchrun")


@pytest.mark.skipif(
    shutil.which("mpiexec", path=BIN) is None,
    reason="mpiexec missing: pip install -e .[dev] installs mpich",
)
def test_mpiexec_ddp_matches_single_process(reference, train_manifest, tmp_path):
    out = str(tmp_path / "mpi")
    stdout = _run(
        [os.path.join(BIN, "mpiexec"), "-n", "2", PYTHON, *TRAIN, *_overrides(train_manifest, out)]
    )
    _check(reference, out, stdout, "mpi")


def test_torchrun_fsdp2_matches_single_process(reference, train_manifest, tmp_path):
    out = str(tmp_path / "fsdp")
    stdout = _run(
        [
            os.path.join(BIN, "torchrun"),
            "--standalone",
            "--nproc-per-node",
            "2",
            *TRAIN,
            *_overrides(
                train_manifest, out, **{"distributed.parallel": "fsdp", "checkpoint.every": 2}
            ),
        ]
    )
    _check(reference, out, stdout, "torchrun")
    # the step-2 checkpoint gathered from the shards holds every full tensor
    from megablocks_ablate.train.state import load_train_checkpoint, step_dir

    ckpt = load_train_checkpoint(step_dir(out, 2))
    assert ckpt["model"]["embed.weight"].shape == (512, 64)
    assert ckpt["optim"]["state"]["embed.weight"]["exp_avg"].shape == (512, 64)
    assert ckpt["trainer"]["world_size"] == 2 and len(ckpt["rng"]) == 2


def test_torchrun_fsdp2_reduce_every_micro_batch_matches_default(train_manifest, tmp_path):
    """``distributed.fsdp_reduce_every_micro_batch`` (2 ranks x 2 micro batches per step):
    the trained weights equal the default's (one reduce-scatter per step) to fp32
    rounding, and the run records the option with its config."""
    from megablocks_ablate.checkpoint import load_model_checkpoint
    from megablocks_ablate.train.state import FINAL_DIR, read_run_config

    torchrun = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", "2", *TRAIN]
    weights, logs = {}, {}
    for every in (False, True):
        out = str(tmp_path / f"every-{every}")
        extra = {"distributed.parallel": "fsdp", "distributed.fsdp_reduce_every_micro_batch": every}
        logs[every] = _run([*torchrun, *_overrides(train_manifest, out, **extra)])
        assert read_run_config(out)["distributed"]["fsdp_reduce_every_micro_batch"] is every
        weights[every] = load_model_checkpoint(os.path.join(out, FINAL_DIR))[0]
    assert "gradients reduced in fp32 (once per step)" in logs[False]
    assert "gradients reduced in fp32 (every micro batch)" in logs[True]
    torch.manual_seed(1234)  # the run's seed: its initial weights
    initial = ModelConfig.from_preset("tiny", ["vocab_size=512"]).build().state_dict()
    assert set(weights[True]) == set(weights[False]) == set(initial)
    for name, w in weights[False].items():
        torch.testing.assert_close(weights[True][name], w, rtol=1e-5, atol=1e-6)
    # training moved the weights far more than that tolerance: a real comparison
    assert max((w - initial[n]).abs().max().item() for n, w in weights[False].items()) > 1e-3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_pair(reference, train_manifest, out: str, nodelist: str, **extra_env) -> None:
    """Two ranks with the variables srun sets (no srun needed); losses as one process."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = subprocess_env(
            SLURM_PROCID=str(rank),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(rank),
            SLURM_JOB_NODELIST=nodelist,
            SLURM_JOB_ID="1",
            MASTER_PORT=str(port),
            **extra_env,
        )
        for k in (
            "RANK",
            "WORLD_SIZE",
            "PMI_SIZE",
            "OMPI_COMM_WORLD_SIZE",
            "SLURM_STEP_NODELIST",
            "SLURM_NODELIST",
        ):
            env.pop(k, None)
        if nodelist != "localhost":
            env.pop("MASTER_ADDR", None)
        procs.append(
            subprocess.Popen(
                [PYTHON, *TRAIN, *_overrides(train_manifest, out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    _check(reference, out, outputs[0], "slurm")


def test_slurm_job_step_matches_single_process(reference, train_manifest, tmp_path):
    _slurm_pair(reference, train_manifest, str(tmp_path / "slurm"), "localhost")


def test_slurm_bracketed_nodelist_rendezvous(reference, train_manifest, tmp_path):
    """No MASTER_ADDR: the host comes from a two-group node list via ``scontrol``.

    A fake ``scontrol`` on PATH says the list's first host is ``localhost``, so the two
    ranks meet only if init_distributed expands ``rack[1-2]-node[01-04]`` through it.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    asked = tmp_path / "asked"
    fake = bin_dir / "scontrol"
    fake.write_text(
        f'#!/bin/sh\necho "$*" >> "{asked}"\n'
        '[ "$1 $2 $3" = "show hostnames rack[1-2]-node[01-04]" ] || exit 1\n'
        "printf 'localhost\\nrack1-node02\\n'\n"
    )
    fake.chmod(0o755)
    _slurm_pair(
        reference,
        train_manifest,
        str(tmp_path / "slurm-racks"),
        "rack[1-2]-node[01-04]",
        PATH=str(bin_dir) + os.pathsep + os.environ.get("PATH", ""),
    )
    assert asked.read_text().splitlines() == ["show hostnames rack[1-2]-node[01-04]"] * 2


def test_first_slurm_host():
    assert first_slurm_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_slurm_host("node3,node4") == "node3"
    assert first_slurm_host("a-b[1]") == "a-b1"


def test_detect_launcher():
    assert detect_launcher({"RANK": "0", "WORLD_SIZE": "2", "PMI_SIZE": "2"}) == "torchrun"
    assert detect_launcher({"PMI_SIZE": "2", "PMI_RANK": "0"}) == "mpi"
    assert detect_launcher({"OMPI_COMM_WORLD_SIZE": "4"}) == "mpi"
    assert detect_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == "slurm"
    assert detect_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == "single"
    assert detect_launcher({}) == "single"


def test_torchrun_fsdp2_weight_average_matches_single_process(train_manifest, tmp_path):
    """``weight_average`` over FSDP2 shards (2 ranks): final/ equals the single-process
    run's average; the step checkpoint holds the full averaged tensors; resuming from it
    gives the uninterrupted run's final/ (the average restored into the shards)."""
    from megablocks_ablate.checkpoint import load_model_checkpoint
    from megablocks_ablate.train import state as st

    extra = {
        "weight_average.kind": "tail",
        "weight_average.start_fraction": 0.25,  # steps 2..4
        "checkpoint.every": 3,
    }
    single, fsdp = str(tmp_path / "single"), str(tmp_path / "fsdp")
    _run([PYTHON, *TRAIN, *_overrides(train_manifest, single, **extra)])
    torchrun = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", "2", *TRAIN]
    fsdp_over = _overrides(train_manifest, fsdp, **{"distributed.parallel": "fsdp", **extra})
    _run([*torchrun, *fsdp_over])
    a = load_model_checkpoint(os.path.join(single, st.FINAL_DIR))[0]
    b = load_model_checkpoint(os.path.join(fsdp, st.FINAL_DIR))[0]
    for name, w in a.items():
        torch.testing.assert_close(b[name], w, rtol=1e-5, atol=1e-6, msg=name)
    ckpt = st.load_train_checkpoint(st.step_dir(fsdp, 3))
    assert ckpt["trainer"]["weight_average_steps"] == 2
    assert ckpt["average"]["embed.weight"].shape == (512, 64)
    shutil.rmtree(os.path.join(fsdp, st.FINAL_DIR))
    os.remove(os.path.join(fsdp, st.COMPLETE_FILE))
    log = _run([*torchrun, *fsdp_over])
    assert "resuming" in log and "from step 3" in log
    c = load_model_checkpoint(os.path.join(fsdp, st.FINAL_DIR))[0]
    for name, w in b.items():
        torch.testing.assert_close(c[name], w, rtol=0, atol=0, msg=name)
