"""The one place that chooses a Triton kernel or the PyTorch reference.

``MBA_KERNELS`` selects the backend (read once, on first use):

* ``reference`` -- PyTorch ops everywhere (fused linear+CE still runs chunked).
* ``triton`` -- Triton kernels everywhere; on CPU tensors this needs
  ``TRITON_INTERPRET=1`` (set before the first kernel import), which is how the tests
  run them without a GPU.
* ``auto`` (default) -- Triton for CUDA tensors when triton imports, else reference,
  except the fused linear+CE's per-row softmax on CPU, which runs the C++ step
  (``csrc/cross_entropy.cpp``) when ``_C`` is built.

Tests and benchmarks switch in-process with :func:`kernel_backend`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.kernels import cross_entropy as _ce
from megablocks_ablate.kernels import norm as _norm
from megablocks_ablate.kernels import rope as _rope
from megablocks_ablate.kernels import swiglu as _swiglu

BACKENDS = ("reference", "triton", "auto")
_backend: str | None = None


def _env_backend() -> str:
    name = os.environ.get("MBA_KERNELS", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ConfigError(f"MBA_KERNELS: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def triton_available() -> bool:
    return _norm.triton is not None


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def configured_backend() -> str:
    """The backend setting in force: ``reference``, ``triton`` or ``auto``."""
    global _backend
    if _backend is None:
        _backend = _env_backend()
    return _backend


def set_backend(name: str | None) -> None:
    """Override ``MBA_KERNELS`` in this process; ``None`` re-reads the environment."""
    global _backend
    if name is not None and name not in BACKENDS:
        raise ConfigError(f"kernel backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    _backend = name


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """``with kernel_backend("reference"): ...`` -- temporarily force a backend."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(t: torch.Tensor) -> bool:
    """Whether ops on ``t`` run the Triton kernels under the current setting."""
    name = configured_backend()
    if name == "reference":
        return False
    if name == "auto":
        return t.is_cuda and triton_available()
    if not triton_available():
        raise ConfigError("MBA_KERNELS=triton but triton is not installed (pip install triton)")
    if not t.is_cuda and not interpret_mode():
        raise ConfigError(
            "MBA_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 "
            "(set before megablocks_ablate is imported)"
        )
    return True


def use_cpp(t: torch.Tensor) -> bool:
    """Whether the fused cross-entropy on ``t`` takes the C++ chunk step: CPU tensors
    under ``auto`` when ``_C`` has it (``reference`` keeps PyTorch ops)."""
    return configured_backend() == "auto" and t.device.type == "cpu" and _ce.cpp_available()


def flash_attn_func():
    """flash-attn's ``flash_attn_func`` when installed, else None (checked once)."""
    global _flash
    if _flash is _UNSET:
        _flash = None
        if importlib.util.find_spec("flash_attn") is not None:
            try:
                from flash_attn import flash_attn_func as f

                _flash = f
            except ImportError:  # installed but built for another torch/CUDA
                _flash = None
    return _flash


_UNSET = object()
_flash = _UNSET


# ---- the ops the model calls -----------------------------------------------------------


def norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    kind: str = "layernorm",
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm or RMSNorm over the last dim; see :mod:`.norm`.

    The kernels have no bias: LayerNorm with a bias (GPT-NeoX) is ``F.layer_norm``.
    """
    if bias is not None:
        if kind != "layernorm":
            raise ValueError(f"norm: a bias needs kind='layernorm', got {kind!r}")
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if use_triton(x):
        return _norm.norm_triton(x, weight, eps, kind)
    return _norm.norm_reference(x, weight, eps, kind)


ROPE_LAYOUTS = ("interleaved", "half")


def _rope_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama, GPT-NeoX): channel ``i`` pairs with ``i + d/2``; fp32 math."""
    t = x.shape[1]
    c, s = cos[:t, None, :], sin[:t, None, :]  # broadcast over batch and heads
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "interleaved"
) -> torch.Tensor:
    """RoPE on ``[batch, seq, heads, head_dim]``; see :mod:`.rope`.

    ``cos``/``sin`` are ``[seq, rotary_dim / 2]``: when ``rotary_dim < head_dim`` only
    the leading ``rotary_dim`` channels rotate (partial rotary) and the rest pass
    through. ``layout`` is ``interleaved`` (pairs ``(2i, 2i+1)``: the kernel) or
    ``half`` (pairs ``(i, i + rotary_dim/2)``: PyTorch reference only).
    """
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    rotary_dim = 2 * cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        rotated = rope(x[..., :rotary_dim], cos, sin, layout)
        return torch.cat([rotated, x[..., rotary_dim:].to(rotated.dtype)], dim=-1)
    if layout == "half":
        return _rope_half_reference(x, cos, sin)
    if use_triton(x):
        return _rope.rope_triton(x, cos, sin)
    return _rope.rope_reference(x, cos, sin)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` from ``[..., 2 * hidden]``; see :mod:`.swiglu`."""
    if use_triton(gate_up):
        return _swiglu.swiglu_triton(gate_up)
    return _swiglu.swiglu_reference(gate_up)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, GPT-NeoX's ``hidden_act: gelu``: PyTorch only (no kernel)."""
    return F.gelu(x)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **kwargs
) -> torch.Tensor:
    """Chunked fused output projection + cross-entropy; see :mod:`.cross_entropy`."""
    impl = "triton" if use_triton(hidden) else "cpp" if use_cpp(hidden) else "torch"
    return _ce.linear_cross_entropy(hidden, weight, labels, impl=impl, **kwargs)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention on ``[batch, seq, heads, head_dim]`` (k/v may have fewer heads: GQA).

    flash-attn when installed and the tensors are fp16/bf16 on CUDA (and the backend is
    not ``reference``), else ``scaled_dot_product_attention`` (which picks its own
    flash/memory-efficient kernel on CUDA and a fused kernel on CPU).
    """
    if (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and configured_backend() != "reference"
    ):
        flash = flash_attn_func()
        if flash is not None:
            return flash(q, k, v, causal=True)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)
