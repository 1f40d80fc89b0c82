"""benchmarks/gpu_suite.sh --dry-run: every row runs on CPU, failures stay local.

The dry run goes through the same shell script, runner and row drivers as a real GPU
run (tiny sizes, CPU, Triton interpreter), so a broken driver shows here rather than
in the few minutes a GPU machine is lent for.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # runs the whole suite: ~10 subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [
    "env",
    "build_ext",
    "merge_kernels",
    "triton_kernels",
    "attention",
    "ce_chunks",
    "train_130m",
    "train_1.1b",
    "train_1.1b_compile",
    "train_1.1b_mb8",
    "eval",
    "merge_eval",
    "nccl",
]
# Rows that may be skipped on a machine without CUDA tooling (nvcc for the compile check).
MAY_SKIP = {"build_ext", "nccl"}
SECTIONS = ["## GPU suite", "## GPU training step", "## GPU merge kernels", "## GPU Triton kernels"]
SECTIONS += ["## GPU evaluation", "## GPU merge-eval rate", "## GPU NCCL all-reduce"]
SECTIONS += ["## GPU attention backends", "## GPU cross-entropy chunking"]


def run_suite(out, *args, timeout=300, **env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MBA_GPU_SUITE_")}
    env.update(PYTHON=sys.executable, **env_extra)
    cmd = ["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--dry-run", "--out", out]
    return subprocess.run(
        cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def load(out, name):
    with open(os.path.join(out, name), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gpu-dry"))
    proc = run_suite(out)
    return out, proc


def test_every_row_runs_ok_in_the_dry_run(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ROWS:
        row = load(out, f"rows/{name}.json")
        assert row["row"] == name and row["dry_run"] is True
        if row["status"] == "skipped":
            assert name in MAY_SKIP and row["reason"], row
        else:
            assert row["status"] == "ok", (name, row.get("reason"), row.get("stderr_tail"))
            assert row["key"]["text"], row
        if row.get("preflight"):  # skipped by the preflight: never started
            assert row["status"] == "skipped" and row["exit_code"] is None
        else:
            assert row["exit_code"] == 0 and row["timeout_s"] > 0
            assert row["command"].split()[0].endswith("timeout")  # its own timeout


def test_the_preflight_comes_first_and_says_what_runs(dry_run):
    out, proc = dry_run
    assert proc.stdout.index("== GPU suite preflight (dry run) ==") < proc.stdout.index("row ")
    pre = load(out, "preflight.json")
    assert pre["dry_run"] is True and [r["row"] for r in pre["rows"]] == ROWS
    assert pre["torch"]["importable"] and "modules" in pre and "nvcc" in pre
    for r in pre["rows"]:
        assert r["run"] or r["row"] in MAY_SKIP, r
    if not pre["cuda"]["available"]:
        assert "no CUDA:" in proc.stdout


@pytest.mark.skipif(
    __import__("torch").cuda.is_available() or os.path.exists("/dev/nvidia0"),
    reason="a real run on a machine without a GPU",
)
def test_a_real_run_without_cuda_skips_the_gpu_rows_cleanly(tmp_path):
    out = str(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MBA_GPU_SUITE_")}
    env["PYTHON"] = sys.executable
    cmd = ["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--out", out]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the env row fails, saying why
    assert "no CUDA:" in proc.stdout and "GPU rows skipped" in proc.stdout
    env_row = load(out, "rows/env.json")
    assert env_row["status"] == "failed" and "is_available() is False" in env_row["reason"]
    for name in ROWS[1:]:
        row = load(out, f"rows/{name}.json")
        assert row["status"] == "skipped" and row["preflight"] is True
        assert row["reason"].startswith("preflight: no CUDA"), row
    summary = load(out, "summary.json")
    assert summary["failed"] == ["env"] and summary["skipped_by_preflight"] == ROWS[1:]


def test_summary_and_markdown_cover_every_row(dry_run):
    out, proc = dry_run
    summary = load(out, "summary.json")
    assert [r["row"] for r in summary["rows"]] == ROWS
    assert summary["dry_run"] is True and summary["exit_code"] == 0 and summary["failed"] == []
    assert summary["elapsed_s"] < summary["budget_s"]
    for r in summary["rows"]:
        assert r["status"] in ("ok", "skipped") and r["title"]
    md = open(os.path.join(out, "benchmarks_gpu.md"), encoding="utf-8").read()
    for title in SECTIONS:
        assert f"\n{title}\n" in f"\n{md}", title
    assert "**Dry run**" in md
    for name in ROWS:  # the terminal table names every row
        assert name in proc.stdout


def test_a_failing_row_is_recorded_and_the_rest_still_run(tmp_path):
    out = str(tmp_path)
    proc = run_suite(out, "--rows", "env,build_ext,nccl", MBA_GPU_SUITE_FAIL="build_ext")
    assert proc.returncode == 1, proc.stderr[-3000:]  # any failed row -> exit code 1
    failed = load(out, "rows/build_ext.json")
    assert failed["status"] == "failed" and failed["exit_code"] == 1
    assert failed["reason"].startswith("exit code 1")
    assert "forced failure" in failed["stderr_tail"]
    for name in ("env", "nccl"):  # before and after the failure
        assert load(out, f"rows/{name}.json")["status"] == "ok"
    summary = load(out, "summary.json")
    status = {r["row"]: r["status"] for r in summary["rows"]}
    assert status["build_ext"] == "failed" and status["nccl"] == "ok"
    assert status["eval"] == "not run" and summary["failed"] == ["build_ext"]
    assert summary["exit_code"] == 1
    md = open(os.path.join(out, "benchmarks_gpu.md"), encoding="utf-8").read()
    assert "failed: exit code 1" in md


def test_a_failed_build_is_named_to_merge_kernels_and_the_suite_goes_on(tmp_path):
    out = str(tmp_path)
    proc = run_suite(out, "--rows", "build_ext,merge_kernels", MBA_GPU_SUITE_FAIL="build_ext")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert load(out, "rows/build_ext.json")["status"] == "failed"
    row = load(out, "rows/merge_kernels.json")
    assert row["status"] == "ok", row
    assert "--ext-status failed: exit code 1" in row["command"]


def test_a_crashed_preflight_is_recorded_and_every_row_still_runs(tmp_path):
    out = str(tmp_path)
    proc = run_suite(out, "--rows", "env", MBA_GPU_SUITE_FAIL="preflight")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preflight failed (exit code 1): starting every row" in proc.stderr
    assert "forced failure of the preflight" in load(out, "preflight.json")["output_tail"]
    assert load(out, "rows/env.json")["status"] == "ok"


def test_a_hanging_row_is_killed_at_the_end_of_its_slice(tmp_path):
    out = str(tmp_path)
    budget = 14  # room for the start-up on a loaded machine; the row gets most of it
    proc = run_suite(
        out, "--rows", "build_ext", "--budget-s", str(budget), MBA_GPU_SUITE_HANG="build_ext"
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    row = load(out, "rows/build_ext.json")
    assert row["status"] == "failed" and row["reason"].startswith("timeout")
    assert "hanging on purpose" in row["stderr_tail"]
    assert row["elapsed_s"] <= budget
    assert load(out, "summary.json")["elapsed_s"] <= budget + 2


def test_unknown_rows_are_a_usage_error(tmp_path):
    proc = run_suite(str(tmp_path), "--rows", "nope")
    assert proc.returncode == 2 and "unknown" in proc.stderr


def test_a_users_directory_is_refused_and_a_suite_directory_is_rerun_into(tmp_path):
    mine = tmp_path / "mine"
    (mine / "rows").mkdir(parents=True)
    (mine / "rows" / "env.json").write_text("my own notes\n")
    proc = run_suite(str(mine), "--rows", "env")
    assert proc.returncode == 2 and "files megablocks-ablate did not write" in proc.stderr
    assert (mine / "rows" / "env.json").read_text() == "my own notes\n"
    assert sorted(os.listdir(mine)) == ["rows"]
    out = str(tmp_path / "suite")
    for _ in range(2):  # the second run reruns a row into the first run's directory
        proc = run_suite(out, "--rows", "env")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert load(out, "rows/env.json")["status"] == "ok"
