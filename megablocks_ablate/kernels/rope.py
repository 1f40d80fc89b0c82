"""Rotary position embedding with interleaved pairs, as Cohere does it.

Channel pairs ``(2i, 2i+1)`` of each head rotate by angle ``pos * theta^(-2i/head_dim)``
(GPT-J style; Llama/NeoX instead pair ``i`` with ``i + head_dim/2``)::

    y[2i]   = x[2i] * cos - x[2i+1] * sin
    y[2i+1] = x[2i] * sin + x[2i+1] * cos

``x`` is ``[batch, seq, heads, head_dim]`` and may be a strided view (q and k are
column slices of the fused input projection); ``cos``/``sin`` are fp32
``[seq, head_dim // 2]`` from :func:`rope_tables`. The rotation is done in fp32 and the
output, always contiguous, has x's dtype. The backward is the rotation by ``-angle``.

:func:`rope_pair_triton` / :func:`rope_pair_reference` (``MBA_INPROJ_GRAD=buffer``)
rotate the block's ``q | k`` heads and return q and k as two tensors; their backward
takes ``dq`` and ``dk`` apart (no ``cat``) and writes ``dx`` into a given slice of the
block's in-projection gradient buffer (:mod:`.inproj_grad`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megablocks_ablate.kernels.inproj_grad import fits

if TYPE_CHECKING:
    from megablocks_ablate.kernels.inproj_grad import GradSlot

try:
    import triton
    import triton.language as tl
except ImportError:  # reference path only
    triton = None


def rope_tables(
    seq_len: int, head_dim: int, theta: float, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin`` of shape ``[seq_len, head_dim // 2]``."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )
    angles = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch interleaved RoPE (autograd gives the backward).

    A pair ``(x[2i], x[2i+1])`` is the complex number ``x[2i] + j x[2i+1]``, and the
    rotation is one complex multiply by ``cos + j sin`` (one kernel each way).
    """
    return _rotate(x, cos, sin, inverse=False)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """``x`` rotated by ``+angle`` (or ``-angle``: the backward, the same operations that
    autograd runs for :func:`rope_reference`, so the numbers match bit for bit)."""
    t = x.shape[1]
    xf = x.float()
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(s % 2 for s in xf.stride()[:-1]):
        xf = xf.contiguous()  # view_as_complex needs (real, imag) pairs aligned in memory
    rot = torch.complex(cos[:t], sin[:t])[:, None, :]  # broadcast over batch and heads
    if inverse:
        rot = rot.conj()
    y = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * rot)
    return y.flatten(-2).to(x.dtype)


def _grad_target(ctx, grad_into: GradSlot | None) -> torch.Tensor:
    """Where a pair backward writes ``dx``: the slot's view, or a new tensor."""
    if grad_into is not None:
        return grad_into()
    shape, dtype, device = ctx.x_meta
    return torch.empty(shape, dtype=dtype, device=device)


