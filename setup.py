"""Build megablocks_ablate._C (C++/OpenMP, always) and _C_cuda (CUDA, when possible).

`_C` is a plain pybind11 extension: every `csrc/*.cpp` file is compiled into it and
registers its functions from `csrc/module.cpp`. It never includes torch headers, so it
builds in an isolated environment without torch and compiles in seconds.

`_C_cuda` (every `csrc/cuda/*.cu`) is built only when torch with CUDA and nvcc are
both importable/present at build time, i.e. `pip install --no-build-isolation -e .`
on a GPU machine. Set MBA_SKIP_CUDA=1 to skip it, MBA_NATIVE=1 to add -march=native.
On a machine that sees no GPU (a login node, a CPU CI runner) with TORCH_CUDA_ARCH_LIST
unset, the CUDA build targets DEFAULT_CUDA_ARCH_LIST instead of failing in torch's
arch detection; set TORCH_CUDA_ARCH_LIST to choose others.
"""

import glob
import os
import shutil
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# A100/H100-class GPUs: what a CUDA build targets when no GPU is visible to detect.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def default_cuda_arch_list(env, device_count):
    """The TORCH_CUDA_ARCH_LIST to set for a CUDA build, or None to leave torch's choice.

    torch detects the arch of the visible GPUs when TORCH_CUDA_ARCH_LIST is unset and dies
    (IndexError in _get_cuda_arch_flags) when it sees none. ``device_count`` is a count or
    a callable returning one, called only when the variable is unset."""
    if env.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return None
    count = device_count() if callable(device_count) else device_count
    return DEFAULT_CUDA_ARCH_LIST if count == 0 else None


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
    arch = default_cuda_arch_list(os.environ, torch.cuda.device_count)
    if arch is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        print(
            f"megablocks-ablate: no GPU visible and TORCH_CUDA_ARCH_LIST unset: "
            f"building _C_cuda for TORCH_CUDA_ARCH_LIST={arch!r}",
            file=sys.stderr,
        )
    ext = CUDAExtension(
        "megablocks_ablate._C_cuda",
        sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp"))),
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}


def main():
    cuda_exts, cuda_cmdclass = _cuda_extensions()
    cmdclass = {"build_ext": build_ext}
    cmdclass.update(cuda_cmdclass)
    if cuda_exts:
        print("megablocks-ablate: building CUDA extension _C_cuda", file=sys.stderr)
    setup(ext_modules=[_cpu_extension()] + cuda_exts, cmdclass=cmdclass)


# setuptools' build backend and `python setup.py ...` both run this file as __main__;
# a test imports it for default_cuda_arch_list without building anything.
if __name__ == "__main__":
    main()
