"""Merge kernels (C++/OpenMP, Triton under the interpreter, CUDA compile) against the
PyTorch reference: every dtype pair, odd lengths, 1 to 64 inputs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from megablocks_ablate import _ext
from megablocks_ablate.kernels.dispatch import kernel_backend
from megablocks_ablate.kernels.merge_reference import merge_into_reference
from megablocks_ablate.merge.kernels import merge_into, select_backend

GPU = torch.cuda.is_available()  # without one, tests/conftest.py set TRITON_INTERPRET=1

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _inputs(n_inputs: int, length: int, dtypes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(length, generator=g).to(dtypes[i % len(dtypes)]) for i in range(n_inputs)]
    ws = (torch.rand(n_inputs, generator=g, dtype=torch.float64) * 2 - 0.5).tolist()
    return xs, ws


def _assert_merged(got: torch.Tensor, xs, ws) -> None:
    """``got`` is the fp32-accumulated sum rounded to its dtype, up to accumulation order:
    error <= one output ulp + fp32 rounding of the terms."""
    exact = sum(w * x.double() for w, x in zip(ws, xs))
    scale = sum(abs(w) * x.double().abs() for w, x in zip(ws, xs))
    err = (got.double() - exact).abs()
    bound = EPS[got.dtype] * exact.abs() + 4 * len(xs) * 2.0**-24 * scale + 1e-30
    worst = (err - bound).max().item()
    assert worst <= 0, f"error exceeds bound by {worst} ({got.dtype}, {len(xs)} inputs)"


def _cpp_or_fail():
    assert _ext.cpp is not None, "the C++ extension is not built (setup.py build_ext --inplace)"
    return "cpp"


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_cpp_matches_reference_every_dtype_pair(in_dtype, out_dtype):
    backend = _cpp_or_fail()
    xs, ws = _inputs(3, 4096 * 2 + 77, [in_dtype])
    got = merge_into(torch.empty(xs[0].numel(), dtype=out_dtype), xs, ws, backend=backend)
    ref = merge_into_reference(torch.empty_like(got), xs, ws)
    _assert_merged(got, xs, ws)
    _assert_merged(ref, xs, ws)
    # Same per-element arithmetic as the reference (products and sums rounded one by
    # one in input order, FMA contraction disabled in csrc/merge.cpp): bitwise equal.
    assert torch.equal(got, ref)


@pytest.mark.parametrize("n_inputs", [1, 2, 7, 64])
@pytest.mark.parametrize("length", [1, 4095, 4097, 10_001])
def test_cpp_mixed_dtypes_counts_and_odd_lengths(n_inputs, length):
    backend = _cpp_or_fail()
    xs, ws = _inputs(n_inputs, length, DTYPES, seed=n_inputs * 7 + length)
    for out_dtype in (torch.float32, torch.bfloat16):
        got = merge_into(torch.empty(length, dtype=out_dtype), xs, ws, backend=backend)
        _assert_merged(got, xs, ws)
        assert torch.equal(got, merge_into_reference(torch.empty_like(got), xs, ws))


def test_cpp_conversions_match_torch_exactly():
    """The hand-written bf16/fp16 <-> fp32 conversions, against torch's, bit for bit:
    every 16-bit pattern in, and fp32 values covering normals, subnormals, overflow,
    ties, inf and NaN out."""
    _cpp_or_fail()
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    g = torch.Generator().manual_seed(0)
    probes = torch.cat(
        [
            torch.randint(-(2**31), 2**31 - 1, (200_000,), dtype=torch.int32, generator=g).view(
                torch.float32
            ),
            torch.randn(50_000, generator=g) * 1e-5,
            torch.randn(50_000, generator=g) * 6e4,
            torch.tensor(
                [
                    65504.0,
                    65519.0,
                    65520.0,
                    -65520.0,
                    2.98e-8,
                    2.99e-8,
                    5.96e-8,
                    1e-45,
                    float("inf"),
                    float("-inf"),
                    float("nan"),
                    -0.0,
                    0.0,
                ]
            ),
        ]
    )
    for dtype in (torch.bfloat16, torch.float16):
        x = every.view(dtype)
        loaded = merge_into(torch.empty(65536), [x], [1.0], backend="cpp")
        same = (loaded.view(torch.int32) == x.float().view(torch.int32)) | (
            loaded.isnan() & x.isnan()
        )
        assert bool(same.all()), dtype
        stored = merge_into(
            torch.empty(probes.numel(), dtype=dtype), [probes], [1.0], backend="cpp"
        )
        want = probes.to(dtype)
        same = (stored.view(torch.int16) == want.view(torch.int16)) | (
            stored.isnan() & want.isnan()
        )
        assert bool(same.all()), dtype


def test_cpp_known_values_alias_and_thread_independence():
    _cpp_or_fail()
    a, b = torch.full((9001,), 1.0), torch.full((9001,), 3.0).bfloat16()
    out = merge_into(torch.empty(9001), [a, b], [0.5, 0.5], backend="cpp")
    assert torch.equal(out, torch.full((9001,), 2.0))
    # out aliasing an input: each block is read in full before it is written
    xs, ws = _inputs(5, 20_000, [torch.float32], seed=3)
    expected = merge_into(torch.empty(20_000), xs, ws, backend="cpp")
    merge_into(xs[2], xs, ws, backend="cpp")
    assert torch.equal(xs[2], expected)
    # the per-element summation order is fixed, so thread count cannot change the bits
    xs, ws = _inputs(4, 50_001, DTYPES, seed=4)
    outs = []
    for threads in (1, 2):
        o = torch.empty(50_001, dtype=torch.bfloat16)
        _ext.cpp.merge_into(
            o.data_ptr(),
            1,
            [x.data_ptr() for x in xs],
            [{torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[x.dtype] for x in xs],
            ws,
            o.numel(),
            threads,
        )
        outs.append(o)
    assert torch.equal(outs[0], outs[1])


def test_zero_weights_are_skipped_and_nonfinite_refused():
    x = torch.randn(100)
    poisoned = torch.full((100,), float("nan"))
    out = merge_into(torch.empty(100), [x, poisoned], [1.0, 0.0])
    assert torch.equal(out, x)  # the zero-weight input was not read, so no NaN
    with pytest.raises(ValueError, match="weight 1"):
        merge_into(torch.empty(100), [x, x], [1.0, float("inf")])
    with pytest.raises(ValueError, match="elements"):
        merge_into(torch.empty(100), [x, torch.randn(99)], [0.5, 0.5])
    with pytest.raises(TypeError, match="dtype"):
        merge_into(torch.empty(100), [x.double()], [1.0])
    with pytest.raises(ValueError, match="contiguous"):
        merge_into(torch.empty(100), [torch.randn(200)[::2]], [1.0])


def test_dispatch_by_env():
    cpu = torch.device("cpu")
    with kernel_backend("reference"):
        assert select_backend(cpu) == "reference"
    with kernel_backend("auto"):
        assert select_backend(cpu) == ("cpp" if _ext.cpp is not None else "reference")
    if not GPU:
        with kernel_backend("triton"):
            assert select_backend(cpu) == "triton"  # TRITON_INTERPRET=1 (tests/conftest.py)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_triton_interpreter_matches_reference(out_dtype):
    from megablocks_ablate.kernels import merge_triton

    assert merge_triton.triton is not None, "triton is a dev dependency (pip install -e .[dev])"
    if not GPU:
        assert "Interpreted" in type(merge_triton._merge_kernel).__name__, (
            "merge_triton was imported before TRITON_INTERPRET=1 was set"
        )
    device = "cuda" if GPU else "cpu"
    for n_inputs, length in [(1, 1), (5, 1025), (64, 3000)]:
        xs, ws = _inputs(n_inputs, length, DTYPES, seed=length)
        with kernel_backend("triton"):
            got = merge_into(
                torch.empty(length, dtype=out_dtype, device=device), [x.to(device) for x in xs], ws
            )
        _assert_merged(got.cpu(), xs, ws)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.integration
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """csrc/cuda/merge.cu compiles (C ABI alone, and with the pybind11 binding as the
    CUDAExtension build compiles it). It runs only where a GPU exists."""
    import pybind11

    src = os.path.join(ROOT, "csrc", "cuda", "merge.cu")
    base = ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-Xcompiler", "-fPIC", "-c", src]
    r = subprocess.run(
        base + ["-o", str(tmp_path / "merge_cabi.o")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    inc = [
        "-I" + pybind11.get_include(),
        "-I" + sysconfig.get_paths()["include"],
        "-I" + os.path.join(ROOT, "csrc", "cuda"),
    ]
    obj = tmp_path / "merge_py.o"
    r = subprocess.run(base + inc + ["-o", str(obj)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    syms = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
    assert "mba_merge_into_cuda" in syms and "register_merge_cuda" in syms


@pytest.mark.skipif(not GPU or _ext.cuda is None, reason="needs a GPU and the built _C_cuda")
def test_cuda_extension_matches_reference_on_gpu():  # runs on GPU machines only
    for out_dtype in DTYPES:
        xs, ws = _inputs(9, 100_003, DTYPES)
        got = merge_into(
            torch.empty(100_003, dtype=out_dtype, device="cuda"),
            [x.cuda() for x in xs],
            ws,
            backend="cuda",
        )
        _assert_merged(got.cpu(), xs, ws)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
