"""Fused output projection + cross-entropy, in row chunks.

The ``[tokens, vocab]`` logits of a 2048x8 batch with a 50304 vocabulary take 3.3 GB
in fp32; with the gradient they are the largest tensors of a small model's step. Here
the rows are processed ``chunk_rows`` at a time: for each chunk the logits are made
(one GEMM), reduced to the per-token NLL, and -- when a gradient is wanted for a
summed or mean loss -- turned in place into ``d loss / d logits`` and multiplied
straight into the gradients of the hidden states and of the weight (two GEMMs). The
backward then only rescales those stored gradients by the incoming scalar. Peak extra
memory is one chunk of logits, never the whole table.

Per chunk, with ``z = logit_scale * logits`` (math in fp32)::

    nll   = logsumexp(z) - z[label]
    dz    = softmax(z) - onehot(label)          (0 for ignored rows)
    dlogits = logit_scale * dz

* :func:`linear_cross_entropy_reference` -- full logits, autograd (ground truth for tests).
* :func:`linear_cross_entropy` -- the chunked Function; ``impl`` picks the per-chunk
  softmax/NLL/gradient step: ``"torch"``, ``"triton"`` (one program per row, two
  passes over the vocabulary, gradient written over the logits) or ``"cpp"`` (the
  same per row on CPU, ``csrc/cross_entropy.cpp``, for training: fp32 logits, OpenMP
  over rows; the NLL alone and other dtypes take the torch step).

``reduction="none"`` returns the per-token NLL in fp32 (evaluation); its backward, if
ever needed, recomputes the logits chunk by chunk.

Precision of the weight gradient. ``d loss / d weight`` is a sum over every chunk
(``dlogits_c.T @ hidden_c``), so it is accumulated in an fp32 buffer whatever the
compute dtype, and rounded once, to the weight's own dtype, at the end: summing ~25
chunk products in bf16 would round the running sum to 8 mantissa bits at each add, an
error that grows with the number of chunks. For the same reason the Function takes the
weight in its own dtype (fp32 master weights under autocast) and makes the bf16 copy
for the GEMMs itself: the gradient it returns is then the fp32 accumulator, never a
bf16 tensor cast back up. The mean's ``1 / count`` is applied to the fp32 sum before
that rounding; the incoming scalar (1.0 in training) after it. On CUDA each chunk's
product goes straight into the fp32 buffer (``addmm`` with ``out_dtype``); where that
is unavailable (CPU) the product is made in the compute dtype and added in fp32, one
rounding per chunk product rather than one per partial sum. The hidden-state
gradient needs no buffer: each row's is one GEMM, made once.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megablocks_ablate import _ext
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.env_choice import env_choice

try:
    import triton
    import triton.language as tl
except ImportError:  # torch per-chunk step only
    triton = None

IGNORE_INDEX = -100
LEGACY_NUM_WARPS = 4  # the Triton row step's warps before choose_chunking

logger = logging.getLogger(__name__)


def linear_cross_entropy_reference(
    hidden,
    weight,
    labels,
    logit_scale: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
):
    """``cross_entropy(logit_scale * hidden @ weight.T, labels)`` through full fp32 logits."""
    logits = (hidden @ weight.t()).float() * logit_scale
    nll = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return nll
    total = nll.sum()
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


# ---- per-chunk step: nll, and optionally dlogits written over the logits ----------------


def _ce_chunk_torch(
    logits: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index: int, grad: bool
) -> torch.Tensor:
    z = logits.float()
    if scale != 1.0:
        z = z * scale
    logp = torch.log_softmax(z, dim=-1)  # one fused pass; exp of it is the softmax
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    nll = (-logp.gather(1, safe[:, None])[:, 0]).masked_fill_(~valid, 0.0)
    if grad:
        dz = logp.exp_()
        dz[torch.arange(dz.shape[0], device=dz.device), safe] -= 1.0
        if scale != 1.0:
            dz.mul_(scale)
        # Zero the ignored rows. On CPU (no sync to fear) a chunk with none skips the
        # pass over the whole [rows, vocab] block: same bits, ~4% of a small model's step.
        if dz.device.type != "cpu" or not bool(valid.all()):
            dz.masked_fill_(~valid[:, None], 0.0)
        logits.copy_(dz)
    return nll


if triton is not None:

    @triton.jit
    def _ce_chunk_kernel(
        Logits,
        Labels,
        Nll,
        V,
        stride_row,
        scale,
        ignore_index,
        GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        base = Logits + row.to(tl.int64) * stride_row
        label = tl.load(Labels + row)
        valid = label != ignore_index
        # Pass 1: online max and sum of exp over the vocabulary.
        m = float("-inf")
        acc = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * scale
            m_new = tl.maximum(m, tl.max(z, axis=0))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(acc)
        target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32) * scale
        tl.store(Nll + row, tl.where(valid, lse - target, 0.0))
        if GRAD:
            # Pass 2: dlogits = scale * (softmax - onehot), zero for ignored rows.
            g = tl.where(valid, scale, 0.0)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < V
                z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * scale
                p = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
                tl.store(base + cols, (p * g).to(Logits.dtype.element_ty), mask=mask)


def cpp_available() -> bool:
    """Whether the C++ chunk step (``csrc/cross_entropy.cpp``) is built."""
    return _ext.cpp is not None and hasattr(_ext.cpp, "ce_rows")


def _ce_chunk_cpp(
    logits: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index: int, grad: bool
) -> torch.Tensor:
    """The chunk step of ``csrc/cross_entropy.cpp`` on fp32 CPU logits when a gradient
    is wanted (each row read while in cache: max, sum of exponentials written over the
    row, one in-place scaling; no fresh ``[rows, vocab]`` tensor, no separate exp,
    one-hot subtraction or copy back). The NLL alone (evaluation) takes the torch step:
    there ``log_softmax`` is one fused pass and measured as fast as the kernel. Any
    other dtype or layout takes the torch step. Threads: torch's intra-op count."""
    if (
        not grad
        or logits.dtype != torch.float32
        or logits.device.type != "cpu"
        or logits.stride(1) != 1
        or scale <= 0
        or not cpp_available()
    ):
        return _ce_chunk_torch(logits, labels, scale, ignore_index, grad)
    n, v = logits.shape
    nll = torch.empty(n, dtype=torch.float32)
    if n == 0:
        return nll
    labels = labels.to(torch.int64).contiguous()
    bad = _ext.cpp.ce_rows(
        logits.data_ptr(),
        n,
        v,
        logits.stride(0),
        labels.data_ptr(),
        nll.data_ptr(),
        float(scale),
        int(ignore_index),
        bool(grad),
        torch.get_num_threads(),
    )
    if bad:
        raise IndexError(
            f"linear_cross_entropy: {bad} label(s) outside [0, {v}) "
            f"(and not ignore_index {ignore_index})"
        )
    return nll


