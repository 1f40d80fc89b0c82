"""Row ``build_ext``: build the CUDA extension ``_C_cuda`` outside the package's build system.

Neither ``setup.py`` nor ``pyproject.toml`` is involved (its license fields need
setuptools >= 77, which a lent machine's system Python may lack): the sources of
``csrc/cuda`` are copied to a temporary directory and built there, by

1. ``jit``: ``torch.utils.cpp_extension.load`` (ninja, torch's own flags, the arch of
   the visible GPUs), in a subprocess with its own time limit; skipped without ninja;
2. ``nvcc`` when that fails: one nvcc command (the module needs only pybind11's headers,
   which torch ships, and Python's; no torch library), for the visible GPU's arch or
   ``TORCH_CUDA_ARCH_LIST``.

The library is copied into the package as ``megablocks_ablate/_C_cuda<EXT_SUFFIX>``
(replacing an older one) and checked in a fresh interpreter: it imports, and a small
merge on the GPU agrees with the PyTorch reference; when that check fails the library
is removed again, so later rows use Triton rather than a broken kernel. Each attempt's
command, exit code, time and log tail are in the row's details (the whole log in
``logs/build_ext.out``). A failed build fails this row only: merge_kernels then skips
its CUDA half, naming this row's reason. The CPU extension ``_C`` is not built (no row
needs it; NumPy fallbacks are used).

``--dry-run`` runs method 2 for sm_90 into the work dir and imports the module from
there (nothing is installed, no GPU touched): the whole fallback path but the GPU
check. Skipped without nvcc.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time

from common import ROOT, parser, row_timeout_s, run_row

CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
PKG = os.path.join(ROOT, "megablocks_ablate")
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
INSTALLED = os.path.join(PKG, f"_C_cuda{EXT_SUFFIX}")
DRY_ARCH = "9.0"  # what a dry run compiles for (H100)

# Method 1, run as `python -c JIT SRC BUILD`: torch's JIT build in a temp dir.
JIT = r"""
import glob, os, sys
from torch.utils import cpp_extension as ce
src, build = sys.argv[1], sys.argv[2]
sources = sorted(glob.glob(os.path.join(src, "*.cu"))) + sorted(glob.glob(os.path.join(src, "*.cpp")))
m = ce.load(name="_C_cuda", sources=sources, build_directory=build, extra_include_paths=[src],
            extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--use_fast_math"], verbose=True)
print("built", m.__file__)
"""

# The installed module, in a fresh interpreter: imports as the package does (torch first),
# and merges on the GPU like the reference.
CHECK = r"""
import sys, torch
from megablocks_ablate import _ext
if _ext.cuda is None or not hasattr(_ext.cuda, "merge_into"):
    sys.exit("megablocks_ablate._C_cuda does not import (or has no merge_into)")
from megablocks_ablate.merge.kernels import merge_into
dev = torch.device("cuda", 0)
g = torch.Generator(device=dev).manual_seed(0)
xs = [torch.rand(100_003, generator=g, device=dev) for _ in range(3)]
xs.append(xs[0].to(torch.bfloat16))
ws = [0.1, 0.2, 0.3, 0.4]
out, ref = torch.empty_like(xs[0]), torch.empty_like(xs[0])
merge_into(out, xs, ws, backend="cuda")
merge_into(ref, xs, ws, backend="reference")
torch.cuda.synchronize(dev)
err = float((out - ref).abs().max())
print(f"merge on {torch.cuda.get_device_name(dev)}: max abs err vs reference {err:.2e}")
sys.exit(0 if err <= 1e-5 else f"merge differs from the reference by {err}")
"""

# A module built into a directory, imported from there (dry run: no torch, no GPU).
IMPORT_FROM = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("megablocks_ablate._C_cuda", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
assert hasattr(m, "merge_into"), "no merge_into"
print("imported", m.__file__, "max inputs", m.merge_max_inputs)
"""


def copy_sources(dst: str) -> list[str]:
    """csrc/cuda (sources and headers) copied to ``dst``; the sources to compile."""
    os.makedirs(dst, exist_ok=True)
    for path in glob.glob(os.path.join(CUDA_DIR, "*")):
        if os.path.isfile(path):
            shutil.copy2(path, dst)
    return sorted(glob.glob(os.path.join(dst, "*.cu"))) + sorted(
        glob.glob(os.path.join(dst, "*.cpp"))
    )


def arch_flags(arch_list: str) -> list[str]:
    """nvcc ``-gencode`` flags for a TORCH_CUDA_ARCH_LIST-style list ("8.0;9.0+PTX",
    "9.0a"); PTX is added for the last arch so a newer GPU can still run it."""
    items = [x for x in arch_list.replace(",", ";").replace(" ", ";").split(";") if x]
    if not items:
        raise ValueError(f"empty arch list {arch_list!r}")
    flags = []
    for i, item in enumerate(items):
        ptx = item.endswith("+PTX") or i == len(items) - 1
        num = item.removesuffix("+PTX").replace(".", "")
        if not num[:2].isdigit():
            raise ValueError(f"not a CUDA arch: {item!r} (in {arch_list!r})")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def header_dirs() -> tuple[list[str], str | None]:
    """(include dirs for pybind11 and Python, or why they are missing)."""
    import torch

    dirs = [os.path.join(os.path.dirname(torch.__file__), "include")]  # ships pybind11
    if not os.path.isfile(os.path.join(dirs[0], "pybind11", "pybind11.h")):
        try:
            import pybind11

            dirs = [pybind11.get_include()]
        except ImportError:
            return dirs, "no pybind11 headers (neither torch's include dir nor pybind11)"
    py = sysconfig.get_paths().get("include") or sysconfig.get_config_var("INCLUDEPY")
    if not py or not os.path.isfile(os.path.join(py, "Python.h")):
        return dirs, f"Python.h not found in {py} (install the python3-dev package)"
    return [*dirs, py], None


def nvcc_command(nvcc: str, sources: list[str], out: str, arch_list: str) -> list[str]:
    """The one nvcc command of method 2 (raises when the headers are missing)."""
    dirs, missing = header_dirs()
    if missing:
        raise RuntimeError(missing)
    src_dir = os.path.dirname(sources[0])
    cmd = [nvcc, "-O3", "--use_fast_math", "-std=c++17", "-shared", "-Xcompiler", "-fPIC"]
    cmd += arch_flags(arch_list) + [f"-I{d}" for d in (src_dir, *dirs)]
    return cmd + sources + ["-o", out]


def _run(cmd: list[str], log: str, timeout: float, env: dict | None = None) -> tuple[int, float]:
    """Run ``cmd`` (its own process group, killed at ``timeout``), output appended to
    ``log``; returns (exit code, seconds). 124: timed out, as the ``timeout`` command."""
    t = time.perf_counter()
    shown = ["<script>" if i and cmd[i - 1] == "-c" else c for i, c in enumerate(cmd)]
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(shown)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[build_ext] killed after {timeout:.0f} s\n")
            rc = 124
    return rc, round(time.perf_counter() - t, 2)


def _log_tail(log: str, lines: int = 15) -> str:
    with open(log, encoding="utf-8", errors="replace") as f:
        return "\n".join(f.read().splitlines()[-lines:])[-2500:]


def _arch_list(dry_run: bool) -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    if dry_run:
        return DRY_ARCH
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def _install(built: str) -> None:
    tmp = f"{INSTALLED}.tmp{os.getpid()}"
    shutil.copy2(built, tmp)
    os.replace(tmp, INSTALLED)


def _outcome(attempt: dict) -> str:
    """One attempt's failure, in a few words."""
    if attempt.get("error") or attempt.get("skipped"):
        return str(attempt.get("error") or attempt.get("skipped"))
    rc = attempt.get("exit_code")
    return "timed out" if rc == 124 else f"exit code {rc}"


def _jit_unavailable() -> str | None:
    """Why torch's JIT build cannot run here (None: it can)."""
    try:
        from torch.utils.cpp_extension import is_ninja_available
    except Exception as e:  # cpp_extension imports setuptools, which may be missing
        return f"torch.utils.cpp_extension does not import ({type(e).__name__}: {e})"
    if not is_ninja_available():
        return "ninja not found (torch's JIT build needs it)"
    return None


def build(workdir: str, dry_run: bool, time_limit: float) -> dict:
    """Method 1, then 2 if 1 fails to build or its module fails the check, into
    ``workdir``; each built module is installed and checked (dry run: imported from the
    work dir, nothing installed)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return {
            "status": "skipped",
            "reason": "nvcc not on PATH (no CUDA toolkit): _C_cuda cannot be built; "
            "merge_kernels then measures the Triton kernel only",
        }
    import torch

    if not dry_run and torch.version.cuda is None:
        return {"status": "skipped", "reason": f"torch {torch.__version__} has no CUDA"}
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    log = os.path.join(workdir, "build.log")
    open(log, "w").close()
    sources = copy_sources(os.path.join(workdir, "src"))
    env = {k: v for k, v in os.environ.items() if k != "MBA_SKIP_CUDA"}
    attempts: list[dict] = []
    details: dict = {"attempts": attempts, "sources": sources, "log": log}
    for method in ("jit", "nvcc"):
        left = deadline - time.perf_counter()
        attempt: dict = {"method": method}
        attempts.append(attempt)
        if method == "jit":
            why = "dry run (needs a CUDA torch)" if dry_run else _jit_unavailable()
            if why:
                attempt["skipped"] = why
                continue
            out_dir = os.path.join(workdir, "jit")
            os.makedirs(out_dir, exist_ok=True)
            limit = 0.5 * left  # the other half for nvcc and the checks
            cmd = [sys.executable, "-c", JIT, os.path.dirname(sources[0]), out_dir]
        else:
            attempt["arch"] = arch = _arch_list(dry_run)
            out_dir = os.path.join(workdir, "nvcc")
            os.makedirs(out_dir, exist_ok=True)
            try:
                cmd = nvcc_command(
                    nvcc, sources, os.path.join(out_dir, f"_C_cuda{EXT_SUFFIX}"), arch
                )
            except (RuntimeError, ValueError) as e:
                attempt["error"] = str(e)
                continue
            limit = max(left - (5 if dry_run else 15), 5.0)  # the check's time kept back
        rc, dt = _run(cmd, log, limit, env)
        attempt.update(exit_code=rc, seconds=dt, limit_s=round(limit, 1))
        found = sorted(glob.glob(os.path.join(out_dir, "_C_cuda*.so")))
        if rc != 0 or not found:
            attempt["log_tail"] = _log_tail(log)
            continue
        attempt["built"] = built = found[0]
        if dry_run:
            check = [sys.executable, "-c", IMPORT_FROM, built]
        else:
            _install(built)
            check = [sys.executable, "-c", CHECK]
        rc, check_s = _run(check, log, max(deadline - time.perf_counter(), 20.0), env)
        attempt["check"] = {"exit_code": rc, "seconds": check_s, "output": _log_tail(log, 2)}
        if rc == 0:
            dt_all = round(time.perf_counter() - t0, 1)
            if not dry_run:
                details["installed"] = INSTALLED
            what = "built and imported (dry run: not installed)" if dry_run else "built and checked"
            return {
                "key": {
                    "name": "build_s",
                    "value": dt_all,
                    "unit": "s",
                    "text": f"{what} in {dt_all} s ({method})",
                },
                "details": {**details, "method": method},
            }
        attempt["error"] = f"built, but the check failed: {_log_tail(log, 1)}"[:300]
        if not dry_run and os.path.exists(INSTALLED):
            os.remove(INSTALLED)  # later rows fall back to Triton, not a broken kernel
    tried = [a for a in attempts if "skipped" not in a] or attempts
    why = "; ".join(f"{a['method']}: {_outcome(a)}" for a in tried)
    return {
        "status": "failed",
        "reason": f"_C_cuda not built ({why}) in {round(time.perf_counter() - t0, 1)} s"[:400],
        "details": details,
    }


def body(args) -> dict:
    workdir = args.workdir or tempfile.mkdtemp(prefix="mba-build-")
    limit = row_timeout_s() or 600.0
    res = build(workdir, args.dry_run, max(limit - 5.0, 10.0))
    log = os.path.join(workdir, "build.log")
    if os.path.isfile(log):
        with open(log, encoding="utf-8", errors="replace") as f:
            print(f.read())  # the whole build log: the runner keeps it as logs/build_ext.out
    return res


if __name__ == "__main__":
    sys.exit(run_row("build_ext", parser(__doc__.split("\n\n")[0]), body))