class _RopePairReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, n_q: int, grad_into: GradSlot | None):
        ctx.save_for_backward(cos, sin)
        ctx.n_q, ctx.grad_into, ctx.x_meta = n_q, grad_into, (x.shape, x.dtype, x.device)
        return _rotate(x[:, :, :n_q], cos, sin, False), _rotate(x[:, :, n_q:], cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dx = _grad_target(ctx, ctx.grad_into)
        for d, part in ((dq, dx[:, :, : ctx.n_q]), (dk, dx[:, :, ctx.n_q :])):
            if d is None:
                part.zero_()
            else:
                part.copy_(_rotate(d, cos, sin, inverse=True))
        return dx, None, None, None, None


def rope_pair_reference(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_q: int,
    grad_into: GradSlot | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_reference` on ``[batch, seq, n_q + n_k, head_dim]``, returned as
    ``(q, k)`` (heads ``:n_q`` and ``n_q:``); backward writes ``dx`` into ``grad_into``
    (when it fits ``x``) without concatenating ``dq`` and ``dk``."""
    _check_pair(x, cos, n_q)
    return _RopePairReference.apply(x, cos, sin, n_q, grad_into if fits(x, grad_into) else None)


def _check_pair(x: torch.Tensor, cos: torch.Tensor, n_q: int) -> None:
    if (
        x.dim() != 4
        or not 0 < n_q < x.shape[2]
        or cos.shape[-1] * 2 != x.shape[-1]
        or cos.shape[0] < x.shape[1]
    ):
        raise ValueError(
            f"rope pair: x {tuple(x.shape)} with {n_q} query heads does not fit tables "
            f"{tuple(cos.shape)}"
        )


if triton is not None:

    @triton.jit
    def _rope_kernel(
        X,
        Y,
        Cos,
        Sin,
        T,
        H,
        stride_b,
        stride_t,
        stride_h,
        ystride_b,
        ystride_t,
        ystride_h,
        sign,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per (batch, position): all heads of that token at once.
        # sign = +1 forward, -1 backward (rotation by -angle).
        # int64: b * stride_b and b * ystride_b pass 2**31 at large batches. Y may be a
        # strided view (a slice of the in-projection gradient buffer), hence its strides.
        pid = tl.program_id(0).to(tl.int64)
        b = pid // T
        t = pid % T
        heads = tl.arange(0, BLOCK_H)[:, None]
        pairs = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < H) & (pairs < HALF)
        c = tl.load(Cos + t * HALF + pairs, mask=pairs < HALF, other=0.0)
        s = tl.load(Sin + t * HALF + pairs, mask=pairs < HALF, other=0.0) * sign
        src = X + b * stride_b + t * stride_t + heads * stride_h + 2 * pairs
        x0 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        dst = Y + b * ystride_b + t * ystride_t + heads * ystride_h + 2 * pairs
        tl.store(dst, (x0 * c - x1 * s).to(Y.dtype.element_ty), mask=mask)
        tl.store(dst + 1, (x0 * s + x1 * c).to(Y.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    sign: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate ``x`` into ``out`` (any strides with a contiguous last dim) or a new tensor."""
    b, t, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        y = torch.empty((b, t, h, d), dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError(
            f"rope: out {tuple(out.shape)} stride {out.stride()} cannot take x {tuple(x.shape)}"
        )
    else:
        y = out
    if y.numel():
        _rope_kernel[(b * t,)](
            x,
            y,
            cos,
            sin,
            t,
            h,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            y.stride(0),
            y.stride(1),
            y.stride(2),
            sign,
            HALF=d // 2,
            BLOCK_H=triton.next_power_of_2(h),
            BLOCK_D=triton.next_power_of_2(d // 2),
        )
    return y


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, -1.0), None, None


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton interleaved RoPE on ``[batch, seq, heads, head_dim]`` (strided views allowed)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if (
        x.dim() != 4
        or x.shape[-1] % 2
        or cos.shape[-1] * 2 != x.shape[-1]
        or cos.shape[0] < x.shape[1]
    ):
        raise ValueError(f"rope: x {tuple(x.shape)} does not fit tables {tuple(cos.shape)}")
    cos = cos.float().contiguous()
    sin = sin.float().contiguous()
    return _RopeFunction.apply(x, cos, sin)


class _RopePairFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, n_q: int, grad_into: GradSlot | None):
        ctx.save_for_backward(cos, sin)
        ctx.n_q, ctx.grad_into, ctx.x_meta = n_q, grad_into, (x.shape, x.dtype, x.device)
        return _launch(x[:, :, :n_q], cos, sin, 1.0), _launch(x[:, :, n_q:], cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dx = _grad_target(ctx, ctx.grad_into)
        if dx.stride(-1) != 1:  # a slot's last dim is always contiguous; a guard only
            raise ValueError(f"rope pair: gradient target stride {dx.stride()}")
        for d, part in ((dq, dx[:, :, : ctx.n_q]), (dk, dx[:, :, ctx.n_q :])):
            if d is None:
                part.zero_()
            else:
                _launch(d, cos, sin, -1.0, out=part)
        return dx, None, None, None, None


def rope_pair_triton(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_q: int,
    grad_into: GradSlot | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`rope_pair_reference`: q and k rotated into two contiguous tensors;
    backward rotates ``dq`` and ``dk`` straight into their heads of ``grad_into``'s view
    (or of a new ``dx``): no ``cat``, no copy."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check_pair(x, cos, n_q)
    cos = cos.float().contiguous()
    sin = sin.float().contiguous()
    return _RopePairFunction.apply(x, cos, sin, n_q, grad_into if fits(x, grad_into) else None)
