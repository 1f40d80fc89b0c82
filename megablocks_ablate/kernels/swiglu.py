"""SwiGLU activation: ``silu(gate) * up`` from one ``[..., 2 * hidden]`` tensor.

The gate and up halves arrive side by side (``[gate | up]``) as the tail columns of
the block's fused input projection, so the input is usually a strided view. Taking
both halves as one tensor lets the backward write one ``[..., 2 * hidden]`` gradient
instead of two that autograd would then have to stitch together.

Backward, with ``s = sigmoid(gate)``::

    d_gate = d_out * up * s * (1 + gate * (1 - s))
    d_up   = d_out * gate * s

Given a ``grad_into`` slot (``MBA_INPROJ_GRAD=buffer``, :mod:`.inproj_grad`) the backward
writes that gradient straight into the slot's slice of the block's in-projection
gradient buffer (Triton: the kernel stores there; reference: ``out=`` ops running
autograd's own operations, so the numbers match bit for bit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from megablocks_ablate.kernels.inproj_grad import fits

if TYPE_CHECKING:
    from megablocks_ablate.kernels.inproj_grad import GradSlot

try:
    import triton
    import triton.language as tl
except ImportError:  # reference path only
    triton = None


def swiglu_reference(gate_up: torch.Tensor, grad_into: GradSlot | None = None) -> torch.Tensor:
    """Pure-PyTorch SwiGLU on ``[..., 2 * hidden]`` -> ``[..., hidden]``; with ``grad_into``
    (fitting ``gate_up``) the backward writes ``d gate_up`` into that slot."""
    if fits(gate_up, grad_into):
        return _SwigluReferenceInto.apply(gate_up, grad_into)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwigluReferenceInto(torch.autograd.Function):
    """``silu(gate) * up`` whose backward runs autograd's operations (``dout * up``
    through ``silu_backward``, ``dout * silu(gate)``) with ``out=`` the slot's halves."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, grad_into: GradSlot):
        ctx.save_for_backward(gate_up)
        ctx.grad_into = grad_into
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        dgu = ctx.grad_into()
        d_gate, d_up = dgu.chunk(2, dim=-1)
        torch.mul(dout, F.silu(gate), out=d_up)
        torch.ops.aten.silu_backward.grad_input(dout * up, gate, grad_input=d_gate)
        return dgu, None


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
    def _swiglu_bwd_kernel(GU, DOUT, DGU, M, stride_row, stride_drow, BLOCK: tl.constexpr):
        # DGU's rows are stride_drow apart: 2 * M for a new tensor, wider for a slice of
        # the in-projection gradient buffer.
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: row * stride_row passes 2**31
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < M
        g = tl.load(GU + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_row + M + cols, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + row * M + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = dout * u * s * (1.0 + g * (1.0 - s))
        du = dout * g * s
        tl.store(DGU + row * stride_drow + cols, dg.to(DGU.dtype.element_ty), mask=mask)
        tl.store(DGU + row * stride_drow + M + cols, du.to(DGU.dtype.element_ty), mask=mask)


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` -> ``[rows, C]`` without copying when the last dim is contiguous."""
    t2 = t.reshape(-1, t.shape[-1])  # a view whenever the leading dims are collapsible
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _rows_out(t: torch.Tensor) -> torch.Tensor | None:
    """``[..., C]`` -> a ``[rows, C]`` view with a contiguous last dim, or None if there is none."""
    if t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # leading dims not collapsible into one stride
        return None


def _block(m: int) -> int:
    return min(1024, triton.next_power_of_2(m))


class _SwigluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, grad_into: GradSlot | None = None):
        gu = _rows_view(gate_up)
        rows, m = gu.shape[0], gu.shape[1] // 2
        out = torch.empty(rows, m, dtype=gate_up.dtype, device=gate_up.device)
        if out.numel():
            block = _block(m)
            _swiglu_fwd_kernel[(rows, triton.cdiv(m, block))](gu, out, m, gu.stride(0), BLOCK=block)
        ctx.save_for_backward(gu)
        ctx.in_shape = gate_up.shape
        ctx.grad_into = grad_into
        return out.view(*gate_up.shape[:-1], m)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (gu,) = ctx.saved_tensors
        rows, m = gu.shape[0], gu.shape[1] // 2
        dout2 = dout.reshape(rows, m).contiguous()
        target = ctx.grad_into() if ctx.grad_into is not None else None
        dgu = None if target is None else _rows_out(target)
        if dgu is None:
            dgu = torch.empty(rows, 2 * m, dtype=gu.dtype, device=gu.device)
        if dgu.numel():
            block = _block(m)
            _swiglu_bwd_kernel[(rows, triton.cdiv(m, block))](
                gu, dout2, dgu, m, gu.stride(0), dgu.stride(0), BLOCK=block
            )
        if target is None:
            return dgu.view(ctx.in_shape), None
        if dgu.data_ptr() != target.data_ptr():  # the slot had no [rows, C] view
            target.copy_(dgu.view(ctx.in_shape))
        return target, None


def swiglu_triton(gate_up: torch.Tensor, grad_into: GradSlot | None = None) -> torch.Tensor:
    """Triton SwiGLU on ``[..., 2 * hidden]`` (a column slice of a wider tensor is fine);
    with ``grad_into`` (fitting ``gate_up``) the backward kernel stores into that slot."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim must be even ([gate | up]), got {tuple(gate_up.shape)}")
    return _SwigluFunction.apply(gate_up, grad_into if fits(gate_up, grad_into) else None)
