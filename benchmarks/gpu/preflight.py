"""GPU suite preflight: what this machine has, and which rows will run or be skipped, and why.

    python benchmarks/gpu/preflight.py [--dry-run] [--rows a,b] [--json PATH]

Prints one screen: torch and its CUDA build; CUDA available, each GPU's name and free
memory; nvcc's version and whether its CUDA major matches torch's; ninja, Python.h,
setuptools; every module the rows import, importable or not; then one line per row,
RUN or SKIP with the reason (and what a missing optional module changes). ``--json``
writes the same findings as JSON: the suite runner (``suite.py``) runs this first,
writes ``DIR/preflight.json`` and skips the rows marked SKIP there without starting
them. Only the standard library is imported at the top, so a missing or broken torch is
reported, not crashed on. Exit code 0 whatever it finds (2: usage error).
``MBA_GPU_SUITE_FAIL=preflight`` makes it crash (to test that the runner then starts
every row).

What each row needs is in ``rows.py``; :func:`decide` turns the findings into the
decisions and is a pure function (tested on CPU with made-up findings).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from rows import ROWS, RowSpec  # noqa: E402

DISTRIBUTIONS = {"yaml": "pyyaml", "flash_attn": "flash-attn"}
# What a run without an optional module does instead.
WITHOUT = {
    "flash_attn": "SDPA attention",
    "flash_attn_interface": "FA3 not measured",
    "transformers": "ours only, no ratio",
    "triton": "reference kernels",
    "ninja": "nvcc method only",
}


def _run_out(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout + r.stderr).strip() if r.returncode == 0 else None


def _major(version: str | None) -> int | None:
    m = re.match(r"(\d+)", version or "")
    return int(m.group(1)) if m else None


def _module(name: str) -> dict:
    """Import ``name``: {"importable", "version", "error"}."""
    try:
        mod = importlib.import_module(name)
    except BaseException as e:  # ImportError, or a broken build's OSError/RuntimeError
        if isinstance(e, KeyboardInterrupt):
            raise
        return {"importable": False, "version": None, "error": f"{type(e).__name__}: {e}"[:300]}
    version = getattr(mod, "__version__", None)
    if not isinstance(version, str):
        try:
            version = importlib.metadata.version(DISTRIBUTIONS.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            version = None
    return {"importable": True, "version": version, "error": None}


def _torch_and_cuda() -> tuple[dict, dict]:
    torch_info: dict[str, Any] = {"importable": False, "version": None, "cuda_build": None}
    cuda: dict[str, Any] = {"available": False, "device_count": 0, "devices": [], "why_not": None}
    try:
        import torch
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        torch_info["error"] = f"{type(e).__name__}: {e}"[:300]
        cuda["why_not"] = "torch does not import"
        return torch_info, cuda
    torch_info.update(importable=True, version=torch.__version__, cuda_build=torch.version.cuda)
    dist = getattr(torch, "distributed", None)
    torch_info["nccl"] = bool(dist and dist.is_available() and dist.is_nccl_available())
    if torch.version.cuda is None:
        cuda["why_not"] = f"torch {torch.__version__} is a CPU-only build"
        return torch_info, cuda
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        cuda["why_not"] = "CUDA_VISIBLE_DEVICES is empty (a dry run hides the GPUs)"
        return torch_info, cuda
    try:
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    except Exception as e:
        available, count = False, 0
        cuda["error"] = f"{type(e).__name__}: {e}"[:300]
    if not available or count == 0:
        cuda["why_not"] = "torch.cuda.is_available() is False (no GPU or no driver)"
        return torch_info, cuda
    cuda.update(available=True, device_count=count)
    try:
        v = torch._C._cuda_getDriverVersion()  # e.g. 12080
        cuda["driver_cuda"] = f"{v // 1000}.{v % 1000 // 10}"
    except Exception:
        cuda["driver_cuda"] = None
    for i in range(count):
        p = torch.cuda.get_device_properties(i)
        dev: dict[str, Any] = {
            "index": i,
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "total_gib": round(p.total_memory / 2**30, 1),
        }
        try:
            free, _ = torch.cuda.mem_get_info(i)
            dev["free_gib"] = round(free / 2**30, 1)
        except Exception as e:
            dev["free_gib"] = None
            dev["error"] = f"{type(e).__name__}: {e}"[:200]
        cuda["devices"].append(dev)
    return torch_info, cuda


def _nvcc(torch_cuda: str | None) -> dict:
    path = shutil.which("nvcc")
    info: dict[str, Any] = {"path": path, "version": None, "major": None}
    if path:
        out = _run_out([path, "--version"]) or ""
        m = re.search(r"release (\d+\.\d+)", out)
        info["version"] = m.group(1) if m else None
        info["major"] = _major(info["version"])
    info["torch_cuda_major"] = _major(torch_cuda)
    info["matches_torch"] = (
        None
        if info["major"] is None or info["torch_cuda_major"] is None
        else info["major"] == info["torch_cuda_major"]
    )
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and path:
        home = os.path.dirname(os.path.dirname(os.path.realpath(path)))
    info["cuda_home"] = home or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
    return info


def gather(modules: list[str]) -> dict:
    """What this machine has (nothing is decided here)."""
    torch_info, cuda = _torch_and_cuda()
    ninja = shutil.which("ninja")
    py_inc = sysconfig.get_paths().get("include") or ""
    try:
        setuptools = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        setuptools = None
    mods = {}
    if torch_info["importable"]:
        for name in modules:
            mods[name] = _module(name)
    else:
        mods = {name: {"importable": False, "version": None, "error": "torch"} for name in modules}
    return {
        "python": {"version": sys.version.split()[0], "executable": sys.executable},
        "torch": torch_info,
        "cuda": cuda,
        "nvcc": _nvcc(torch_info["cuda_build"]),
        "ninja": {"path": ninja, "version": _run_out([ninja, "--version"]) if ninja else None},
        "python_h": os.path.isfile(os.path.join(py_inc, "Python.h")),
        "setuptools": setuptools,
        "timeout_cmd": shutil.which("timeout"),
        "modules": mods,
    }


def _have(info: dict, name: str) -> bool:
    if name == "ninja":
        return bool(info["ninja"]["path"])
    return bool(info["modules"].get(name, {}).get("importable"))


def decide(info: dict, rows: list[RowSpec], dry_run: bool) -> list[dict]:
    """RUN or SKIP for each row, with the reason, from :func:`gather`'s findings."""
    cuda, torch_info, nvcc = info["cuda"], info["torch"], info["nvcc"]
    out: list[dict] = []
    for row in rows:
        missing = [m for m in row.modules if not _have(info, m)]
        absent = [m for m in row.optional if not _have(info, m)]
        reason, notes = None, []
        if not torch_info["importable"]:
            reason = f"torch does not import ({torch_info.get('error')})"
        elif not dry_run and row.cuda and not cuda["available"]:
            reason = f"no CUDA: {cuda['why_not']}"
        elif not dry_run and cuda["device_count"] < row.min_gpus:
            n = cuda["device_count"]
            reason = f"{n} CUDA device{'' if n == 1 else 's'} visible, needs {row.min_gpus}"
        elif not dry_run and row.min_gpus > 1 and not torch_info.get("nccl"):
            reason = "torch.distributed has no NCCL"
        elif missing:
            errors = [f"{m} ({info['modules'].get(m, {}).get('error')})" for m in missing]
            reason = f"missing modules: {', '.join(errors)}"[:300]
        elif "nvcc" in row.tools and not nvcc["path"]:
            reason = "nvcc not on PATH (no CUDA toolkit): _C_cuda cannot be built"
        elif "nvcc" in row.tools and not info["python_h"]:
            reason = "Python.h not found (install python3-dev): nothing can compile the module"
        if reason is None:
            notes += [f"no {m}: {WITHOUT.get(m, 'not used')}" for m in absent]
            if "nvcc" in row.tools:
                if dry_run:
                    notes.append("dry run: nvcc build into the work dir, nothing installed")
                elif nvcc["matches_torch"] is False:
                    driver = cuda.get("driver_cuda")
                    notes.append(
                        f"nvcc CUDA {nvcc['version']} vs torch CUDA {torch_info['cuda_build']}: "
                        f"majors differ, the JIT build may fail; the nvcc build then needs a "
                        f"driver for CUDA >= {nvcc['major']}.0 (driver: {driver})"
                    )
        out.append(
            {
                "row": row.name,
                "run": reason is None,
                "reason": reason,
                "notes": notes,
                "modules": {m: _have(info, m) for m in row.modules},
                "optional": {m: _have(info, m) for m in row.optional},
            }
        )
    build = next((d for d in out if d["row"] == "build_ext"), None)
    for d, row in zip(out, rows):
        if row.uses_ext and d["run"] and build is not None and not build["run"]:
            d["notes"].append(
                f"build_ext skipped: the CUDA kernel is not measured ({build['reason']})"
            )
    return out


