"""``MBA_MERGE_VEC``: 16-byte vector loads in the Triton and CUDA merge kernels.

Triton runs under TRITON_INTERPRET=1 (tests/conftest.py): the ``ALIGNED`` variant must
equal the element-wise one bitwise and the fp64 reference within rounding, for aligned
and deliberately unaligned inputs (a view one element in), lengths that are not a
multiple of the block or of 8, mixed dtypes and an in-place merge; and compiled for
sm_90 (no GPU needed) it must read bf16 with ``ld.global.v4`` where the element-wise
variant reads 2 bytes at a time. ``csrc/cuda/merge.cu`` is checked the same way with
nvcc: its PTX has the vector loads (and no non-coherent ones), and its kernel bodies,
built for the CPU with ``-DMBA_MERGE_HOST_EMULATION``, run every (block, thread) of a
launch one after another, which checks the index and tail arithmetic without a GPU.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.kernels import merge_switch
from megablocks_ablate.kernels.dispatch import kernel_backend
from megablocks_ablate.kernels.merge_switch import merge_vec
from megablocks_ablate.merge.kernels import merge_into

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CU = os.path.join(ROOT, "csrc", "cuda", "merge.cu")
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
BLOCK = 1024  # merge_triton.BLOCK
LENGTHS = [1, 7, 9, BLOCK - 1, BLOCK, 2 * BLOCK + 13]


def _tensor(values: torch.Tensor, dtype, offset: int, device=DEVICE) -> torch.Tensor:
    """``values`` as a contiguous 1-D tensor starting ``offset`` elements into its
    storage (offset 1: 2 or 4 bytes past a 16-byte boundary)."""
    buf = torch.zeros(values.numel() + offset, dtype=dtype, device=device)
    t = buf[offset:]
    t.copy_(values.to(dtype))
    return t


def _case(n_inputs: int, length: int, seed: int, offsets=(0,), device=DEVICE):
    """Inputs cycling through the three dtypes (and through ``offsets``), and weights."""
    g = torch.Generator().manual_seed(seed)
    xs = [
        _tensor(torch.randn(length, generator=g), DTYPES[i % 3], offsets[i % len(offsets)], device)
        for i in range(n_inputs)
    ]
    ws = (torch.rand(n_inputs, generator=g, dtype=torch.float64) * 2 - 0.5).tolist()
    return xs, ws


def _assert_merged(got: torch.Tensor, xs, ws) -> None:
    """Within one output ulp + the fp32 rounding of the terms of the fp64 sum."""
    xs = [x.cpu().double() for x in xs]
    exact = sum(w * x for w, x in zip(ws, xs))
    scale = sum(abs(w) * x.abs() for w, x in zip(ws, xs))
    bound = EPS[got.dtype] * exact.abs() + 4 * len(xs) * 2.0**-24 * scale + 1e-30
    worst = ((got.cpu().double() - exact).abs() - bound).max().item()
    assert worst <= 0, f"error exceeds bound by {worst} ({got.dtype}, {len(xs)} inputs)"


def _triton(out: torch.Tensor, xs, ws, mode: str) -> torch.Tensor:
    with kernel_backend("triton"), merge_vec(mode):
        return merge_into(out, xs, ws)


# ------------------------------------------------------------------ the switch


def test_switch_reads_the_environment_once_and_refuses_other_values(monkeypatch):
    try:
        monkeypatch.delenv(merge_switch.ENV, raising=False)
        merge_switch.set_mode(None)
        assert merge_switch.configured_mode() == "auto" and merge_switch.vector_loads_enabled()
        monkeypatch.setenv(merge_switch.ENV, " OFF ")
        assert merge_switch.configured_mode() == "auto"  # read once, on first use
        merge_switch.set_mode(None)  # re-read
        assert merge_switch.configured_mode() == "off" and not merge_switch.vector_loads_enabled()
        with merge_vec("auto"):
            assert merge_switch.vector_loads_enabled()
        assert merge_switch.configured_mode() == "off"  # restored
        monkeypatch.setenv(merge_switch.ENV, "on")
        merge_switch.set_mode(None)
        with pytest.raises(
            ConfigError, match=r"^MBA_MERGE_VEC: expected one of auto, off, got 'on'"
        ):
            merge_switch.configured_mode()
        with pytest.raises(ConfigError, match="MBA_MERGE_VEC"):
            merge_switch.set_mode("vector")
    finally:
        monkeypatch.delenv(merge_switch.ENV, raising=False)
        merge_switch.set_mode(None)


def test_host_picks_the_aligned_variant_only_when_every_pointer_is_aligned(monkeypatch):
    from megablocks_ablate.kernels import merge_triton

    xs, ws = _case(3, 100, seed=1)
    out = torch.empty(100, dtype=torch.bfloat16, device=DEVICE)
    bad_in = _tensor(xs[1], torch.bfloat16, 1)  # 2 bytes past a 16-byte boundary
    bad_out = torch.empty(101, dtype=torch.float32, device=DEVICE)[1:]
    assert xs[1].data_ptr() % 16 == 0 and bad_in.data_ptr() % 16 == 2
    assert merge_switch.use_vector_loads(32, [0, 16, 4096]) and not merge_switch.all_aligned([8])
    seen = []
    real = merge_triton._merge_kernel

    class Spy:  # records the ALIGNED each launch was compiled with
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["ALIGNED"])
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(merge_triton, "_merge_kernel", Spy())
    with merge_vec("auto"):
        assert merge_triton.aligned_variant(out, xs)
        assert not merge_triton.aligned_variant(out, [xs[0], bad_in, xs[2]])
        assert not merge_triton.aligned_variant(bad_out, xs)
    with merge_vec("off"):
        assert not merge_triton.aligned_variant(out, xs)
    _triton(out, xs, ws, "auto")
    _triton(out, [xs[0], bad_in, xs[2]], ws, "auto")
    _triton(bad_out, xs, ws, "auto")
    _triton(out, xs, ws, "off")
    assert seen == [True, False, False, False]


# ------------------------------------------------------------------ Triton, interpreted


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_triton_vector_path_equals_the_elementwise_path_and_the_reference(out_dtype):
    for length in LENGTHS:
        for offsets in [(0,), (0, 1), (1,)]:  # all aligned, some unaligned, none aligned
            xs, ws = _case(5, length, seed=length, offsets=offsets)
            got = {
                mode: _triton(torch.empty(length, dtype=out_dtype, device=DEVICE), xs, ws, mode)
                for mode in ("auto", "off")
            }
            assert torch.equal(got["auto"], got["off"]), (length, offsets)
            _assert_merged(got["auto"], xs, ws)


def test_triton_vector_path_in_place_and_bf16_only():
    length = 3 * BLOCK + 5
    for mode in ("auto", "off"):
        xs, ws = _case(6, length, seed=7)
        xs = [x.to(torch.bfloat16) for x in xs]
        expected = [x.clone() for x in xs]
        out = xs[2]  # in place: the output is one of the inputs
        assert merge_switch.use_vector_loads(out.data_ptr(), [x.data_ptr() for x in xs])
        _triton(out, xs, ws, mode)
        _assert_merged(out, expected, ws)


# ------------------------------------------------------------------ Triton, compiled

PTX_SCRIPT = r"""
import collections, json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megablocks_ablate.kernels import merge_triton as m

