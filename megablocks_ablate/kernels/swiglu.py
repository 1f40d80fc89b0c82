"""SwiGLU activation: ``silu(gate) * up`` from one ``[..., 2 * hidden]`` tensor.

The gate and up halves arrive side by side (``[gate | up]``) as the tail columns of
the block's fused input projection, so the input is usually a strided view. Taking
both halves as one tensor lets the backward write one ``[..., 2 * hidden]`` gradient
instead of two that autograd would then have to stitch together.

Backward, with ``s = sigmoid(gate)``::

    d_gate = d_out * up * s * (1 + gate * (1 - s))
    d_up   = d_out * gate * s
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # reference path only
    triton = None


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch SwiGLU on ``[..., 2 * hidden]`` -> ``[..., hidden]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(GU, OUT, M, stride_row, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: row * stride_row passes 2**31
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < M
        g = tl.load(GU + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_row + M + cols, mask=mask, other=0.0).to(tl.float32)
        out = g * tl.sigmoid(g) * u
        tl.store(OUT + row * M + cols, out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(GU, DOUT, DGU, M, stride_row, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: row * stride_row passes 2**31
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < M
        g = tl.load(GU + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_row + M + cols, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + row * M + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = dout * u * s * (1.0 + g * (1.0 - s))
        du = dout * g * s
        tl.store(DGU + row * 2 * M + cols, dg.to(DGU.dtype.element_ty), mask=mask)
        tl.store(DGU + row * 2 * M + M + cols, du.to(DGU.dtype.element_ty), mask=mask)


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` -> ``[rows, C]`` without copying when the last dim is contiguous."""
    t2 = t.reshape(-1, t.shape[-1])  # a view whenever the leading dims are collapsible
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _block(m: int) -> int:
    return min(1024, triton.next_power_of_2(m))


class _SwigluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor):
        gu = _rows_view(gate_up)
        rows, m = gu.shape[0], gu.shape[1] // 2
        out = torch.empty(rows, m, dtype=gate_up.dtype, device=gate_up.device)
        if out.numel():
            block = _block(m)
            _swiglu_fwd_kernel[(rows, triton.cdiv(m, block))](gu, out, m, gu.stride(0), BLOCK=block)
        ctx.save_for_backward(gu)
        ctx.in_shape = gate_up.shape
        return out.view(*gate_up.shape[:-1], m)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (gu,) = ctx.saved_tensors
        rows, m = gu.shape[0], gu.shape[1] // 2
        dout2 = dout.reshape(rows, m).contiguous()
        dgu = torch.empty(rows, 2 * m, dtype=gu.dtype, device=gu.device)
        if dgu.numel():
            block = _block(m)
            _swiglu_bwd_kernel[(rows, triton.cdiv(m, block))](
                gu, dout2, dgu, m, gu.stride(0), BLOCK=block
            )
        return dgu.view(ctx.in_shape)


def swiglu_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton SwiGLU on ``[..., 2 * hidden]`` (a column slice of a wider tensor is fine)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim must be even ([gate | up]), got {tuple(gate_up.shape)}")
    return _SwigluFunction.apply(gate_up)