def _ce_chunk_triton(logits, labels, scale, ignore_index, grad, num_warps=LEGACY_NUM_WARPS):
    n, v = logits.shape
    nll = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _ce_chunk_kernel[(n,)](
            logits,
            labels,
            nll,
            v,
            logits.stride(0),
            scale,
            ignore_index,
            GRAD=grad,
            BLOCK=_triton_block(v),
            num_warps=num_warps,
        )
    return nll


_CHUNK_STEPS = {"torch": _ce_chunk_torch, "triton": _ce_chunk_triton, "cpp": _ce_chunk_cpp}


def _step(impl: str, num_warps: int):
    """The per-chunk step ``impl`` (the Triton one launched with ``num_warps``)."""
    if impl == "triton":
        return functools.partial(_ce_chunk_triton, num_warps=num_warps)
    return _CHUNK_STEPS[impl]


def default_chunk_rows(n_rows: int, d_model: int, vocab: int) -> int:
    """Rows per chunk so a chunk's logits are no larger than the hidden states (or 4M entries)."""
    budget = max(n_rows * d_model, 1 << 22)
    return max(8, min(n_rows, budget // max(vocab, 1) // 8 * 8))


# ---- chunk size and warps from the shapes ------------------------------------------------
#
# Per chunk the weight gradient's fp32 accumulator ([vocab, d_model]: 412 MB at 1.1b) is
# read and written once (``addmm``), whatever the chunk's size, while the logits'
# traffic (GEMM out, two passes of the row step, two GEMMs in) adds up to the same total
# however they are chunked. ``default_chunk_rows`` keeps a chunk's logits as small as the
# hidden states (memory first: right on CPU, where the chunk should stay in cache, and
# the C++ step is tuned for it); at 1.1b x 8192 tokens that is 25 chunks, i.e. 20 GB of
# accumulator traffic, about as long as the GEMMs themselves on an H100. On CUDA the
# chunk is instead as large as a logits budget allows (CUDA_CHUNK_LOGIT_BYTES, split
# evenly): one or two chunks per micro batch at the presets' shapes. The Triton row step
# streams a row of ``vocab`` logits in blocks of up to 4096; 8 warps (256 threads, 16
# elements each) keep more loads in flight per row than the old fixed 4.

CE_CHUNKS_ENV = "MBA_CE_CHUNKS"  # auto (default) | legacy: default_chunk_rows and 4 warps
CE_CHUNK_MODES = ("auto", "legacy")
CUDA_CHUNK_LOGIT_BYTES = 1 << 30  # a chunk's logits (plus its fp32 temporaries) on CUDA


@dataclass(frozen=True)
class Chunking:
    """How the fused loss walks the rows: ``chunk_rows`` per chunk, Triton ``num_warps``."""

    chunk_rows: int
    num_warps: int


def ce_chunk_mode() -> str:
    """``MBA_CE_CHUNKS``: ``auto`` (default) or ``legacy`` (the fixed rule before it)."""
    return env_choice(CE_CHUNKS_ENV, CE_CHUNK_MODES, "auto")


def _triton_block(vocab: int) -> int:
    return min(4096, 1 << max(0, vocab - 1).bit_length())


def choose_chunking(
    n_rows: int,
    d_model: int,
    vocab: int,
    device_type: str,
    logit_bytes: int = 2,
    impl: str = "triton",
    mode: str | None = None,
) -> Chunking:
    """Chunk rows and Triton warps for ``n_rows`` x ``d_model`` hidden states against a
    ``vocab``-row weight whose logits take ``logit_bytes`` each (the compute dtype).

    ``mode`` (default :func:`ce_chunk_mode`): ``legacy``, or any device but CUDA, gives
    ``default_chunk_rows`` and 4 warps (CPU unchanged). ``auto`` on CUDA: the fewest
    chunks whose logits (with the torch step's two fp32 temporaries per logit when
    ``impl`` is not ``triton``) fit :data:`CUDA_CHUNK_LOGIT_BYTES`, rows split evenly
    and rounded up to a multiple of 64; 8 warps when a row step's block is >= 2048
    columns. Never fewer rows than the legacy rule. Results do not depend on it beyond
    the fp32 summation order of the weight gradient (tests/kernels/test_ce_chunking.py).
    """
    mode = ce_chunk_mode() if mode is None else mode
    if mode not in CE_CHUNK_MODES:
        raise ConfigError(f"cross-entropy chunking: expected one of {CE_CHUNK_MODES}, got {mode!r}")
    legacy = default_chunk_rows(n_rows, d_model, vocab)
    if mode == "legacy" or device_type != "cuda":
        return Chunking(legacy, LEGACY_NUM_WARPS)
    per_row = max(vocab, 1) * (logit_bytes + (0 if impl == "triton" else 8))
    cap = max(1, CUDA_CHUNK_LOGIT_BYTES // per_row)
    chunks = max(1, -(-n_rows // cap))
    rows = -(-n_rows // chunks)
    rows = min(max(n_rows, 1), -(-rows // 64) * 64)
    warps = 8 if _triton_block(vocab) >= 2048 else LEGACY_NUM_WARPS
    return Chunking(max(rows, legacy), warps)


# (device type, compute dtype) -> whether ``torch.addmm(..., out_dtype=float32)`` runs there
_FP32_OUT_ADDMM: dict[tuple[str, torch.dtype], bool] = {}


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` with ``acc`` fp32 and ``a``, ``b`` in the compute dtype.

    Returns the new accumulator (the same tensor when updated in place). Where the GEMM
    can write fp32 from bf16/fp16 inputs (CUDA), the product is never rounded; else it is
    rounded once to the compute dtype and added in fp32.
    """
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    key = (a.device.type, a.dtype)
    if _FP32_OUT_ADDMM.get(key, True):
        try:
            result = torch.addmm(acc, a, b, torch.float32)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            # Not built for this backend (CPU) or this torch: remember, use the fallback.
            _FP32_OUT_ADDMM[key] = False
            logger.debug(f"addmm with out_dtype=float32 unavailable on {key}: {e}")
        else:
            _FP32_OUT_ADDMM[key] = True
            return result
    return acc.add_(torch.mm(a, b))


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked fused linear + CE. ``weight`` arrives in its own dtype and is cast to the
    compute dtype (``hidden.dtype``) here, so its gradient leaves in that dtype straight
    from the fp32 accumulator (see the module doc)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, labels, scale, ignore_index, reduction, chunk_rows, impl, num_warps
    ):
        step = _step(impl, num_warps)
        n = hidden.shape[0]
        w = weight.to(hidden.dtype)
        want_grad = reduction != "none" and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_grad else None
        grad_w = None
        if want_grad:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, n, chunk_rows):
            h = hidden[start : start + chunk_rows]
            logits = h @ w.t()
            nll[start : start + chunk_rows] = step(
                logits, labels[start : start + chunk_rows], scale, ignore_index, want_grad
            )
            if want_grad:  # logits now hold dloss/dlogits of the summed loss
                torch.mm(logits, w, out=grad_h[start : start + chunk_rows])
                grad_w = _add_product_fp32(grad_w, logits.t(), h)
        ctx.scale, ctx.ignore_index, ctx.reduction = scale, ignore_index, reduction
        ctx.chunk_rows, ctx.impl, ctx.num_warps = chunk_rows, impl, num_warps
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, labels)
            return nll
        count = (labels != ignore_index).sum().clamp(min=1)
        if grad_w is not None:
            if reduction == "mean":
                grad_w.div_(count)  # in fp32, before the one rounding below
            # Saved in the weight's dtype: fp32 master weights keep every bit, a bf16
            # weight is rounded once (not at each chunk).
            grad_w = grad_w.to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w, count)
        return nll.sum() if reduction == "sum" else nll.sum() / count

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction != "none":
            grad_h, grad_w, count = ctx.saved_tensors
            g = grad_out if ctx.reduction == "sum" else grad_out / count
            dh = grad_h * g.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
            dw = grad_w * grad_out.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
            return dh, dw, None, None, None, None, None, None, None
        # Per-token loss with a gradient (rare): recompute each chunk's logits.
        hidden, weight, labels = ctx.saved_tensors
        w = weight.to(hidden.dtype)
        dh = torch.empty_like(hidden)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        step = _step(ctx.impl, ctx.num_warps)
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            logits = hidden[rows] @ w.t()
            step(logits, labels[rows], ctx.scale, ctx.ignore_index, True)
            logits.mul_(grad_out[rows, None].to(logits.dtype))
            torch.mm(logits, w, out=dh[rows])
            dw = _add_product_fp32(dw, logits.t(), hidden[rows])
        return dh, dw.to(weight.dtype), None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_rows: int | None = None,
    impl: str = "torch",
    num_warps: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logit_scale * hidden @ weight.T`` against ``labels`` without full logits.

    ``hidden`` ``[N, d]``, ``weight`` ``[V, d]``, ``labels`` ``[N]`` (``ignore_index``
    rows count zero). ``reduction``: ``"mean"`` over non-ignored rows (0 when there are
    none), ``"sum"``, or ``"none"`` for the per-token fp32 NLL ``[N]``. ``chunk_rows``
    and ``num_warps`` (Triton step) default to :func:`choose_chunking`'s.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    if impl == "triton" and triton is None:
        raise RuntimeError("triton is not installed")
    if impl == "cpp" and not cpp_available():
        raise RuntimeError("megablocks_ablate._C has no ce_rows: run `make build`")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: labels {tuple(labels.shape)} vs hidden {tuple(hidden.shape)}"
        )
    # The Function runs its GEMMs itself: under autocast, cast here (outside it) so
    # the casts stay differentiable and the chunks run in the autocast dtype.
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        hidden = hidden.to(torch.get_autocast_dtype(device_type))
    hidden = hidden.contiguous()
    labels = labels.contiguous()
    # ``weight`` goes in uncast: the Function makes the compute-dtype copy itself so the
    # gradient it returns is the fp32 accumulator in the weight's dtype (module doc).
    chosen = choose_chunking(
        hidden.shape[0], hidden.shape[1], weight.shape[0], device_type, hidden.element_size(), impl
    )
    rows = chunk_rows or chosen.chunk_rows
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden,
            weight,
            labels,
            float(logit_scale),
            int(ignore_index),
            reduction,
            max(1, int(rows)),
            impl,
            int(num_warps or chosen.num_warps),
        )