def _yes(b: bool | None) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[b]


def render(info: dict, decisions: list[dict], dry_run: bool) -> str:
    """The one screen."""
    t, c, n = info["torch"], info["cuda"], info["nvcc"]
    lines = [f"== GPU suite preflight{' (dry run)' if dry_run else ''} =="]
    lines.append(f"python   {info['python']['version']}  {info['python']['executable']}")
    if t["importable"]:
        lines.append(f"torch    {t['version']}  CUDA build: {t['cuda_build'] or 'none'}")
    else:
        lines.append(f"torch    does NOT import: {t.get('error')}")
    if c["available"]:
        lines.append(
            f"CUDA     yes: {c['device_count']} GPU(s), driver CUDA {c.get('driver_cuda')}"
        )
        for d in c["devices"]:
            lines.append(
                f"  gpu {d['index']}  {d['name']} (sm {d['capability']}): "
                f"{d['free_gib']} of {d['total_gib']} GiB free"
            )
    else:
        if dry_run:
            then = " (a real run here skips the GPU rows; this dry run runs them on CPU)"
        else:
            then = ": GPU rows skipped"
        lines.append(f"CUDA     no CUDA: {c['why_not']}{then}")
    if n["path"]:
        match = {True: "matches", False: "DIFFERS from", None: "n/a vs"}[n["matches_torch"]]
        lines.append(
            f"nvcc     {n['version']} ({n['path']}): major {match} torch CUDA "
            f"{t['cuda_build'] or 'none'}; CUDA_HOME {n['cuda_home']}"
        )
    else:
        lines.append("nvcc     NOT on PATH (no CUDA toolkit): _C_cuda cannot be built")
    lines.append(
        f"tools    ninja {_yes(bool(info['ninja']['path']))}"
        f"{' ' + info['ninja']['version'] if info['ninja']['version'] else ''}, "
        f"Python.h {_yes(info['python_h'])}, timeout {_yes(bool(info['timeout_cmd']))}, "
        f"setuptools {info['setuptools'] or 'absent'} (not used by the build)"
    )
    mods = [
        f"{name} {m['version'] or ''}".rstrip() if m["importable"] else f"{name} NO"
        for name, m in info["modules"].items()
    ]
    lines.append("modules  " + ", ".join(mods))
    for name, m in info["modules"].items():
        if not m["importable"] and m["error"] != "torch":
            lines.append(f"  {name}: {m['error']}"[:160])
    mode = "dry run: CPU, tiny sizes, Triton interpreter, gloo" if dry_run else "real run"
    lines.append(f"rows ({mode}):")
    width = max(len(d["row"]) for d in decisions) if decisions else 4
    for d in decisions:
        imports = [m if ok else f"{m}:NO" for m, ok in d["modules"].items()]
        imports += [f"{m}(opt)" if ok else f"{m}(opt):NO" for m, ok in d["optional"].items()]
        what = d["reason"] if not d["run"] else "; ".join(d["notes"])
        lines.append(f"  {d['row']:<{width}}  {'RUN ' if d['run'] else 'SKIP'}  {what}".rstrip())
        if imports:
            lines.append(f"  {'':<{width}}        imports: {' '.join(imports)}")
    n_run = sum(d["run"] for d in decisions)
    lines.append(f"=> {n_run} of {len(decisions)} rows will run, {len(decisions) - n_run} skipped")
    return "\n".join(lines)