sig = {"out_ptr": "*bf16", "n": "i64"}
for g in ("32", "bf", "16"):
    sig.update({"p" + g: "*i64", "w" + g: "*fp32", "n" + g: "i32"})
sig.update(ALIGNED="constexpr", BLOCK="constexpr")
ops = {}
for aligned in (True, False):
    k = triton.compile(
        ASTSource(fn=m._merge_kernel, signature=sig, attrs={(0,): [["tt.divisibility", 16]]},
                  constexprs={"ALIGNED": aligned, "BLOCK": m.BLOCK}),
        target=GPUTarget("cuda", 90, 32),
    )
    ops[str(aligned)] = collections.Counter(re.findall(r"\b(?:ld|st)\.global[.\w]*", k.asm["ptx"]))
print(json.dumps(ops))
"""


@pytest.mark.integration
def test_triton_aligned_variant_compiles_to_16_byte_loads(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run(
        [sys.executable, "-c", PTX_SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ops = json.loads(proc.stdout.strip().splitlines()[-1])
    # one 16-byte load per 8 elements of each input group: fp32 (2), bf16 (1), fp16 (1);
    # the bf16 output is stored 8 elements (16 bytes) at a time
    assert ops["True"].get("ld.global.v4.b32") == 4, ops
    assert ops["True"].get("st.global.v4.b32") == 1, ops
    assert "ld.global.v4.b32" not in ops["False"] and ops["False"]["ld.global.b16"] > 0, ops


# ------------------------------------------------------------------ CUDA, via nvcc

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
# the defines torch's CUDAExtension build passes (setup.py), so the vector code compiles there
TORCH_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--use_fast_math",
]


def _nvcc(args: list[str]) -> None:
    r = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", *args], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]


@needs_nvcc
@pytest.mark.integration
def test_cuda_vector_kernel_compiles_to_16_byte_coherent_loads(tmp_path):
    ptx = tmp_path / "merge.ptx"
    _nvcc([*TORCH_DEFINES, "-ptx", CU, "-o", str(ptx)])
    text = ptx.read_text()
    entries = re.split(r"\.entry\s+", text)[1:]
    vec = [e for e in entries if e.startswith("_ZN8mba_cuda16merge_kernel_vec")]
    scalar = [e for e in entries if e.startswith("_ZN8mba_cuda12merge_kernel")]
    assert len(vec) == 1 and len(scalar) == 1
    # 16-bit inputs: one 16-byte load per 8 elements; fp32: two; both per item in flight
    assert re.search(r"ld\.global\.v4\.u32", vec[0]) and re.search(r"ld\.global\.v4\.f32", vec[0])
    assert re.search(r"st\.global\.v4\.u32", vec[0]) and re.search(r"st\.global\.v4\.f32", vec[0])
    assert not re.search(r"ld\.global\.v4", scalar[0])
    # `out` may alias an input: no read-only (non-coherent) loads anywhere
    assert ".nc" not in text


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """merge.cu's kernel bodies built for the CPU: ``run(out, xs, ws, vector_loads,
    max_blocks) -> 1 (vector kernel) | 0 (element-wise)``."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    lib = tmp_path_factory.mktemp("merge-emu") / "libmerge_emu.so"
    flags = ["-DMBA_MERGE_HOST_EMULATION", "-Xcompiler", "-fPIC,-ffp-contract=off"]
    _nvcc([*flags, "-shared", CU, "-o", str(lib)])
    fn = ctypes.CDLL(str(lib)).mba_merge_emulate
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_float),
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_int64,
    ]

    def run(out, xs, ws, vector_loads: bool, max_blocks: int = 1 << 20) -> int:
        k = len(xs)
        ptrs = (ctypes.c_void_p * k)(*[x.data_ptr() for x in xs])
        codes = (ctypes.c_int * k)(*[CODES[x.dtype] for x in xs])
        weights = (ctypes.c_float * k)(*ws)
        n = out.numel()
        return fn(
            out.data_ptr(),
            CODES[out.dtype],
            ptrs,
            codes,
            weights,
            k,
            n,
            int(vector_loads),
            max_blocks,
        )

    return run


