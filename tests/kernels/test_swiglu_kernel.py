"""Triton SwiGLU vs the PyTorch reference on a strided [gate | up] view, forward and
backward. Tolerances as in test_norm_kernel."""

import pytest
import torch
import torch.nn.functional as F

from megablocks_ablate.kernels.swiglu import swiglu_reference, swiglu_triton

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    m = 13
    wide = (2 * torch.randn(3, 5, 50, generator=g)).to(dtype)
    dy = torch.randn(3, 5, m, generator=g).to(dtype)

    def run(fn, src, dy):
        src = src.detach().clone().requires_grad_()
        y = fn(src[..., 8 : 8 + 2 * m])
        y.backward(dy)
        return y, src.grad

    y, dsrc = run(swiglu_triton, wide, dy)
    ry, rdsrc = run(swiglu_reference, wide.float(), dy.float())
    assert y.shape == (3, 5, m) and y.dtype == dtype
    torch.testing.assert_close(y.float(), ry, **TOL[dtype])
    torch.testing.assert_close(dsrc.float(), rdsrc, **TOL[dtype])


def test_reference_is_silu_gate_times_up():
    gate, up = torch.randn(4, 3), torch.randn(4, 3)
    expected = gate * torch.sigmoid(gate) * up
    torch.testing.assert_close(swiglu_reference(torch.cat([gate, up], -1)), expected)
    torch.testing.assert_close(F.silu(gate) * up, expected)
