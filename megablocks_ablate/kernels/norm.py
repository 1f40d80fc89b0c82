"""LayerNorm (no bias, as Cohere/PaLM) and RMSNorm over the last dimension.

``weight`` has the shape of the trailing dimensions it scales: ``[N]`` for the block
norm, ``[heads, head_dim]`` for per-head QK-norm (Cohere normalises each head over
``head_dim`` with its own weight row). Statistics are computed in fp32 whatever the
input dtype; the output has the input dtype.

* :func:`norm_reference` -- pure PyTorch, differentiated by autograd (ground truth).
* :func:`norm_triton` -- Triton forward/backward kernels behind an autograd Function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # reference path only
    triton = None

KINDS = ("layernorm", "rmsnorm")


def norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str = "layernorm"
) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + eps) * weight`` (layernorm) or ``x * rsqrt(mean(x^2) + eps) * weight``."""
    n = x.shape[-1]
    if kind not in KINDS:
        raise ValueError(f"norm kind must be one of {KINDS}, got {kind!r}")
    fn = F.layer_norm if kind == "layernorm" else F.rms_norm
    if weight.dim() == 1:
        # Native fused op (fp32 statistics inside): the fast CPU path.
        return fn(x, (n,), weight, eps=eps) if kind == "rmsnorm" else fn(x, (n,), weight, None, eps)
    y = fn(x.float(), (n,), eps=eps) if kind == "rmsnorm" else fn(x.float(), (n,), None, None, eps)
    return (y * weight.float()).to(x.dtype)


if triton is not None:

    @triton.jit
    def _norm_fwd_kernel(
        X, W, Y, Mean, Rstd, N, w_rows, eps, IS_LN: tl.constexpr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)  # row * N passes 2**31 at ~150K tokens
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        if IS_LN:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
        else:
            mean = 0.0
            xc = x
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        w = tl.load(W + (row % w_rows) * N + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * N + cols, (xc * rstd * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)

    @triton.jit
    def _norm_bwd_kernel(
        X,
        W,
        DY,
        DX,
        DW_partial,
        Mean,
        Rstd,
        n_rows,
        N,
        w_rows,
        n_programs,
        IS_LN: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # Program p handles rows p, p + n_programs, ...; n_programs is a multiple of
        # w_rows, so all its rows use weight row p % w_rows and it can accumulate that
        # row's dW in registers, written once to DW_partial[p].
        # int64 so that the loop's row (same type as its range start) is 64-bit too.
        pid = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        w = tl.load(W + (pid % w_rows) * N + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(pid, n_rows, n_programs):
            x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / N
            if IS_LN:
                c2 = tl.sum(wdy, axis=0) / N
                dx = (wdy - (xhat * c1 + c2)) * rstd
            else:
                dx = (wdy - xhat * c1) * rstd
            tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
        tl.store(DW_partial + pid * N + cols, dw, mask=mask)


def _programs_for_dw(n_rows: int, w_rows: int, device: torch.device) -> int:
    target = (
        4 * torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 8
    )
    k = max(1, min(target // w_rows, n_rows // w_rows))
    return k * w_rows


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str):
        n = x.shape[-1]
        w_rows = weight.numel() // n
        x2 = x.reshape(-1, n).contiguous()
        w2 = weight.contiguous()
        y = torch.empty_like(x2)
        rows = x2.shape[0]
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block = triton.next_power_of_2(n)
        if rows:
            _norm_fwd_kernel[(rows,)](
                x2, w2, y, mean, rstd, n, w_rows, eps, IS_LN=kind == "layernorm", BLOCK=block
            )
        ctx.save_for_backward(x2, w2, mean, rstd)
        ctx.kind, ctx.w_shape, ctx.w_rows = kind, weight.shape, w_rows
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w2, mean, rstd = ctx.saved_tensors
        rows, n = x2.shape
        dy2 = dy.reshape(-1, n).contiguous()
        dx = torch.empty_like(x2)
        programs = _programs_for_dw(rows, ctx.w_rows, x2.device)
        dw_partial = torch.zeros(programs, n, dtype=torch.float32, device=x2.device)
        if rows:
            _norm_bwd_kernel[(programs,)](
                x2,
                w2,
                dy2,
                dx,
                dw_partial,
                mean,
                rstd,
                rows,
                n,
                ctx.w_rows,
                programs,
                IS_LN=ctx.kind == "layernorm",
                BLOCK=triton.next_power_of_2(n),
            )
        dw = dw_partial.view(-1, ctx.w_rows, n).sum(0).view(ctx.w_shape).to(w2.dtype)
        return dx.view(dy.shape), dw, None, None


def norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str = "layernorm"
) -> torch.Tensor:
    """Triton LayerNorm/RMSNorm; ``weight`` is ``[N]`` or ``[rows, N]`` matching x's trailing dims."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if kind not in KINDS:
        raise ValueError(f"norm kind must be one of {KINDS}, got {kind!r}")
    if tuple(weight.shape) != tuple(x.shape[x.dim() - weight.dim() :]):
        raise ValueError(
            f"norm weight shape {tuple(weight.shape)} does not match input {tuple(x.shape)}"
        )
    return _NormFunction.apply(x, weight, eps, kind)
