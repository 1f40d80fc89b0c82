"""Triton merge kernel: ``out = sum_i w_i * x_i`` on the GPU (or the Triton interpreter).

Each program owns one block of the flat parameter vector, keeps an fp32 accumulator
in registers, and walks the inputs through a table of raw addresses (one int64 per
input, grouped by dtype), so a single launch handles any number of inputs with each
input read once and the output written once. Tested on CPU under TRITON_INTERPRET=1.

Vector loads (``MBA_MERGE_VEC``, :mod:`.merge_switch`): an address loaded from a table
tells the compiler nothing about alignment, so by default every bf16 element is read
with its own 2-byte load. When the output and every input are 16-byte aligned (checked
here, on the host) the kernel is compiled with ``ALIGNED``: each full block's input
pointers carry ``tl.multiple_of(16 bytes)`` / ``tl.max_contiguous(BLOCK)`` hints and
are loaded and stored without a mask, which compiles to 16-byte ``ld.global.v4``
loads (8 bf16 or 4 fp32 per load); the last, partial block takes the masked
element-wise path. Both paths compute the same fold in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megablocks_ablate.kernels import merge_switch

try:
    import triton
    import triton.language as tl
except ImportError:  # reference / C++ paths only
    triton = None

BLOCK = 1024

if triton is not None:

    @triton.jit
    def _accumulate(
        acc,
        ptr_table,
        w_table,
        count,
        offs,
        mask,
        DTYPE: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        for i in range(count):
            base = tl.load(ptr_table + i).to(tl.pointer_type(DTYPE))
            w = tl.load(w_table + i)
            if ALIGNED:  # a full block of a 16-byte-aligned input: no mask, vector loads
                ptrs = tl.max_contiguous(tl.multiple_of(base + offs, [16]), [BLOCK])
                x = tl.load(ptrs).to(tl.float32)
            else:
                x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            acc += w * x
        return acc

    @triton.jit
    def _merge_block(
        out_ptr,
        offs,
        mask,
        p32,
        w32,
        n32,
        pbf,
        wbf,
        nbf,
        p16,
        w16,
        n16,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        acc = _accumulate(acc, p32, w32, n32, offs, mask, tl.float32, ALIGNED, BLOCK)
        acc = _accumulate(acc, pbf, wbf, nbf, offs, mask, tl.bfloat16, ALIGNED, BLOCK)
        acc = _accumulate(acc, p16, w16, n16, offs, mask, tl.float16, ALIGNED, BLOCK)
        if ALIGNED:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty))
        else:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _merge_kernel(
        out_ptr,
        n,
        p32,
        w32,
        n32,
        pbf,
        wbf,
        nbf,
        p16,
        w16,
        n16,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        if ALIGNED and start + BLOCK <= n:  # every block but a partial last one
            _merge_block(
                out_ptr, offs, mask, p32, w32, n32, pbf, wbf, nbf, p16, w16, n16, True, BLOCK
            )
        else:
            _merge_block(
                out_ptr, offs, mask, p32, w32, n32, pbf, wbf, nbf, p16, w16, n16, False, BLOCK
            )


_GROUPS = (torch.float32, torch.bfloat16, torch.float16)


def aligned_variant(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`merge_into_triton` compiles the ``ALIGNED`` (vector-load) variant
    for these tensors: ``MBA_MERGE_VEC`` allows it and every pointer is 16-byte aligned."""
    return merge_switch.use_vector_loads(out.data_ptr(), [x.data_ptr() for x in inputs])


def merge_into_triton(
    out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """One launch over ``out`` (1-D, contiguous); inputs of mixed fp32/bf16/fp16.

    Inputs are summed grouped by dtype (fp32 first, then bf16, then fp16), so with
    mixed dtypes the fp32 rounding order differs from the reference's input order.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    device = out.device
    tables = []
    for dtype in _GROUPS:
        idx = [i for i, x in enumerate(inputs) if x.dtype == dtype]
        # Tables hold at least one entry so that every pointer argument is a real tensor.
        ptrs = torch.tensor(
            [inputs[i].data_ptr() for i in idx] or [0], dtype=torch.int64, device=device
        )
        ws = torch.tensor(
            [float(weights[i]) for i in idx] or [0.0], dtype=torch.float32, device=device
        )
        tables += [ptrs, ws, len(idx)]
    n = out.numel()
    if n:
        aligned = aligned_variant(out, inputs)
        _merge_kernel[(triton.cdiv(n, BLOCK),)](out, n, *tables, ALIGNED=aligned, BLOCK=BLOCK)
    return out
