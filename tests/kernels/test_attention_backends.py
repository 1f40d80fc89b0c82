"""The attention backend switch (MBA_ATTENTION, kernels/dispatch.py): every name resolves,
the automatic choice per device, refusals on CPU, and equal outputs of the backends that
run here (sdpa, math) against an explicit-softmax reference, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.kernels import dispatch

CPU = torch.device("cpu")
H100 = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _restore():
    yield
    dispatch.set_attention_backend(None)
    dispatch.set_backend(None)


def _fake_gpu(monkeypatch, capability=(9, 0), cudnn=True, flash=True, fa3=True):
    """A CUDA device as the probes would see it, without a GPU."""
    monkeypatch.setattr(dispatch, "cuda_capability", lambda device: capability)
    monkeypatch.setattr(dispatch, "cudnn_attention_available", lambda device: cudnn)
    monkeypatch.setattr(
        dispatch, "flash_attn_func", lambda: (lambda *a, **k: None) if flash else None
    )
    monkeypatch.setattr(dispatch, "fa3_func", lambda: (lambda *a, **k: None) if fa3 else None)
    dispatch.set_attention_backend(None)  # clear the resolution cache


def reference_attention(q, k, v):
    """Causal softmax attention in fp64 on [batch, seq, heads, head_dim] (GQA by repeat)."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    t = q.shape[1]
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def test_every_name_resolves_on_cpu_or_is_refused_in_one_line():
    for name in dispatch.ATTENTION_BACKENDS:
        if name in ("auto", "sdpa", "math"):
            want = "sdpa" if name == "auto" else name
            assert dispatch.resolve_attention(CPU, torch.float32, name) == want
            assert dispatch.resolve_attention(CPU, torch.bfloat16, name) == want
        else:
            with pytest.raises(ConfigError) as e:
                dispatch.resolve_attention(CPU, torch.bfloat16, name)
            msg = str(e.value)
            assert f"MBA_ATTENTION={name}" in msg and "\n" not in msg
            assert "needs fp16/bf16 CUDA tensors" in msg and "on cpu" in msg


def test_env_variable_sets_the_backend_and_a_bad_name_is_refused(monkeypatch):
    monkeypatch.setenv("MBA_ATTENTION", "math")
    dispatch.set_attention_backend(None)
    assert dispatch.configured_attention() == "math"
    assert dispatch.resolve_attention(CPU, torch.float32) == "math"
    monkeypatch.setenv("MBA_ATTENTION", "flash3")
    dispatch.set_attention_backend(None)
    with pytest.raises(ConfigError, match="MBA_ATTENTION: expected one of auto, sdpa"):
        dispatch.configured_attention()
    with pytest.raises(ConfigError, match="attention backend"):
        dispatch.set_attention_backend("xformers")


def test_context_manager_restores():
    with dispatch.attention_backend("math"):
        assert dispatch.configured_attention() == "math"
        with dispatch.attention_backend("sdpa"):
            assert dispatch.configured_attention() == "sdpa"
        assert dispatch.configured_attention() == "math"
    assert dispatch.configured_attention() == "auto"


@pytest.mark.parametrize(
    "capability, cudnn, flash, want",
    [
        ((9, 0), True, True, "cudnn"),  # Hopper: cuDNN SDPA first
        ((9, 0), False, True, "flash2"),  # no cuDNN 9: flash-attn 2 when installed
        ((9, 0), False, False, "sdpa"),  # else SDPA's own choice
        ((8, 0), True, True, "flash2"),  # Ampere: as before this switch
        ((8, 0), True, False, "sdpa"),
    ],
)
def test_auto_per_device(monkeypatch, capability, cudnn, flash, want):
    _fake_gpu(monkeypatch, capability, cudnn, flash)
    assert dispatch.resolve_attention(H100, torch.bfloat16) == want
    assert dispatch.resolve_attention(H100, torch.float16) == want
    assert dispatch.resolve_attention(H100, torch.float32) == "sdpa"  # fp32: no fast kernel
    with dispatch.kernel_backend("reference"):  # all-PyTorch runs keep SDPA
        assert dispatch.resolve_attention(H100, torch.bfloat16) == "sdpa"


def test_named_backends_on_a_gpu_and_what_each_needs(monkeypatch):
    _fake_gpu(monkeypatch)
    for name in ("sdpa", "math", "cudnn", "flash2", "fa3"):
        assert dispatch.resolve_attention(H100, torch.bfloat16, name) == name
    _fake_gpu(monkeypatch, capability=(8, 0), cudnn=False, flash=False, fa3=True)
    with pytest.raises(ConfigError, match="MBA_ATTENTION=cudnn: this torch has no cuDNN"):
        dispatch.resolve_attention(H100, torch.bfloat16, "cudnn")
    with pytest.raises(ConfigError, match="MBA_ATTENTION=flash2: flash-attn does not import"):
        dispatch.resolve_attention(H100, torch.bfloat16, "flash2")
    with pytest.raises(ConfigError, match="needs a Hopper GPU"):
        dispatch.resolve_attention(H100, torch.bfloat16, "fa3")
    _fake_gpu(monkeypatch, fa3=False)
    with pytest.raises(ConfigError, match="flash_attn_interface"):
        dispatch.resolve_attention(H100, torch.bfloat16, "fa3")
    with pytest.raises(ConfigError, match="got float32 on cuda"):
        dispatch.resolve_attention(H100, torch.float32, "cudnn")


def test_auto_is_unchanged_on_cpu():
    """The default on CPU is the plain SDPA call it always was: same bits."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 4, 8, generator=g) for _ in range(3))
    plain = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    assert torch.equal(dispatch.attention(q, k, v), plain)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA and GQA
def test_backends_that_run_here_match_the_reference_forward_and_backward(backend, kv_heads):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 24, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 24, kv_heads, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 24, kv_heads, 16, generator=g, requires_grad=True)
    up = torch.randn(2, 24, 4, 16, generator=g)
    with dispatch.attention_backend(backend):
        out = dispatch.attention(q, k, v)
    (out * up).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = reference_attention(q, k, v)
    (ref * up.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got.double(), t.grad.double(), atol=1e-5, rtol=1e-5)


def test_math_really_runs_the_math_kernel(monkeypatch):
    """A named SDPA kernel is enforced: with only cuDNN allowed, CPU SDPA has nothing."""
    q = torch.randn(1, 8, 2, 4)
    seen = []
    real = dispatch.sdpa_kernel

    def spy(kernels, set_priority=False):
        seen.append(list(kernels))
        return real(kernels, set_priority=set_priority)

    monkeypatch.setattr(dispatch, "sdpa_kernel", spy)
    with dispatch.attention_backend("math"):
        dispatch.attention(q, q, q)
    assert seen == [[torch.nn.attention.SDPBackend.MATH]]
    with pytest.raises(RuntimeError, match="No viable backend"):
        with real([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)


def test_a_named_gpu_backend_in_a_cpu_model_is_a_config_error():
    from megablocks_ablate.model import ModelConfig

    model = ModelConfig.from_preset("tiny").build()
    ids = torch.randint(0, 256, (1, 8))
    with dispatch.attention_backend("flash2"):
        with pytest.raises(ConfigError, match="MBA_ATTENTION=flash2"):
            model(ids)
    with dispatch.attention_backend("math"):
        a = model(ids)
    torch.testing.assert_close(a, model(ids), atol=1e-5, rtol=1e-5)
