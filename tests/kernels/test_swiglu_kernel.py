"""Triton SwiGLU vs the PyTorch reference on a strided [gate | up] view, forward and
backward, and the backward that writes into the in-projection gradient buffer. Tolerances
as in test_norm_kernel."""

import pytest
import torch
import torch.nn.functional as F

from megablocks_ablate.kernels.inproj_grad import split
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


@pytest.mark.parametrize("impl", [swiglu_triton, swiglu_reference])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_backward_writes_into_the_buffer_slot(impl, dtype):
    """MBA_INPROJ_GRAD=buffer: d[gate | up] stored straight into its slice of the
    in-projection gradient buffer; the reference's ``out=`` path is autograd's numbers
    bit for bit, the Triton kernel's within the usual tolerance."""
    g = torch.Generator().manual_seed(1)
    m = 13
    wide = (2 * torch.randn(3, 5, 8 + 2 * m, generator=g)).to(dtype)
    dy = torch.randn(3, 5, m, generator=g).to(dtype)

    src = wide.detach().clone().requires_grad_()
    (_, gu), (_, slot) = split(src * 1, [(0, 8, None), (8, 8 + 2 * m, None)])
    seen = []
    # the gradient the split receives for gate|up, and the slot's view at that moment
    gu.register_hook(lambda grad: seen.append((grad, slot())))
    y = impl(gu, slot)
    y.backward(dy)
    ((dgu, view),) = seen
    assert dgu.data_ptr() == view.data_ptr() and dgu.stride() == view.stride() == (5 * 34, 34, 1)

    ref = wide.detach().clone().requires_grad_()
    ry = swiglu_reference(ref[..., 8:])
    ry.backward(dy)
    if impl is swiglu_reference:
        assert torch.equal(y, ry) and torch.equal(src.grad, ref.grad)
    torch.testing.assert_close(y.float(), ry.float(), **TOL[dtype])
    torch.testing.assert_close(src.grad.float(), ref.grad.float(), **TOL[dtype])
    assert torch.all(src.grad[..., :8] == 0)
