"""Triton merge kernel: ``out = sum_i w_i * x_i`` on the GPU (or the Triton interpreter).

Each program owns one block of the flat parameter vector, keeps an fp32 accumulator
in registers, and walks the inputs through a table of raw addresses (one int64 per
input, grouped by dtype), so a single launch handles any number of inputs with each
input read once and the output written once. Tested on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # reference / C++ paths only
    triton = None

BLOCK = 1024

if triton is not None:

    @triton.jit
    def _accumulate(acc, ptr_table, w_table, count, offs, mask, DTYPE: tl.constexpr):
        for i in range(count):
            base = tl.load(ptr_table + i).to(tl.pointer_type(DTYPE))
            w = tl.load(w_table + i)
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            acc += w * x
        return acc

    @triton.jit
    def _merge_kernel(out_ptr, n, p32, w32, n32, pbf, wbf, nbf, p16, w16, n16, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        acc = _accumulate(acc, p32, w32, n32, offs, mask, tl.float32)
        acc = _accumulate(acc, pbf, wbf, nbf, offs, mask, tl.bfloat16)
        acc = _accumulate(acc, p16, w16, n16, offs, mask, tl.float16)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_GROUPS = (torch.float32, torch.bfloat16, torch.float16)


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
        _merge_kernel[(triton.cdiv(n, BLOCK),)](out, n, *tables, BLOCK=BLOCK)
    return out
