"""Cross-entropy chunk size and Triton warps from the shapes (kernels/cross_entropy.py
``choose_chunking``, switch ``MBA_CE_CHUNKS=legacy``): the values it picks at the
presets' shapes, that CPU keeps the old rule, and that the loss and gradients do not
depend on the chunking or the warps (each chunk step: torch, Triton interpreted, C++)."""

from __future__ import annotations

import pytest
import torch

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.kernels import cross_entropy as ce
from megablocks_ablate.kernels.cross_entropy import Chunking, choose_chunking

V = 50304  # the presets' padded vocabulary


@pytest.mark.parametrize(
    "n, d, device, nbytes, impl, want",
    [
        (8192, 2048, "cuda", 2, "triton", Chunking(8192, 8)),  # 1.1b x 4 seqs: one chunk
        (16384, 2048, "cuda", 2, "triton", Chunking(8192, 8)),  # 1.1b x 8: two
        (32768, 768, "cuda", 2, "triton", Chunking(8192, 8)),  # 130m x 16: four
        (8192, 2048, "cuda", 4, "triton", Chunking(4096, 8)),  # fp32 logits: half the rows
        (8192, 2048, "cuda", 2, "torch", Chunking(2048, 8)),  # torch step's fp32 temporaries
        (8192, 2048, "cpu", 2, "triton", Chunking(328, 4)),  # CPU: the old rule
        (16384, 768, "cpu", 4, "cpp", Chunking(248, 4)),
    ],
)
def test_choice_at_the_presets_shapes(monkeypatch, n, d, device, nbytes, impl, want):
    monkeypatch.delenv("MBA_CE_CHUNKS", raising=False)
    assert choose_chunking(n, d, V, device, nbytes, impl) == want


def test_legacy_switch_forces_the_old_values(monkeypatch):
    old = Chunking(ce.default_chunk_rows(8192, 2048, V), 4)
    assert old == Chunking(328, 4)
    assert choose_chunking(8192, 2048, V, "cuda", mode="legacy") == old
    monkeypatch.setenv("MBA_CE_CHUNKS", "legacy")
    assert choose_chunking(8192, 2048, V, "cuda") == old
    monkeypatch.setenv("MBA_CE_CHUNKS", "big")
    with pytest.raises(ConfigError, match="MBA_CE_CHUNKS: expected one of auto, legacy"):
        choose_chunking(8192, 2048, V, "cuda")


@pytest.mark.parametrize("n", [1, 7, 64, 1000, 8192, 16385, 100_000])
@pytest.mark.parametrize("v", [256, 2048, 50304, 262144])
def test_cuda_chunks_fit_the_budget_and_never_shrink(n, v):
    c = choose_chunking(n, 2048, v, "cuda", 2, mode="auto")
    legacy = ce.default_chunk_rows(n, 2048, v)
    assert min(n, legacy) <= c.chunk_rows <= max(n, legacy)
    assert c.chunk_rows >= legacy  # never more chunks than the old rule
    if c.chunk_rows > legacy:  # the budget, up to the rounding to 64 rows
        assert (c.chunk_rows - 64) * v * 2 <= ce.CUDA_CHUNK_LOGIT_BYTES
    chunks = -(-n // c.chunk_rows)
    assert chunks == max(1, -(-n * v * 2 // ce.CUDA_CHUNK_LOGIT_BYTES)) or c.chunk_rows == legacy
    assert c.num_warps == (8 if v >= 2048 else 4)


def _inputs(n=70, d=24, v=300, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (0.5 * torch.randn(v, d, generator=g)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 9, 69]] = -100
    return h, w, labels


def _loss_and_grads(h, w, labels, reduction, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = ce.linear_cross_entropy(h, w, labels, logit_scale=0.7, reduction=reduction, **kw)
    up = torch.rand(out.shape, generator=torch.Generator().manual_seed(2))
    (out * up).sum().backward()
    return out.detach(), h.grad, w.grad


@pytest.mark.parametrize("impl", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_results_do_not_depend_on_chunking_or_warps(impl, reduction):
    if impl == "cpp" and not ce.cpp_available():
        pytest.skip("megablocks_ablate._C has no ce_rows (make build)")
    h, w, labels = _inputs()
    # at this size both rules give one chunk; the runs below split it every other way
    assert choose_chunking(70, 24, 300, "cpu") == Chunking(70, 4)
    assert choose_chunking(70, 24, 300, "cuda", 4, impl) == Chunking(70, 4)
    base = _loss_and_grads(h, w, labels, reduction, impl=impl)  # the default: one chunk
    runs = {
        "small chunks": dict(chunk_rows=8, num_warps=4),
        "odd chunks, 8 warps": dict(chunk_rows=13, num_warps=8),
        "one row": dict(chunk_rows=1, num_warps=4),
    }
    for name, kw in runs.items():
        got = _loss_and_grads(h, w, labels, reduction, impl=impl, **kw)
        for a, b in zip(got, base):
            # per-row values are the same arithmetic; the weight gradient's fp32 sum
            # over chunks may only round differently
            torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6, msg=name)


def test_bf16_triton_gpu_choice_matches_the_legacy_one():
    h, w, labels = _inputs(n=96, v=2100, dtype=torch.bfloat16)
    old = _loss_and_grads(h, w, labels, "mean", impl="triton", chunk_rows=8, num_warps=4)
    new = choose_chunking(96, 24, 2100, "cuda", 2, "triton")
    assert new == Chunking(96, 8)
    got = _loss_and_grads(h, w, labels, "mean", impl="triton", chunk_rows=96, num_warps=8)
    torch.testing.assert_close(got[0], old[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], old[1], atol=0, rtol=0)  # per-row: same bits
    torch.testing.assert_close(got[2].float(), old[2].float(), atol=1e-3, rtol=2**-7)


def test_the_chosen_warps_reach_the_triton_launch(monkeypatch):
    seen = []
    real = ce._ce_chunk_triton

    def spy(*args, num_warps=ce.LEGACY_NUM_WARPS):
        seen.append(num_warps)
        return real(*args, num_warps=num_warps)

    monkeypatch.setattr(ce, "_ce_chunk_triton", spy)
    h, w, labels = _inputs()
    _loss_and_grads(h, w, labels, "mean", impl="triton")
    _loss_and_grads(h, w, labels, "none", impl="triton", num_warps=8)  # backward recomputes
    assert set(seen[: len(seen) // 2 or 1]) == {4} and seen[-1] == 8
