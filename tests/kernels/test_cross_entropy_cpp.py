"""The C++ chunk step of the fused linear + cross-entropy (``csrc/cross_entropy.cpp``)
against fp64 PyTorch: its exp, per-row NLL and in-place gradient, non-finite rows, bad
labels, thread-count independence, and the dispatch that picks it on CPU.

``test_cross_entropy_kernel.py`` also runs it through the chunked Function (every
reduction, fp32 and bf16) against the full-logits reference.
"""

import pytest
import torch

from megablocks_ablate import _ext
from megablocks_ablate.kernels import dispatch
from megablocks_ablate.kernels.cross_entropy import (
    _CHUNK_STEPS,
    cpp_available,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

step = _CHUNK_STEPS["cpp"]


def test_extension_has_the_kernel():
    # _C is always built (make install); a build without the kernel is a broken build.
    assert cpp_available()


def test_exp_matches_fp64_within_two_ulp():
    x = torch.cat([torch.linspace(-87.0, 0.0, 200_001), torch.linspace(0.0, 80.0, 10_001)])
    out = torch.empty_like(x)
    _ext.cpp.exp_approx(out.data_ptr(), x.data_ptr(), x.numel())
    ref = x.double().exp()
    rel = ((out.double() - ref).abs() / ref).max().item()
    assert rel < 2.4e-7, rel  # 2 ulp of fp32
    special = torch.tensor([float("-inf"), -1e4, -87.5, float("nan")])
    out = torch.empty_like(special)
    _ext.cpp.exp_approx(out.data_ptr(), special.data_ptr(), special.numel())
    assert out[:3].tolist() == [0.0, 0.0, 0.0] and torch.isnan(out[3])


def _kernel(logits, labels, scale, grad, threads=0):
    """``ce_rows`` called directly (the chunk step sends the NLL alone to torch)."""
    nll = torch.empty(logits.shape[0])
    bad = _ext.cpp.ce_rows(
        logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0),
        labels.data_ptr(), nll.data_ptr(), scale, -100, grad, threads,
    )  # fmt: skip
    if bad:
        raise IndexError(f"{bad} bad labels")
    return nll


def _case(rows=64, vocab=2048, spread=30.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = spread * torch.randn(rows, vocab, generator=g)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[[i for i in (3, 17) if i < rows]] = -100
    return logits, labels


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_nll_and_gradient_match_fp64(scale):
    logits, labels = _case()
    z = logits.double() * scale
    valid = labels != -100
    safe = torch.where(valid, labels, 0)
    logp = torch.log_softmax(z, -1)
    ref_nll = torch.where(valid, -logp.gather(1, safe[:, None])[:, 0], 0.0)
    ref_grad = scale * (logp.exp() - torch.nn.functional.one_hot(safe, z.shape[1]))
    ref_grad[~valid] = 0.0

    nll = _kernel(logits.clone(), labels, scale, grad=False)  # the kernel's NLL-only path
    torch.testing.assert_close(nll.double(), ref_nll, rtol=1e-6, atol=1e-5)
    grad = logits.clone()
    nll_g = step(grad, labels, scale, -100, True)
    assert torch.equal(nll_g, nll)  # the same sums with or without the gradient
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.all(grad[[3, 17]] == 0)


def test_strided_rows_leave_the_rest_untouched():
    # A chunk of a wider buffer: only the first `vocab` columns of each row are the row.
    buf = torch.randn(8, 40)
    logits = buf[:, :33]
    labels = torch.arange(8)
    expect = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    tail, rows = buf[:, 33:].clone(), logits.clone()
    nll = step(logits, labels, 1.0, -100, True)
    torch.testing.assert_close(nll, expect, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_kernel(rows, labels, 1.0, grad=False), expect)
    assert torch.equal(buf[:, 33:], tail)


def test_non_finite_logit_makes_that_row_nan():
    logits, labels = _case(rows=6, vocab=100)
    labels[:] = 1
    logits[1, 50] = float("nan")
    logits[2, 7] = float("inf")
    logits[4, 0] = float("nan")  # the first element: the max's starting value
    nll = _kernel(logits.clone(), labels, 1.0, grad=False)
    assert torch.isnan(nll[[1, 2, 4]]).all()
    grad_nll = step(logits.clone(), labels, 1.0, -100, True)
    assert torch.isnan(grad_nll[[1, 2, 4]]).all() and torch.isfinite(grad_nll[[0, 3, 5]]).all()
    assert torch.isfinite(nll[[0, 3, 5]]).all()


def test_label_out_of_range_is_refused():
    logits, labels = _case(rows=4, vocab=10)
    labels[2] = 10
    with pytest.raises(IndexError, match=r"1 label\(s\) outside \[0, 10\)"):
        step(logits, labels, 1.0, -100, True)


def test_result_does_not_depend_on_the_thread_count():
    logits, labels = _case(rows=301, vocab=517, seed=3)
    outs = []
    for threads in (1, 2, 3):
        g = logits.clone()
        outs.append((_kernel(g, labels, 0.5, grad=True, threads=threads), g))
    for nll, g in outs[1:]:
        assert torch.equal(nll, outs[0][0]) and torch.equal(g, outs[0][1])


def test_other_dtypes_take_the_torch_step():
    logits, labels = _case(rows=16, vocab=64)
    half = logits.bfloat16()
    a, b = half.clone(), half.clone()
    assert torch.equal(
        step(a, labels, 1.0, -100, True), _CHUNK_STEPS["torch"](b, labels, 1.0, -100, True)
    )
    assert torch.equal(a, b)


def test_dispatch_picks_cpp_on_cpu_under_auto_only():
    t = torch.zeros(2, 2)
    with dispatch.kernel_backend("auto"):
        assert dispatch.use_cpp(t)
    with dispatch.kernel_backend("reference"):
        assert not dispatch.use_cpp(t)


def test_training_shaped_loss_and_grads_match_the_reference():
    # The demo's output layer: 1,024 tokens, d 64, vocab 2,048, one chunk.
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1024, 64, generator=g).requires_grad_()
    w = (0.1 * torch.randn(2048, 64, generator=g)).requires_grad_()
    y = torch.randint(0, 2048, (1024,), generator=g)
    with dispatch.kernel_backend("auto"):
        loss = dispatch.linear_cross_entropy(h, w, y)
    loss.backward()
    dh, dw = h.grad, w.grad
    h.grad = w.grad = None
    ref = linear_cross_entropy_reference(h, w, y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dh, h.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(dw, w.grad, rtol=1e-5, atol=1e-8)
    assert linear_cross_entropy(h.detach(), w.detach(), y, impl="cpp").item() == pytest.approx(
        ref.item(), rel=1e-6
    )
