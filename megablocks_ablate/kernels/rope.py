"""Rotary position embedding with interleaved pairs, as Cohere does it.

Channel pairs ``(2i, 2i+1)`` of each head rotate by angle ``pos * theta^(-2i/head_dim)``
(GPT-J style; Llama/NeoX instead pair ``i`` with ``i + head_dim/2``)::

    y[2i]   = x[2i] * cos - x[2i+1] * sin
    y[2i+1] = x[2i] * sin + x[2i+1] * cos

``x`` is ``[batch, seq, heads, head_dim]`` and may be a strided view (q and k are
column slices of the fused input projection); ``cos``/``sin`` are fp32
``[seq, head_dim // 2]`` from :func:`rope_tables`. The rotation is done in fp32 and the
output, always contiguous, has x's dtype. The backward is the rotation by ``-angle``.
"""

from __future__ import annotations

import torch

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
    t = x.shape[1]
    xf = x.float()
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(s % 2 for s in xf.stride()[:-1]):
        xf = xf.contiguous()  # view_as_complex needs (real, imag) pairs aligned in memory
    rot = torch.complex(cos[:t], sin[:t])[:, None, :]  # broadcast over batch and heads
    y = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * rot)
    return y.flatten(-2).to(x.dtype)


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
        sign,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per (batch, position): all heads of that token at once.
        # sign = +1 forward, -1 backward (rotation by -angle).
        # int64: b * stride_b and pid * H * head_dim pass 2**31 at large batches.
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
        dst = Y + (pid * H + heads) * (2 * HALF) + 2 * pairs
        tl.store(dst, (x0 * c - x1 * s).to(Y.dtype.element_ty), mask=mask)
        tl.store(dst + 1, (x0 * s + x1 * c).to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    b, t, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((b, t, h, d), dtype=x.dtype, device=x.device)
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