def preflight(rows: list[RowSpec], dry_run: bool) -> dict:
    names = ["megablocks_ablate"] if any("megablocks_ablate" in r.modules for r in rows) else []
    for r in rows:
        for m in [*r.modules, *r.optional]:
            if m not in names and m != "ninja":
                names.append(m)
    info = gather(names)
    decisions = decide(info, rows, dry_run)
    return {
        "preflight": 1,
        "dry_run": dry_run,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        **info,
        "rows": decisions,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="decide for a dry run (CPU)")
    ap.add_argument("--rows", default=None, help="comma-separated rows (default: all)")
    ap.add_argument("--json", default=None, help="also write the findings here")
    args = ap.parse_args(argv)
    from common import FAIL_ENV

    if "preflight" in os.environ.get(FAIL_ENV, "").split(","):  # the runner's fallback, tested
        raise RuntimeError(f"forced failure of the preflight ({FAIL_ENV})")
    rows = ROWS
    if args.rows:
        wanted = {x.strip() for x in args.rows.split(",") if x.strip()}
        unknown = wanted - {r.name for r in ROWS}
        if unknown:
            ap.error(f"--rows: unknown {sorted(unknown)}")
        rows = [r for r in ROWS if r.name in wanted]
    result = preflight(rows, args.dry_run)
    print(render(result, result["rows"], args.dry_run), flush=True)
    if args.json:
        from common import write_json

        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
