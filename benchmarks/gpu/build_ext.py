"""Row ``build_ext``: build the CUDA extension ``_C_cuda`` (and ``_C``) in place.

1. The project's own way: ``python setup.py build_ext --inplace`` (setup.py builds
   ``_C_cuda`` when torch has CUDA and nvcc is on PATH; see its docstring).
2. If ``_C_cuda`` still does not import (setup.py needs the pybind11 package, which a
   bare machine with a system-wide torch may lack), the same sources are built by
   setuptools with torch's own ``CUDAExtension``/``CppExtension`` (torch ships the
   pybind11 headers), with ninja when present.

Success means a fresh interpreter imports ``megablocks_ablate._C_cuda`` with
``merge_into``. Without nvcc or a CUDA torch the row is skipped with the reason.

``--dry-run`` never writes into the package (other processes use it): when nvcc exists
it compiles ``csrc/cuda/merge.cu`` (C ABI part) to an object file in the work dir, a
compile check; otherwise it is skipped with the reason.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, parser, run_row

CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
# torch first, as every caller of _ext does: _C_cuda links against torch's libraries,
# which only resolve once torch has loaded them.
CHECK = (
    "import sys, torch, megablocks_ablate._ext as e; "
    "sys.exit(0 if e.cuda is not None and hasattr(e.cuda, 'merge_into') else 3)"
)

# Fallback build (step 2), run as `python -c FALLBACK tmpdir` in ROOT.
FALLBACK = r"""
import glob, os, shutil, sys
from setuptools import Extension, setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension, include_paths
exts = [CUDAExtension(
    "megablocks_ablate._C_cuda",
    sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp")),
    extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
)]
try:
    import megablocks_ablate._C  # noqa: F401  (already built: keep it)
except ImportError:
    # Plain pybind11 like setup.py's _C (torch's include dir only for pybind11's
    # headers; no torch library linked, so _C imports without torch).
    exts.append(Extension(
        "megablocks_ablate._C", sorted(glob.glob("csrc/*.cpp")),
        include_dirs=["csrc", include_paths()[0]], language="c++",
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17"], extra_link_args=["-fopenmp"],
    ))
ninja = shutil.which("ninja") is not None
setup(
    name="megablocks-ablate-gpu-suite-build", ext_modules=exts, packages=[],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=ninja)},
    script_args=["build_ext", "--inplace", "--build-temp", sys.argv[1]],
)
"""


def _run(cmd: list[str], log: str, env: dict | None = None) -> int:
    """Run ``cmd`` in ROOT, its output appended to ``log``; returns the exit code."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd[:3])} ...\n")
        f.flush()
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def _cuda_importable() -> bool:
    return subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT).returncode == 0


def _import_error() -> str:
    """Why ``_C_cuda`` does not import (``_ext`` swallows the error)."""
    code = "import torch; from megablocks_ablate import _C_cuda"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    return r.stderr.strip()[-1500:]


def compile_check(workdir: str) -> dict:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return {"status": "skipped", "reason": "dry run: no nvcc on PATH for a compile check"}
    obj = os.path.join(workdir, "merge_cabi.o")
    t = time.perf_counter()
    cmd = [nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-Xcompiler", "-fPIC", "-c"]
    r = subprocess.run(cmd + [CUDA_SOURCES[0], "-o", obj], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc compile check failed:\n{r.stderr[-2000:]}")
    dt = round(time.perf_counter() - t, 2)
    return {
        "key": {
            "name": "compile_s",
            "value": dt,
            "unit": "s",
            "text": f"nvcc compile check {dt} s",
        },
        "details": {"mode": "compile-check (dry run)", "sources": CUDA_SOURCES, "object": obj},
    }


def body(args) -> dict:
    workdir = args.workdir or tempfile.mkdtemp(prefix="mba-build-")
    if args.dry_run:
        return compile_check(workdir)
    import torch

    if torch.version.cuda is None:
        return {"status": "skipped", "reason": f"torch {torch.__version__} has no CUDA"}
    if shutil.which("nvcc") is None:
        return {
            "status": "skipped",
            "reason": "nvcc not on PATH (no CUDA toolkit): _C_cuda cannot be built; "
            "merge_kernels then measures the Triton kernel only",
        }
    log = os.path.join(workdir, "build.log")
    env = {k: v for k, v in os.environ.items() if k != "MBA_SKIP_CUDA"}
    t0 = time.perf_counter()
    attempts = []
    try:
        import pybind11  # noqa: F401  (setup.py needs it)

        rc = _run([sys.executable, "setup.py", "build_ext", "--inplace"], log, env)
        attempts.append({"method": "setup.py build_ext --inplace", "exit_code": rc})
    except ImportError:
        attempts.append({"method": "setup.py", "skipped": "pybind11 not installed"})
    ok = _cuda_importable()
    if not ok:
        tmp = os.path.join(workdir, "build-temp")
        rc = _run([sys.executable, "-c", FALLBACK, tmp], log, env)
        attempts.append({"method": "torch CUDAExtension (fallback)", "exit_code": rc})
        ok = _cuda_importable()
    dt = round(time.perf_counter() - t0, 1)
    with open(log, encoding="utf-8", errors="replace") as f:
        text = f.read()
    print(text)  # the whole build log: the runner keeps it as logs/build_ext.out
    tail = "\n".join(text.splitlines()[-20:])
    details = {"attempts": attempts, "log_tail": tail, "sources": CUDA_SOURCES}
    if not ok:
        details["import_error"] = _import_error()
        return {
            "status": "failed",
            "reason": f"_C_cuda does not import after {dt} s",
            "details": details,
        }
    return {
        "key": {"name": "build_s", "value": dt, "unit": "s", "text": f"built in {dt} s"},
        "details": details,
    }


if __name__ == "__main__":
    sys.exit(run_row("build_ext", parser(__doc__.split("\n\n")[0]), body))
