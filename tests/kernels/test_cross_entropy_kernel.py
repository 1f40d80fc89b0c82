"""Chunked fused linear + cross-entropy (torch and Triton chunk steps) vs full-logits
cross-entropy, forward and backward, every reduction.

Tolerances: fp32 1e-5 (loss), 1e-5 abs on gradients; bf16 inputs vs the fp32
reference on the same bf16 values, 2e-2 (the chunk GEMMs round logits to bf16).

The weight gradient is a sum over chunks: with many chunks its bf16 error is checked
against an fp64 reference and contrasted with summing the chunks in bf16 (the old loop).
"""

import pytest
import torch

from megablocks_ablate.kernels.cross_entropy import (
    _CHUNK_STEPS,
    default_chunk_rows,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _inputs(dtype, n=37, d=12, v=131):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (0.5 * torch.randn(v, d, generator=g)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 5, 36]] = -100
    return h, w, labels


def _run(fn, h, w, labels, reduction, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = fn(h, w, labels, logit_scale=0.5, reduction=reduction, **kw)
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(out.shape, generator=g) if reduction == "none" else torch.tensor(1.7)
    (out * weights.to(out.dtype)).sum().backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("impl", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_matches_full_logits(impl, dtype, reduction):
    h, w, labels = _inputs(dtype)
    out, dh, dw = _run(linear_cross_entropy, h, w, labels, reduction, chunk_rows=8, impl=impl)
    ref, rdh, rdw = _run(linear_cross_entropy_reference, h.float(), w.float(), labels, reduction)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(dh.float(), rdh, **TOL[dtype])
    torch.testing.assert_close(dw.float(), rdw, **TOL[dtype])
    if reduction == "none":
        assert torch.all(out[[0, 5, 36]] == 0)


def test_all_ignored_gives_zero_loss_and_grads():
    h, w, labels = _inputs(torch.float32)
    labels[:] = -100
    out, dh, dw = _run(linear_cross_entropy, h, w, labels, "mean", chunk_rows=2)
    assert out.item() == 0.0 and torch.all(dh == 0) and torch.all(dw == 0)


def test_uniform_logits_give_log_vocab():
    v = 50
    h = torch.zeros(4, 3)
    w = torch.randn(v, 3)
    out = linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 49]))
    assert out.item() == pytest.approx(torch.log(torch.tensor(float(v))).item(), rel=1e-6)


def test_chunks_stay_small():
    # 8 x 2048 tokens, d=768, vocab 50304: a chunk holds no more entries than the hidden states.
    n, d, v = 16384, 768, 50304
    rows = default_chunk_rows(n, d, v)
    assert rows * v <= n * d and rows < n and rows % 8 == 0


# ---- precision of the weight gradient summed over many chunks ----------------------------


def _many_chunk_inputs(n, d=32, v=64, seed=0):
    """bf16 activations with a common offset, so every chunk's contribution to the weight
    gradient points the same way and the running sum grows: the case where rounding the
    sum at each add (bf16 accumulation) loses the most."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) + 1.0).to(torch.bfloat16)
    w = (0.1 * torch.randn(v, d, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    return h, w, labels


def _fp64_weight_grad(h, w, labels, scale):
    """d mean-CE / d weight in fp64 on the same (bf16-valued) inputs: the ground truth."""
    w64 = w.double().requires_grad_()
    logits = (h.double() @ w64.t()) * scale
    torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100).backward()
    return w64.grad


def _bf16_accumulated_weight_grad(h, w, labels, scale, chunk_rows):
    """What the chunk loop computed before the fix: the weight gradient summed chunk by
    chunk in a bf16 buffer, then scaled by 1/count in bf16 (torch chunk step)."""
    acc = torch.zeros_like(w)
    for start in range(0, h.shape[0], chunk_rows):
        hc = h[start : start + chunk_rows]
        logits = hc @ w.t()
        _CHUNK_STEPS["torch"](logits, labels[start : start + chunk_rows], scale, -100, True)
        acc.addmm_(logits.t(), hc)
    count = (labels != -100).sum()
    return acc * (1.0 / count).to(acc.dtype)


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


# The Triton step runs interpreted (one Python program per row): fewer rows, same 256 chunks.
# The bf16-accumulation contrast always uses the torch step: its dlogits are at least as
# accurate as the interpreted kernel's (the interpreter truncates fp32 -> bf16 where the
# GPU rounds to nearest), so the contrast errs on the small side and costs no extra
# interpreted launches.
@pytest.mark.parametrize("impl, n, chunk_rows", [("torch", 2048, 8), ("triton", 512, 2)])
def test_weight_grad_accumulates_in_fp32_over_many_chunks(impl, n, chunk_rows):
    scale = 0.5
    h, w, labels = _many_chunk_inputs(n)
    ref = _fp64_weight_grad(h, w, labels, scale)
    wg = w.clone().requires_grad_()
    linear_cross_entropy(
        h, wg, labels, logit_scale=scale, chunk_rows=chunk_rows, impl=impl
    ).backward()
    assert wg.grad.dtype == torch.bfloat16
    new = _rel(wg.grad, ref)
    old = _rel(_bf16_accumulated_weight_grad(h, w, labels, scale, chunk_rows), ref)
    # The result is bf16, so ~2^-9 relative is the floor (rounding the exact answer gives
    # ~1.7e-3 here). Measured: fp32 accumulation 2.1e-3 (torch) / 3.7e-3 (interpreted
    # Triton, truncating), bf16 accumulation ~2.5e-2.
    assert new < 6e-3, new
    assert old > 4 * new, (old, new)


def test_fp32_master_weight_gets_an_fp32_gradient_under_autocast():
    """Under bf16 autocast with an fp32 weight, the gradient is the fp32 accumulator, not a
    bf16 tensor cast back up (before the fix every element was a bf16 value)."""
    scale = 0.5
    h, w, labels = _many_chunk_inputs(1024)
    ref = _fp64_weight_grad(h, w, labels, scale)
    wf = w.float().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        linear_cross_entropy(h.float(), wf, labels, logit_scale=scale, chunk_rows=4).backward()
    assert wf.grad.dtype == torch.float32
    representable = (wf.grad == wf.grad.bfloat16().float()).float().mean().item()
    assert representable < 0.05, representable
    assert _rel(wf.grad, ref) < 4e-3
