"""Slurm without a cluster: host-list expansion and the multi-node sbatch template.

Host lists are expanded by ``scontrol show hostnames`` when it is on PATH and by the
Python parser otherwise; both are tested here, ``scontrol`` as a fake script on PATH.
The template is run by bash with fake ``scontrol`` and ``srun``; the train command it
hands to srun is then run with ``--print-config``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.train import distributed
from megablocks_ablate.train.distributed import expand_hostlist, first_slurm_host, parse_hostlist

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "tools", "launch")
SBATCH = os.path.join(LAUNCH, "slurm_multi_node.sbatch")

# expression -> what `scontrol show hostnames` prints (Slurm's order, no sorting)
HOSTLISTS = [
    ("node1", ["node1"]),
    ("a,b,c", ["a", "b", "c"]),
    ("node[1-4]", ["node1", "node2", "node3", "node4"]),
    ("node[001-003]", ["node001", "node002", "node003"]),
    ("node[08-11]", ["node08", "node09", "node10", "node11"]),
    ("node[9-11]", ["node9", "node10", "node11"]),
    ("node[1-3,7,10-11]", ["node1", "node2", "node3", "node7", "node10", "node11"]),
    ("gpu[07-09,12],cpu1", ["gpu07", "gpu08", "gpu09", "gpu12", "cpu1"]),
    (
        "rack[1-2]-node[01-04]",
        [f"rack{r}-node{n:02d}" for r in (1, 2) for n in range(1, 5)],
    ),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("a[1-2],b,c[3-4]-x", ["a1", "a2", "b", "c3-x", "c4-x"]),
    ("c[3-4]-ib.cluster.org", ["c3-ib.cluster.org", "c4-ib.cluster.org"]),
    ("login.example.com,gpu-a100-[1-2]", ["login.example.com", "gpu-a100-1", "gpu-a100-2"]),
    ("a-b[1]", ["a-b1"]),
    ("n[1-2] m3\tm4\n", ["n1", "n2", "m3", "m4"]),  # white space separates, as in Slurm
    ("n1,,n2,", ["n1", "n2"]),  # empty items are skipped, as in Slurm
    ("n[1-2],n[2-3]", ["n1", "n2", "n2", "n3"]),  # duplicates stay
    ("r[1,3]s[2]", ["r1s2", "r3s2"]),
    # three groups: Slurm loops the middle group outermost, then the first, then the last
    (
        "a[1-2]b[1-2]c[1-2]",
        ["a1b1c1", "a1b1c2", "a2b1c1", "a2b1c2", "a1b2c1", "a1b2c2", "a2b2c1", "a2b2c2"],
    ),
]

BAD = [
    "",
    " , ",
    "node[1-4",
    "node1-4]",
    "node[[1-2]]",
    "node[5-3]",
    "node[]",
    "node[1,,2]",
    "node[a-b]",
    "node[1-]",
    "node[-1]",
    "ok1,node[2",
]


def _write_exe(path, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return str(path)


@pytest.fixture
def no_scontrol(tmp_path, monkeypatch):
    """PATH without any scontrol (an empty directory)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def _fake_scontrol(tmp_path, monkeypatch, body: str):
    """A ``scontrol`` shell script first on PATH; it records its arguments."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    args_file = tmp_path / "scontrol.args"
    _write_exe(bin_dir / "scontrol", f'#!/bin/sh\nprintf "%s\\n" "$@" > "{args_file}"\n{body}\n')
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ.get("PATH", ""))
    return args_file


@pytest.mark.parametrize("expr,hosts", HOSTLISTS)
def test_parse_hostlist(expr, hosts):
    assert parse_hostlist(expr) == hosts


@pytest.mark.parametrize("expr,hosts", HOSTLISTS)
def test_expand_hostlist_without_scontrol(expr, hosts, no_scontrol):
    assert expand_hostlist(expr) == hosts


def test_first_slurm_host(no_scontrol):
    assert first_slurm_host("rack[1-2]-node[01-04]") == "rack1-node01"  # was "rack1"
    assert first_slurm_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_slurm_host("node3,node4") == "node3"
    assert first_slurm_host("node[001-010]") == "node001"


@pytest.mark.parametrize("expr", BAD)
def test_invalid_hostlists_raise_config_error(expr, no_scontrol):
    with pytest.raises(ConfigError) as e:
        expand_hostlist(expr)
    assert repr(expr) in str(e.value)  # the message names the expression


def test_huge_range_is_refused():
    with pytest.raises(ConfigError, match="more than"):
        parse_hostlist("n[0-99999999]")


def test_scontrol_is_preferred(tmp_path, monkeypatch):
    args_file = _fake_scontrol(tmp_path, monkeypatch, "printf 'sc-a\\nsc-b\\n'")
    assert expand_hostlist("rack[1-2]-node[01-04]") == ["sc-a", "sc-b"]
    assert args_file.read_text().split("\n")[:3] == ["show", "hostnames", "rack[1-2]-node[01-04]"]
    assert first_slurm_host("anything[1-2]") == "sc-a"
    # use_scontrol=False and parse_hostlist never ask it
    assert expand_hostlist("n[1-2]", use_scontrol=False) == ["n1", "n2"]
    args_file.unlink()
    assert parse_hostlist("n[1-2]") == ["n1", "n2"] and not args_file.exists()


@pytest.mark.parametrize(
    "body",
    [
        "echo 'scontrol: error: Invalid hostlist' >&2; exit 1",  # fails
        "exit 0",  # prints nothing (how an invalid list comes out of scontrol)
        "exec sleep 30",  # hangs past the timeout
        "kill -9 $$",  # dies
    ],
    ids=["exit-1", "no-output", "timeout", "killed"],
)
def test_scontrol_failure_falls_back_to_the_parser(body, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "_SCONTROL_TIMEOUT_S", 0.5)
    args_file = _fake_scontrol(tmp_path, monkeypatch, body)
    assert expand_hostlist("rack[1-2]-node[01-02]") == [
        "rack1-node01",
        "rack1-node02",
        "rack2-node01",
        "rack2-node02",
    ]
    assert args_file.exists()  # it was asked first
    with pytest.raises(ConfigError, match=re.escape("'node[5-3]'")):
        expand_hostlist("node[5-3]")  # still a ConfigError when the parser rejects it too


def test_scontrol_not_executable_falls_back(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("not a program\n")  # not executable: which() skips it
    monkeypatch.setenv("PATH", str(bin_dir))
    assert expand_hostlist("x[1-2]") == ["x1", "x2"]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="no real scontrol on PATH")
def test_parser_agrees_with_real_scontrol():
    for expr, _ in HOSTLISTS:
        real = subprocess.run(
            ["scontrol", "show", "hostnames", expr], capture_output=True, text=True, timeout=10
        )
        assert real.stdout.split() == parse_hostlist(expr), expr


def test_rendezvous_host_from_the_environment(monkeypatch, no_scontrol):
    for var in ("MASTER_ADDR", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        distributed._slurm_rendezvous_host()
    monkeypatch.setenv("SLURM_NODELIST", "old[3-4]")
    assert distributed._slurm_rendezvous_host() == "old3"
    monkeypatch.setenv("SLURM_JOB_NODELIST", "rack[1-2]-node[01-04]")
    assert distributed._slurm_rendezvous_host() == "rack1-node01"
    monkeypatch.setenv("SLURM_STEP_NODELIST", "rack2-node[03-04]")  # a step on fewer nodes
    assert distributed._slurm_rendezvous_host() == "rack2-node03"
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    assert distributed._slurm_rendezvous_host() == "10.0.0.7"
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "bad[1-")
    with pytest.raises(ConfigError, match=r"SLURM_STEP_NODELIST: .*'bad\[1-'"):
        distributed._slurm_rendezvous_host()


# -- the sbatch template ------------------------------------------------------------


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize(
    "script", sorted(f for f in os.listdir(LAUNCH) if f.endswith((".sh", ".sbatch")))
)
def test_launch_scripts_parse(script):
    r = subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _sbatch_directives(path) -> dict:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def test_sbatch_template_directives():
    d = _sbatch_directives(SBATCH)
    assert int(d["nodes"]) >= 2
    # one process per GPU: srun starts ntasks-per-node processes on each node
    assert d["ntasks-per-node"] == d["gpus-per-node"]
    assert os.access(SBATCH, os.X_OK)


def _run_sbatch(tmp_path, args, with_scontrol=True, **env_extra):
    """Run the template as the batch step would, with fake srun (and scontrol)."""
    bin_dir = tmp_path / "sbatch-bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.json"
    _write_exe(
        bin_dir / "srun",
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "keep = ('MASTER_ADDR', 'MASTER_PORT', 'OMP_NUM_THREADS')\n"
        f"with open({str(record)!r}, 'w') as f:\n"
        "    json.dump({'argv': sys.argv[1:],\n"
        "               'env': {k: os.environ[k] for k in keep if k in os.environ}}, f)\n",
    )
    if with_scontrol:
        _write_exe(
            bin_dir / "scontrol",
            '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 2\n'
            "printf 'rack1-node01\\nrack1-node02\\nrack2-node01\\n'\n",
        )
    env = {
        "PATH": str(bin_dir),  # bash builtins only, besides srun, scontrol and $PYTHON
        "HOME": str(tmp_path),
        "PYTHON": sys.executable,
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "rack[1-2]-node[01-02]",
        "SLURM_CPUS_PER_TASK": "6",
        "SLURM_NNODES": "2",
        **env_extra,
    }
    r = subprocess.run(
        [shutil.which("bash"), SBATCH, *args],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    rec = json.loads(record.read_text()) if record.exists() else None
    return r, rec


def _split_srun(argv):
    """srun's own options (before the program), and the program's argv."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1
    return argv[:i], argv[i:]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_sbatch_template_runs_a_valid_train_command(tmp_path):
    out_dir = str(tmp_path / "runs" / "seed")
    overrides = ["data.manifest=/shared/seed_data", f"out_dir={out_dir}", "optimizer.lr=2e-4"]
    r, rec = _run_sbatch(tmp_path, ["configs/train/tiny_seed.yaml", *overrides])
    assert r.returncode == 0, r.stdout + r.stderr
    srun_opts, prog = _split_srun(rec["argv"])
    assert "--mpi=none" in srun_opts  # a site's pmix default must not select the MPI path
    assert prog[:4] == [sys.executable, "-m", "megablocks_ablate", "train"]
    assert prog[4:] == ["--config", "configs/train/tiny_seed.yaml", *overrides]
    # the rendezvous the package reads: first host of the node list, port from the job id
    assert rec["env"] == {
        "MASTER_ADDR": "rack1-node01",
        "MASTER_PORT": str(15000 + 123456 % 20000),
        "OMP_NUM_THREADS": "6",
    }

    # the command srun would start on every GPU: a valid train invocation
    check = subprocess.run(
        [*prog, "--print-config"],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "MBA_NO_PROGRESS": "1",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"out_dir: {out_dir}" in check.stdout
    assert "lr: 0.0002" in check.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_sbatch_template_without_scontrol_leaves_the_rendezvous_to_the_package(tmp_path):
    r, rec = _run_sbatch(tmp_path, ["cfg.yaml"], with_scontrol=False, MASTER_PORT="29400")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MASTER_ADDR" not in rec["env"]  # init_distributed derives it from the node list
    assert rec["env"]["MASTER_PORT"] == "29400"  # a MASTER_PORT given is kept


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_sbatch_template_needs_a_config(tmp_path):
    r, rec = _run_sbatch(tmp_path, [])
    assert r.returncode != 0 and rec is None
    assert "usage" in r.stderr
