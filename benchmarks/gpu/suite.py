"""Run every GPU benchmark row, each in its own process with its own time slice.

    python benchmarks/gpu/suite.py --out DIR [--dry-run] [--budget-s 480] [--rows a,b]

Usually started by ``benchmarks/gpu_suite.sh``, which first finds a Python with a CUDA
torch. Rows run in order (``report.ROW_TITLES``); a failing, crashing or hanging row is
recorded and the suite goes on.

Time: the budget counts from ``--t0`` (the shell script's start, so setting up is
included). What is left when the runner starts, less a few seconds for the reports, is
shared out in proportion to each row's ``share``; a row may run until the end of its
own slice plus whatever the rows before it left unused, then its process group gets
SIGTERM, then SIGKILL, and it is recorded as failed (timeout). So the suite always
ends within the budget, and a hanging row costs no more than its own slice.

Output in DIR: ``rows/<row>.json`` (what the row wrote, plus exit code, time slice
and, on failure, the tail of its stderr), ``logs/<row>.out|.err``, ``summary.json``,
``benchmarks_gpu.md``. Large scratch files (checkpoints, data) go to ``--workdir``
(default: a temp dir, deleted at the end), never to DIR.

Exit code: 0 when every row that ran is ok or skipped; 1 when any of them failed (the
reports are written either way); 2 for a usage error. A target not met is a result,
not a failure: it shows as ``met: NO`` and does not change the exit code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from common import HERE, ROOT, write_json
from report import ROW_TITLES, write_reports

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.outputs import claim_output_dir

REPORT_RESERVE_S = 3.0  # kept back from the rows for writing the reports
KILL_GRACE_S = 5.0  # SIGTERM -> SIGKILL
MIN_SLICE_S = 2.0  # a row with less than this left is not started
STDERR_TAIL_LINES = 25


@dataclass
class RowSpec:
    name: str
    script: str
    share: float  # of the time budget, relative to the other rows
    args: list[str] = field(default_factory=list)  # a real run's arguments
    dry_args: list[str] = field(default_factory=list)  # with --dry-run: tiny sizes


DRY_TRAIN = ["--preset", "tiny_seed", "--model-override", "vocab_size=1024", "--steps", "5"]
DRY_TRAIN += ["--skip", "2"]
ROWS = [
    RowSpec("env", "env_info.py", 4),
    RowSpec("build_ext", "build_ext.py", 18),
    RowSpec("merge_kernels", "merge_kernels.py", 8, [], ["--params", "40000", "--reps", "1"]),
    RowSpec("triton_kernels", "triton_kernels.py", 14, [], ["--reps", "1", "--warmup", "0"]),
    RowSpec(
        "train_130m",
        "train_step.py",
        12,
        ["--name", "train_130m", "--preset", "130m_seed", "--data-cache", "{workdir}/data"],
        ["--name", "train_130m", *DRY_TRAIN, "--data-cache", "{workdir}/data"],
    ),
    RowSpec(
        "train_1.1b",
        "train_step.py",
        18,
        ["--name", "train_1.1b", "--preset", "1.1b_seed", "--target-mfu", "0.45"]
        + ["--data-cache", "{workdir}/data"],
        ["--name", "train_1.1b", *DRY_TRAIN, "--override", "distributed.parallel=fsdp"]
        + ["--variant", "ac_full:activation_checkpointing=full", "--variant-steps", "4"]
        + ["--target-mfu", "0.45", "--data-cache", "{workdir}/data"],
    ),
    RowSpec(
        "eval",
        "eval_rate.py",
        12,
        [],
        ["--presets", "tiny", "--tokens", "3000", "--rounds", "1", "--batch-tokens", "1024"],
    ),
    RowSpec(
        "merge_eval",
        "merge_eval.py",
        9,
        [],
        ["--preset", "tiny", "--units", "3", "--mixtures", "3", "--eval-tokens", "2000"]
        + ["--batch-tokens", "1024"],
    ),
    RowSpec("nccl", "nccl_allreduce.py", 5, [], ["--sizes-mb", "1", "--reps", "2"]),
]
assert [r.name for r in ROWS] == [n for n, _ in ROW_TITLES], "ROWS and report.ROW_TITLES differ"


def child_env(dry_run: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("MBA_NO_PROGRESS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if dry_run:
        # Triton kernels run in the interpreter on CPU tensors; no GPU is touched even
        # on a machine that has one, so a dry run measures nothing by construction.
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM the row's process group, then SIGKILL what is left after the grace."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: str, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "\n".join(f.read().splitlines()[-lines:])[-4000:]
    except OSError:
        return ""


def run_one(spec: RowSpec, args, workdir: str, env: dict, timeout: float) -> dict:
    rows_dir, logs_dir = os.path.join(args.out, "rows"), os.path.join(args.out, "logs")
    json_path = os.path.join(rows_dir, f"{spec.name}.json")
    if os.path.exists(json_path):
        os.remove(json_path)  # a crash must not leave an earlier run's "ok" behind
    extra = spec.dry_args if args.dry_run else spec.args
    extra = [a.replace("{workdir}", workdir) for a in extra]
    cmd = [sys.executable, os.path.join(HERE, spec.script), "--out", json_path]
    cmd += ["--workdir", os.path.join(workdir, spec.name)]
    cmd += (["--dry-run"] if args.dry_run else []) + extra
    out_log = os.path.join(logs_dir, f"{spec.name}.out")
    err_log = os.path.join(logs_dir, f"{spec.name}.err")
    base = {"row": spec.name, "dry_run": args.dry_run, "timeout_s": round(timeout, 1)}
    base["command"] = " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)
    if timeout < MIN_SLICE_S:
        return {
            **base,
            "status": "failed",
            "reason": f"timeout: {timeout:.1f} s left in the budget, not started",
            "exit_code": None,
        }
    t0 = time.monotonic()
    with open(out_log, "w") as out, open(err_log, "w") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True
        )
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
            rc = proc.returncode
    elapsed = round(time.monotonic() - t0, 2)
    res: dict = {}
    if os.path.isfile(json_path):
        try:
            with open(json_path, encoding="utf-8") as f:
                res = json.load(f)
        except json.JSONDecodeError:
            res = {}
    rec = {**base, **res, "exit_code": rc, "elapsed_s": elapsed}
    rec["logs"] = [os.path.relpath(p, args.out) for p in (out_log, err_log)]
    if timed_out:
        rec.update(status="failed", reason=f"timeout: killed after {elapsed:.0f} s (its slice)")
    elif rc != 0:
        last = _tail(err_log, 1)
        rec.update(status="failed", reason=f"exit code {rc}: {last}"[:300])
    elif not res:
        rec.update(status="failed", reason="exited 0 but wrote no result JSON")
    if rec["status"] == "failed":
        rec["stderr_tail"] = _tail(err_log)
    write_json(json_path, rec)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="results directory (rows/, logs/, summary)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no CUDA")
    ap.add_argument("--budget-s", type=float, default=480.0, help="total seconds (default 480)")
    ap.add_argument("--rows", default=None, help="comma-separated subset of rows (default: all)")
    ap.add_argument("--t0", type=float, default=None, help="epoch seconds the budget counts from")
    ap.add_argument("--workdir", default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--command", default=None, help="the command line to record")
    args = ap.parse_args()

    names = [r.name for r in ROWS]
    if args.rows:
        wanted = [x.strip() for x in args.rows.split(",") if x.strip()]
        unknown = [x for x in wanted if x not in names]
        if unknown:
            ap.error(f"--rows: unknown {unknown}; rows are {', '.join(names)}")
        specs = [r for r in ROWS if r.name in wanted]
    else:
        specs = list(ROWS)
    t0 = args.t0 if args.t0 is not None else time.time()
    args.out = os.path.abspath(args.out)
    try:  # a new directory, or an earlier suite run's (rerun rows into it); nothing else
        claim_output_dir(args.out, "gpu-suite", reuse=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.join(args.out, "rows"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    own_workdir = args.workdir is None
    workdir = args.workdir or tempfile.mkdtemp(prefix="mba-gpu-suite-")
    os.makedirs(workdir, exist_ok=True)
    env = child_env(args.dry_run)

    # Slices: what is left of the budget now, shared by `share`; cumulative deadlines
    # hand a fast row's unused time on to the next rows.
    start = time.time()
    available = t0 + args.budget_s - start - REPORT_RESERVE_S
    total_share = sum(r.share for r in specs)
    deadline = start
    results = []
    print(
        f"[gpu-suite] {len(specs)} rows, {max(available, 0):.0f} s for rows"
        f"{' (dry run)' if args.dry_run else ''}; results in {args.out}",
        file=sys.stderr,
        flush=True,
    )

    def meta(finished: bool) -> dict:
        failed = [r["row"] for r in results if r["status"] == "failed"]
        return {
            "suite": "gpu",
            "command": args.command
            or "bash benchmarks/gpu_suite.sh" + (" --dry-run" if args.dry_run else ""),
            "dry_run": args.dry_run,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "budget_s": args.budget_s,
            "elapsed_s": round(time.time() - t0, 1),
            "finished": finished,
            "rows_run": [r["row"] for r in results],
            "failed": failed,
            "exit_code": (1 if failed else 0) if finished else None,
        }

    for spec in specs:
        deadline += max(available, 0) * spec.share / total_share
        timeout = deadline - time.time()
        rec = run_one(spec, args, workdir, env, timeout)
        results.append(rec)
        extra = f" ({rec.get('reason')})" if rec["status"] != "ok" else ""
        print(
            f"[gpu-suite] {spec.name}: {rec['status']}{extra} in {rec.get('elapsed_s', 0)} s "
            f"of {timeout:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        # Reports after every row: if the whole command is killed from outside, what
        # has run so far is still summarised.
        write_reports(args.out, meta(finished=False))
    final = meta(finished=True)
    code = final["exit_code"]
    _, text = write_reports(args.out, final)
    print(text)
    print(f"\nwrote {args.out}/summary.json and {args.out}/benchmarks_gpu.md")
    if own_workdir and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