@pytest.mark.integration
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_cuda_vector_body_equals_the_elementwise_body_and_the_reference(emulated, out_dtype):
    # lengths around one vector (8) and one vector tile (256 threads x 2 vectors x 8)
    for length in [1, 7, 8, 9, 4095, 4096, 4103, 3 * 4096 + 8 + 5]:
        for offsets in [(0,), (0, 1)]:
            xs, ws = _case(7, length, seed=length, offsets=offsets, device="cpu")
            aligned = offsets == (0,)
            vec = torch.empty(length, dtype=out_dtype)
            ref = torch.empty(length, dtype=out_dtype)
            # two blocks at most: the grid-stride loop, and the tail done by block 0
            assert emulated(vec, xs, ws, True, max_blocks=2) == int(aligned)
            assert emulated(ref, xs, ws, False) == 0
            assert torch.equal(vec, ref), (length, offsets)
            _assert_merged(vec, xs, ws)


@pytest.mark.integration
def test_cuda_vector_body_unaligned_output_and_in_place(emulated):
    xs, ws = _case(4, 1000, seed=3, device="cpu")
    out = torch.empty(1001, dtype=torch.bfloat16)[1:]
    assert emulated(out, xs, ws, True) == 0  # an unaligned output: element-wise
    _assert_merged(out, xs, ws)
    xs = [x.to(torch.bfloat16) for x in xs]
    expected = [x.clone() for x in xs]
    assert emulated(xs[0], xs, ws, True) == 1  # in place into an input
    _assert_merged(xs[0], expected, ws)


# ------------------------------------------------------------------ on a GPU


@pytest.mark.skipif(not GPU, reason="needs a GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_vector_loads_equal_elementwise_loads(backend):  # runs on GPU machines only
    from megablocks_ablate import _ext

    if backend == "cuda" and (_ext.cuda is None or not hasattr(_ext.cuda, "merge_vector_loads")):
        pytest.skip("_C_cuda is not built with vector_loads")
    for offsets in [(0,), (0, 1)]:
        xs, ws = _case(9, 100_003, seed=5, offsets=offsets)
        for out_dtype in DTYPES:
            got = {}
            for mode in ("auto", "off"):
                with merge_vec(mode):
                    got[mode] = merge_into(
                        torch.empty(100_003, dtype=out_dtype, device="cuda"),
                        xs,
                        ws,
                        backend=backend,
                    )
            assert torch.equal(got["auto"], got["off"])
            _assert_merged(got["auto"], xs, ws)
