"""Build megablocks_ablate._C (C++/OpenMP, always) and _C_cuda (CUDA, when possible).

`_C` is a plain pybind11 extension: every `csrc/*.cpp` file is compiled into it and
registers its functions from `csrc/module.cpp`. It never includes torch headers, so it
builds in an isolated environment without torch and compiles in seconds.

`_C_cuda` (every `csrc/cuda/*.cu`) is built only when torch with CUDA and nvcc are
both importable/present at build time, i.e. `pip install --no-build-isolation -e .`
on a GPU machine. Set MBA_SKIP_CUDA=1 to skip it, MBA_NATIVE=1 to add -march=native.
"""

import glob
import os
import shutil
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpu_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cflags = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]
    if os.environ.get("MBA_NATIVE") == "1":
        cflags.append("-march=native")
    return Pybind11Extension(
        "megablocks_ablate._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=cflags,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )


def _cuda_extensions():
    if os.environ.get("MBA_SKIP_CUDA") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not sources or shutil.which("nvcc") is None:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None:
        return [], {}
    ext = CUDAExtension(
        "megablocks_ablate._C_cuda",
        sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp"))),
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}


cuda_exts, cuda_cmdclass = _cuda_extensions()
cmdclass = {"build_ext": build_ext}
cmdclass.update(cuda_cmdclass)
if cuda_exts:
    print("megablocks-ablate: building CUDA extension _C_cuda", file=sys.stderr)

setup(ext_modules=[_cpu_extension()] + cuda_exts, cmdclass=cmdclass)
