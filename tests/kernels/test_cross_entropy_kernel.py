"""Chunked fused linear + cross-entropy (torch and Triton chunk steps) vs full-logits
cross-entropy, forward and backward, every reduction.

Tolerances: fp32 1e-5 (loss), 1e-5 abs on gradients; bf16 inputs vs the fp32
reference on the same bf16 values, 2e-2 (the chunk GEMMs round logits to bf16).
"""

import pytest
import torch

from megablocks_ablate.kernels.cross_entropy import (
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


@pytest.mark.parametrize("impl", ["torch", "triton"])
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
