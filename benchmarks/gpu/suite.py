"""Run every GPU benchmark row, each in its own process under its own ``timeout``.

    python benchmarks/gpu/suite.py --out DIR [--dry-run] [--budget-s 480] [--rows a,b]

Usually started by ``benchmarks/gpu_suite.sh``, which first finds a Python with a CUDA
torch. Rows run in order (``rows.ROWS``, the same order as ``report.ROW_TITLES``); a
failing, crashing or hanging row is recorded and the suite goes on.

Preflight first: ``preflight.py`` (its own ``timeout``) prints one screen of what the
machine has and which rows will run or be skipped and why, and writes
``DIR/preflight.json``; a row it marks SKIP is recorded as skipped with that reason and
not started. The CUDA extension is built by the ``build_ext`` row, before any timed row;
when it fails, merge_kernels skips its CUDA half with the build's reason. A preflight
that crashes or times out is recorded, and every row is then started as usual.

Time: the budget counts from ``--t0`` (the shell script's start, so setting up is
included). What is left after the preflight, less a few seconds for the reports, is
shared out in proportion to the rows' ``budget_s`` (rows.py; in the default 480 s run
each row gets about its budget); a row may run until the end of its own slice plus
whatever the rows before it left unused. Each row runs as ``timeout -k 5 SLICE python
...``: at the end of its slice its process group gets SIGTERM, 5 s later SIGKILL (the
runner also kills the group itself should ``timeout`` be missing or stuck), and it is
recorded as failed (timeout). So the suite always ends within the budget, and a
hanging row costs no more than its own slice.

Output in DIR: ``preflight.json``, ``rows/<row>.json`` (what the row wrote, plus exit
code, time slice and, on failure, the tail of its stderr; written as each row ends),
``logs/<row>.out|.err`` (and ``logs/preflight.out``), ``summary.json``,
``benchmarks_gpu.md`` (both rewritten after every row). Large scratch files
(checkpoints, data) go to ``--workdir`` (default: a temp dir, deleted at the end),
never to DIR.

Exit code: 0 when every row that ran is ok or skipped; 1 when any of them failed (the
reports are written either way); 2 for a usage error. A speed target not met is a
result, not a failure: it shows as ``met: NO`` and does not change the exit code. A
correctness check is a failure: the rows that compare against a reference
(merge_kernels, triton_kernels, attention, ce_chunks, eval) write ``status: failed`` with their figures
and exit 1 when a result is wrong beyond its stated tolerance.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import HERE, ROOT, ROW_TIMEOUT_ENV, write_json
from report import ROW_TITLES, write_reports
from rows import PREFLIGHT_TIMEOUT_S, ROWS, RowSpec

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.outputs import claim_output_dir

REPORT_RESERVE_S = 3.0  # kept back from the rows for writing the reports
KILL_GRACE_S = 5.0  # SIGTERM -> SIGKILL (timeout -k)
MIN_SLICE_S = 2.0  # a row with less than this left is not started
STDERR_TAIL_LINES = 25
TIMEOUT_EXIT_CODES = (124, 137)  # timeout(1): TERM sent (124), or KILL needed (128 + 9)

assert [r.name for r in ROWS] == [n for n, _ in ROW_TITLES], (
    "rows.ROWS and report.ROW_TITLES differ"
)


def row_command(spec: RowSpec, args, workdir: str, json_path: str, timeout: float) -> list[str]:
    """The row's command line: ``timeout -k 5 SLICE python benchmarks/gpu/<row>.py ...``
    (without the ``timeout`` prefix where that command does not exist)."""
    extra = spec.dry_args if args.dry_run else spec.args
    extra = [a.replace("{workdir}", workdir) for a in extra]
    cmd = [sys.executable, os.path.join(HERE, spec.script), "--out", json_path]
    cmd += ["--workdir", os.path.join(workdir, spec.name)]
    cmd += (["--dry-run"] if args.dry_run else []) + extra
    if spec.uses_ext and getattr(args, "ext_status", None):
        cmd += ["--ext-status", args.ext_status]
    tool = shutil.which("timeout")
    if tool is None:
        return cmd
    return [tool, "-k", f"{KILL_GRACE_S:g}", "-s", "TERM", f"{timeout:.1f}", *cmd]


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


def skipped_by_preflight(spec: RowSpec, args, reason: str) -> dict:
    rec = {"row": spec.name, "status": "skipped", "reason": f"preflight: {reason}"}
    rec.update(dry_run=args.dry_run, preflight=True, exit_code=None, elapsed_s=0.0)
    rec["timeout_s"] = 0.0
    write_json(os.path.join(args.out, "rows", f"{spec.name}.json"), rec)
    return rec


def run_one(spec: RowSpec, args, workdir: str, env: dict, timeout: float) -> dict:
    rows_dir, logs_dir = os.path.join(args.out, "rows"), os.path.join(args.out, "logs")
    json_path = os.path.join(rows_dir, f"{spec.name}.json")
    if os.path.exists(json_path):
        os.remove(json_path)  # a crash must not leave an earlier run's "ok" behind
    cmd = row_command(spec, args, workdir, json_path, timeout)
    out_log = os.path.join(logs_dir, f"{spec.name}.out")
    err_log = os.path.join(logs_dir, f"{spec.name}.err")
    base = {"row": spec.name, "dry_run": args.dry_run, "timeout_s": round(timeout, 1)}
    base["command"] = " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)
    if timeout < MIN_SLICE_S:
        rec = {
            **base,
            "status": "failed",
            "reason": f"timeout: {timeout:.1f} s left in the budget, not started",
            "exit_code": None,
        }
        write_json(json_path, rec)
        return rec
    t0 = time.monotonic()
    with open(out_log, "w") as out, open(err_log, "w") as err:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**env, ROW_TIMEOUT_ENV: f"{timeout:.1f}"},
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        timed_out = False
        try:  # `timeout` ends the row; this is the backstop should it not
            rc = proc.wait(timeout=timeout + KILL_GRACE_S + 3.0)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
            rc = proc.returncode
    elapsed = round(time.monotonic() - t0, 2)
    timed_out = timed_out or (rc in TIMEOUT_EXIT_CODES and elapsed >= timeout - 1.0)
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
    elif rc != 0 and res.get("status") == "failed" and res.get("reason"):
        pass  # a check that failed loudly: its JSON says why, with the figures
    elif rc != 0:
        last = _tail(err_log, 1)
        rec.update(status="failed", reason=f"exit code {rc}: {last}"[:300])
    elif not res:
        rec.update(status="failed", reason="exited 0 but wrote no result JSON")
    if rec["status"] == "failed":
        rec["stderr_tail"] = _tail(err_log)
    write_json(json_path, rec)
    return rec


def run_preflight(args, specs: list[RowSpec], env: dict, limit: float) -> dict[str, dict]:
    """Run preflight.py (printing its screen), write DIR/preflight.json; the per-row
    decisions by row name ({} when it crashed or timed out: every row then runs)."""
    path = os.path.join(args.out, "preflight.json")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, os.path.join(HERE, "preflight.py"), "--json", path]
    cmd += ["--rows", ",".join(s.name for s in specs)] + (["--dry-run"] if args.dry_run else [])
    tool = shutil.which("timeout")
    if tool:
        cmd = [tool, "-k", "3", f"{max(limit, 5.0):.0f}", *cmd]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit + 10
        )
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, rc = str(e.stdout or "") + str(e.stderr or ""), 124
    with open(os.path.join(args.out, "logs", "preflight.out"), "w", encoding="utf-8") as f:
        f.write(output)
    print(output.rstrip(), flush=True)
    took = time.monotonic() - t0
    print(f"[gpu-suite] preflight: {took:.1f} s of {limit:.0f} s", file=sys.stderr, flush=True)
    if rc != 0 or not os.path.isfile(path):
        why = "timed out" if rc in TIMEOUT_EXIT_CODES else f"exit code {rc}"
        print(f"[gpu-suite] preflight failed ({why}): starting every row", file=sys.stderr)
        write_json(path, {"preflight": 1, "failed": why, "output_tail": output[-3000:]})
        return {}
    with open(path, encoding="utf-8") as f:
        return {d["row"]: d for d in json.load(f).get("rows", [])}


def _ext_built() -> bool:
    return bool(glob.glob(os.path.join(ROOT, "megablocks_ablate", "_C_cuda*.so")))


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
        if (
            not args.dry_run
            and "build_ext" not in wanted
            and any(r.uses_ext for r in specs)
            and not _ext_built()
        ):  # a fresh machine: build before the rows that measure the extension
            print("[gpu-suite] _C_cuda is not built: adding the build_ext row", file=sys.stderr)
            specs = [r for r in ROWS if r.name in wanted or r.name == "build_ext"]
    else:
        specs = list(ROWS)
    t0 = args.t0 if args.t0 is not None else time.time()
    args.out = os.path.abspath(args.out)
    args.ext_status = None
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

    left = t0 + args.budget_s - time.time()
    decisions = run_preflight(args, specs, env, min(PREFLIGHT_TIMEOUT_S, 0.3 * left))
    to_run = [r for r in specs if decisions.get(r.name, {}).get("run", True)]

    # Slices: what is left of the budget now, shared by the rows' budgets; cumulative
    # deadlines hand a fast row's unused time on to the next rows.
    start = time.time()
    available = t0 + args.budget_s - start - REPORT_RESERVE_S
    total_budget = sum(r.budget_s for r in to_run) or 1.0
    deadline = start
    results: list[dict] = []
    print(
        f"[gpu-suite] {len(to_run)} of {len(specs)} rows to run, {max(available, 0):.0f} s "
        f"for them{' (dry run)' if args.dry_run else ''}; results in {args.out}",
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
            "rows_run": [r["row"] for r in results if not r.get("preflight")],
            "skipped_by_preflight": [r["row"] for r in results if r.get("preflight")],
            "failed": failed,
            "exit_code": (1 if failed else 0) if finished else None,
        }

    for spec in specs:
        decision = decisions.get(spec.name, {})
        if not decision.get("run", True):
            rec = skipped_by_preflight(spec, args, decision.get("reason") or "?")
            timeout = 0.0
        else:
            deadline += max(available, 0) * spec.budget_s / total_budget
            timeout = deadline - time.time()
            rec = run_one(spec, args, workdir, env, timeout)
        results.append(rec)
        if spec.name == "build_ext" and rec["status"] != "ok":
            args.ext_status = f"{rec['status']}: {rec.get('reason')}"[:300]
        extra = f" ({rec.get('reason')})" if rec["status"] != "ok" else ""
        took = "" if rec.get("preflight") else f" in {rec.get('elapsed_s', 0)} s of {timeout:.0f} s"
        print(f"[gpu-suite] {spec.name}: {rec['status']}{extra}{took}", file=sys.stderr, flush=True)
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
