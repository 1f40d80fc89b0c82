"""Triton interleaved RoPE vs the PyTorch reference, forward and backward, on a strided
view (q/k are column slices of the fused projection). Tolerances as in test_norm_kernel."""

import math

import pytest
import torch

from megablocks_ablate.kernels.rope import rope_reference, rope_tables, rope_triton

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
