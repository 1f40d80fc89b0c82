"""Triton LayerNorm/RMSNorm vs the PyTorch reference, forward and backward.

Tolerances: fp32 1e-5 (dW, a sum over rows, 1e-4); bf16 inputs are compared with the
reference evaluated in fp32 on the same bf16 values, to 2e-2 (about 3 bf16 ulps).
"""

import pytest
import torch

from megablocks_ablate.kernels.norm import norm_reference, norm_triton

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
TOL_DW = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


def _run(fn, x, w, dy, kind):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, 1e-5, kind)
    y.backward(dy)
    return y, x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("shape,w_shape", [((3, 7, 37), (37,)), ((2, 5, 3, 10), (3, 10))])
def test_norm_matches_reference(dtype, kind, shape, w_shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    w = (1 + 0.3 * torch.randn(w_shape, generator=g)).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    y, dx, dw = _run(norm_triton, x, w, dy, kind)
    ry, rdx, rdw = _run(norm_reference, x.float(), w.float(), dy.float(), kind)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    torch.testing.assert_close(y.float(), ry, **TOL[dtype])
    torch.testing.assert_close(dx.float(), rdx, **TOL[dtype])
    torch.testing.assert_close(dw.float(), rdw, **TOL_DW[dtype])


def test_reference_is_cohere_layernorm():
    # Cohere: fp32 (x - mean) * rsqrt(var + eps) * weight, biased variance, no bias.
    x = torch.randn(4, 9, dtype=torch.float64)
    w = torch.randn(9, dtype=torch.float64)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * w
    torch.testing.assert_close(norm_reference(x, w, 1e-5), expected)
    rms = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(norm_reference(x, w, 1e-5, "rmsnorm"), rms)


def test_bad_weight_shape_is_rejected():
    with pytest.raises(ValueError, match="weight shape"):
        norm_triton(torch.randn(2, 8), torch.ones(7), 1e-5)
