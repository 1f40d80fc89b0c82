"""Triton interleaved RoPE vs the PyTorch reference, forward and backward, on a strided
view (q/k are column slices of the fused projection), and the q/k pair whose backward
writes into the in-projection gradient buffer. Tolerances as in test_norm_kernel."""

import math

import pytest
import torch

from megablocks_ablate.kernels.inproj_grad import split
from megablocks_ablate.kernels.rope import (
    rope_pair_reference,
    rope_pair_triton,
    rope_reference,
    rope_tables,
    rope_triton,
)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    b, t, h, d = 2, 5, 3, 6
    wide = torch.randn(b, t, 40, generator=g).to(dtype)
    cos, sin = rope_tables(9, d, 10000.0)  # longer table than the sequence
    dy = torch.randn(b, t, h, d, generator=g).to(dtype)

    def run(fn, src, dy):
        src = src.detach().clone().requires_grad_()
        x = src[..., 4 : 4 + h * d].unflatten(-1, (h, d))  # strided view
        y = fn(x, cos, sin)
        y.backward(dy)
        return y, src.grad

    y, dsrc = run(rope_triton, wide, dy)
    ry, rdsrc = run(rope_reference, wide.float(), dy.float())
    assert y.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y.float(), ry, **TOL[dtype])
    torch.testing.assert_close(dsrc.float(), rdsrc, **TOL[dtype])
    assert torch.all(dsrc[..., :4] == 0) and torch.all(dsrc[..., 4 + h * d :] == 0)


def test_rope_known_values():
    # Pair (x0, x1) = (1, 0) at position p rotates to (cos a, sin a), a = p * theta^(-2i/d).
    d, theta = 4, 100.0
    cos, sin = rope_tables(3, d, theta)
    x = torch.tensor([1.0, 0.0, 1.0, 0.0]).expand(1, 3, 1, d)
    y = rope_reference(x, cos, sin)[0, :, 0]
    for p in range(3):
        for i in range(d // 2):
            a = p * theta ** (-2 * i / d)
            assert y[p, 2 * i].item() == pytest.approx(math.cos(a), abs=1e-6)
            assert y[p, 2 * i + 1].item() == pytest.approx(math.sin(a), abs=1e-6)


def test_rope_rejects_mismatched_tables():
    cos, sin = rope_tables(4, 8, 10000.0)
    with pytest.raises(ValueError, match="rope"):
        rope_triton(torch.randn(1, 5, 2, 8), cos, sin)  # sequence longer than the table


@pytest.mark.parametrize("impl", [rope_pair_triton, rope_pair_reference])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_pair_writes_into_the_buffer_slot(impl, dtype):
    """MBA_INPROJ_GRAD=buffer: q and k apart, dq/dk rotated straight into the slot's heads
    of the in-projection gradient buffer; the same numbers as rope then split (the
    reference pair bit for bit)."""
    g = torch.Generator().manual_seed(1)
    b, t, n_q, n_k, d = 2, 5, 3, 2, 6
    width = 4 + (n_q + n_k) * d + 7
    wide = torch.randn(b, t, width, generator=g).to(dtype)
    cos, sin = rope_tables(9, d, 10000.0)
    dq = torch.randn(b, t, n_q, d, generator=g).to(dtype)
    dk = torch.randn(b, t, n_k, d, generator=g).to(dtype)
    parts = [(0, 4, None), (4, 4 + (n_q + n_k) * d, (n_q + n_k, d)), (width - 7, width, None)]

    src = wide.detach().clone().requires_grad_()
    (_, x, _), (_, slot, _) = split(src * 1, parts)
    seen = []  # the gradient the split receives for q|k, and the slot's view then
    x.register_hook(lambda grad: seen.append((grad, slot())))
    q, k = impl(x, cos, sin, n_q, slot)
    assert q.shape == (b, t, n_q, d) and k.shape == (b, t, n_k, d) and q.dtype == dtype
    ((q.float() * dq.float()).sum() + (k.float() * dk.float()).sum()).backward()
    ((dx, view),) = seen
    assert dx.data_ptr() == view.data_ptr() and dx.stride() == view.stride()
    assert dx.stride() == (t * width, width, d, 1)

    ref = wide.detach().clone().requires_grad_()
    y = rope_reference(ref[..., 4 : 4 + (n_q + n_k) * d].unflatten(-1, (n_q + n_k, d)), cos, sin)
    rq, rk = y.split([n_q, n_k], dim=2)
    ((rq.float() * dq.float()).sum() + (rk.float() * dk.float()).sum()).backward()
    if impl is rope_pair_reference:
        assert torch.equal(q, rq) and torch.equal(k, rk) and torch.equal(src.grad, ref.grad)
    torch.testing.assert_close(q.float(), rq.float(), **TOL[dtype])
    torch.testing.assert_close(k.float(), rk.float(), **TOL[dtype])
    torch.testing.assert_close(src.grad.float(), ref.grad.float(), **TOL[dtype])
    assert torch.all(src.grad[..., :4] == 0) and torch.all(src.grad[..., width - 7 :] == 0)


def test_rope_pair_without_slot_and_with_unused_k():
    g = torch.Generator().manual_seed(2)
    cos, sin = rope_tables(5, 4, 100.0)
    x = torch.randn(1, 5, 3, 4, generator=g, requires_grad=True)
    q, _ = rope_pair_triton(x, cos, sin, 2)  # no slot: dx is a tensor of its own
    q.sum().backward()
    xr = x.detach().clone().requires_grad_()
    rope_reference(xr, cos, sin)[:, :, :2].sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **TOL[torch.float32])
    assert torch.all(x.grad[:, :, 2:] == 0)  # k unused: its heads get zeros, not garbage
    with pytest.raises(ValueError, match="rope pair"):
        rope_pair_reference(x, cos, sin, 3)  # no key heads left
