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

``MBA_ATTENTION`` selects the attention implementation (read once; in-process
:func:`attention_backend`), resolved per device and dtype by :func:`resolve_attention`:

* ``auto`` (default) -- on CUDA with fp16/bf16 tensors: cuDNN SDPA on Hopper (sm 9.x)
  when torch's cuDNN (>= 9) has it, else flash-attn 2 when installed, else SDPA's own
  choice; everywhere else (CPU, fp32, ``MBA_KERNELS=reference``) SDPA's own choice, as
  before this switch existed.
* ``sdpa`` -- ``scaled_dot_product_attention`` picking its own kernel; ``math`` -- SDPA's
  math kernel only (any device; the slow, exact-softmax reference).
* ``cudnn`` -- SDPA's cuDNN kernel only; ``flash2`` -- flash-attn 2's
  ``flash_attn_func``; ``fa3`` -- FlashAttention 3 (``flash_attn_interface``, Hopper).
  Each needs fp16/bf16 CUDA tensors and its library; otherwise the first attention call
  is refused with a one-line :class:`ConfigError` naming ``MBA_ATTENTION`` (never a
  silent fallback: a benchmark that asks for cuDNN measures cuDNN or fails).

``MBA_INPROJ_GRAD`` selects how a block's fused input-projection gradient is assembled
(:func:`configured_inproj_grad`; re-read when the variable changes; in-process
:func:`inproj_grad`):

* ``autograd`` (default) -- the projection's output is split with ``Tensor.split`` and
  autograd concatenates the pieces' gradients (``cat``) in backward.
* ``buffer`` -- one gradient buffer per block backward, written in place by the RoPE,
  SwiGLU and GELU backwards (:mod:`.inproj_grad`); the same numbers, no ``cat``.

An environment variable rather than a model or train config field: the choice changes
how a model is run, not what it is, and a config field would enter checkpoints'
``config.json`` and the runs' content keys.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.kernels import cross_entropy as _ce
from megablocks_ablate.kernels import inproj_grad as _inproj
from megablocks_ablate.kernels import norm as _norm
from megablocks_ablate.kernels import rope as _rope
from megablocks_ablate.kernels import swiglu as _swiglu
from megablocks_ablate.utils.env_choice import check_choice, env_choice

BACKENDS = ("reference", "triton", "auto")
_backend: str | None = None


def _env_backend() -> str:
    return env_choice("MBA_KERNELS", BACKENDS, "auto")


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
        _flash = _import_attr("flash_attn", "flash_attn_func")
    return _flash


def fa3_func():
    """FlashAttention 3's ``flash_attn_func`` (``flash_attn_interface``, built from
    flash-attention's ``hopper/``) when installed, else None (checked once)."""
    global _fa3
    if _fa3 is _UNSET:
        _fa3 = _import_attr("flash_attn_interface", "flash_attn_func")
    return _fa3


def _import_attr(module: str, name: str):
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:  # installed but built for another torch/CUDA
        return None


_UNSET = object()
_flash = _UNSET
_fa3 = _UNSET


# ---- attention backend -----------------------------------------------------------------

ATTENTION_ENV = "MBA_ATTENTION"
ATTENTION_BACKENDS = ("auto", "sdpa", "math", "cudnn", "flash2", "fa3")
_HALF = (torch.float16, torch.bfloat16)
_attention: str | None = None
_cudnn_ok: dict[int, bool] = {}  # device index -> cuDNN SDPA usable
# (device type, index, dtype, setting, kernel backend) -> resolved name: a dict lookup per
# call (also under torch.compile), the probes run once
_resolved: dict[tuple, str] = {}


def _check_attention_name(name: str, where: str) -> str:
    return check_choice(name, ATTENTION_BACKENDS, where)


def configured_attention() -> str:
    """The attention setting in force (``MBA_ATTENTION``, default ``auto``)."""
    global _attention
    if _attention is None:
        _attention = env_choice(ATTENTION_ENV, ATTENTION_BACKENDS, "auto")
    return _attention


def set_attention_backend(name: str | None) -> None:
    """Override ``MBA_ATTENTION`` in this process; ``None`` re-reads the environment."""
    global _attention
    _attention = None if name is None else _check_attention_name(name, "attention backend")
    _resolved.clear()
    _cudnn_ok.clear()


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """``with attention_backend("math"): ...`` -- temporarily force an attention backend."""
    previous = _attention
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def cudnn_attention_available(device: torch.device) -> bool:
    """Whether SDPA's cuDNN kernel can run on ``device``: a CUDA torch with cuDNN >= 9
    and the cuDNN SDPA backend enabled (checked once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cudnn_ok:
        version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        _cudnn_ok[index] = bool(version and version >= 90000) and bool(
            torch.backends.cuda.cudnn_sdp_enabled()
        )
    return _cudnn_ok[index]


def resolve_attention(
    device: torch.device, dtype: torch.dtype, requested: str | None = None
) -> str:
    """The attention implementation that runs for tensors of ``dtype`` on ``device``:
    ``sdpa``, ``math``, ``cudnn``, ``flash2`` or ``fa3`` (see the module doc).
    ``requested`` defaults to :func:`configured_attention`. A named backend that cannot
    run here is a :class:`ConfigError`."""
    name = configured_attention() if requested is None else requested
    key = (device.type, device.index, dtype, name, configured_backend())
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _resolve(device, dtype, _check_attention_name(name, ATTENTION_ENV))
    return found


def _resolve(device: torch.device, dtype: torch.dtype, name: str) -> str:
    fast = device.type == "cuda" and dtype in _HALF
    if name == "auto":
        if not fast or configured_backend() == "reference":
            return "sdpa"
        if cuda_capability(device)[0] == 9 and cudnn_attention_available(device):
            return "cudnn"
        return "flash2" if flash_attn_func() is not None else "sdpa"
    if name in ("sdpa", "math"):
        return name
    if not fast:
        raise ConfigError(
            f"{ATTENTION_ENV}={name} needs fp16/bf16 CUDA tensors, got "
            f"{str(dtype).removeprefix('torch.')} on {device.type}: use auto, sdpa or math"
        )
    if name == "cudnn" and not cudnn_attention_available(device):
        raise ConfigError(
            f"{ATTENTION_ENV}=cudnn: this torch has no cuDNN >= 9 SDPA kernel "
            f"(cuDNN {torch.backends.cudnn.version()}): use auto or sdpa"
        )
    if name == "flash2" and flash_attn_func() is None:
        raise ConfigError(
            f"{ATTENTION_ENV}=flash2: flash-attn does not import (pip install flash-attn)"
        )
    if name == "fa3":
        if fa3_func() is None:
            raise ConfigError(
                f"{ATTENTION_ENV}=fa3: flash_attn_interface (FlashAttention 3, built from "
                "flash-attention's hopper/) does not import"
            )
        if cuda_capability(device)[0] != 9:
            raise ConfigError(
                f"{ATTENTION_ENV}=fa3: FlashAttention 3 needs a Hopper GPU (sm 9.x), "
                f"{device} is sm {'.'.join(map(str, cuda_capability(device)))}"
            )
    return name


# SDPA kernels each SDPA-run choice allows, in priority order. ``auto`` resolving to
# cuDNN lets SDPA fall back (shapes cuDNN refuses, GQA); a named cudnn does not.
_SDPA_KERNELS = {
    "math": [SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "auto-cudnn": [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ],
}


# ---- in-projection gradient ------------------------------------------------------------

INPROJ_GRAD_ENV = "MBA_INPROJ_GRAD"
INPROJ_GRAD_MODES = ("autograd", "buffer")
_inproj_override: str | None = None
_inproj_env: tuple[str, str] | None = None  # (the variable's raw value, the checked mode)


def _check_inproj_name(name: str, where: str) -> str:
    return check_choice(name, INPROJ_GRAD_MODES, where)


def configured_inproj_grad() -> str:
    """``autograd`` (default) or ``buffer``: the in-process override, else ``MBA_INPROJ_GRAD``
    (checked again only when its value changes: one dict lookup per block forward)."""
    global _inproj_env
    if _inproj_override is not None:
        return _inproj_override
    raw = os.environ.get(INPROJ_GRAD_ENV, "")
    if _inproj_env is None or _inproj_env[0] != raw:
        _inproj_env = (raw, env_choice(INPROJ_GRAD_ENV, INPROJ_GRAD_MODES))
    return _inproj_env[1]


def set_inproj_grad(name: str | None) -> None:
    """Override ``MBA_INPROJ_GRAD`` in this process; ``None`` follows the environment."""
    global _inproj_override
    _inproj_override = None if name is None else _check_inproj_name(name, "inproj grad")


@contextlib.contextmanager
def inproj_grad(name: str) -> Iterator[None]:
    """``with inproj_grad("buffer"): ...`` -- temporarily force the in-projection gradient mode."""
    previous = _inproj_override
    set_inproj_grad(name)
    try:
        yield
    finally:
        set_inproj_grad(previous)


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


def rope_pair(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_q: int,
    layout: str = "interleaved",
    grad_into: _inproj.GradSlot | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope` on the q|k heads side by side (``[batch, seq, n_q + n_kv, head_dim]``),
    returned as ``(q, k)`` (``MBA_INPROJ_GRAD=buffer``). Interleaved with full rotary: one
    function whose backward takes ``dq``/``dk`` apart and writes ``dx`` into ``grad_into``
    (no ``cat``); otherwise :func:`rope` then a split (``grad_into`` unused: the block's
    split copies that gradient into its slice)."""
    if layout == "interleaved" and 2 * cos.shape[-1] == x.shape[-1]:
        if use_triton(x):
            return _rope.rope_pair_triton(x, cos, sin, n_q, grad_into)
        return _rope.rope_pair_reference(x, cos, sin, n_q, grad_into)
    q, k = rope(x, cos, sin, layout).split([n_q, x.shape[2] - n_q], dim=2)
    return q, k


def swiglu(gate_up: torch.Tensor, grad_into: _inproj.GradSlot | None = None) -> torch.Tensor:
    """``silu(gate) * up`` from ``[..., 2 * hidden]``; see :mod:`.swiglu`. ``grad_into``:
    the backward writes ``d gate_up`` there (:mod:`.inproj_grad`)."""
    if use_triton(gate_up):
        if grad_into is None:
            return _swiglu.swiglu_triton(gate_up)
        return _swiglu.swiglu_triton(gate_up, grad_into)
    if grad_into is None:
        return _swiglu.swiglu_reference(gate_up)
    return _swiglu.swiglu_reference(gate_up, grad_into)


def gelu(x: torch.Tensor, grad_into: _inproj.GradSlot | None = None) -> torch.Tensor:
    """Exact (erf) GELU, GPT-NeoX's ``hidden_act: gelu``: PyTorch only (no kernel).
    ``grad_into``: the backward writes ``dx`` there (:mod:`.inproj_grad`)."""
    if grad_into is None:
        return F.gelu(x)
    return _inproj.gelu_into(x, grad_into)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **kwargs
) -> torch.Tensor:
    """Chunked fused output projection + cross-entropy; see :mod:`.cross_entropy`."""
    impl = "triton" if use_triton(hidden) else "cpp" if use_cpp(hidden) else "torch"
    return _ce.linear_cross_entropy(hidden, weight, labels, impl=impl, **kwargs)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention on ``[batch, seq, heads, head_dim]`` (k/v may have fewer heads: GQA),
    by the backend :func:`resolve_attention` picks (``MBA_ATTENTION``; module doc)."""
    backend = resolve_attention(q.device, q.dtype)
    if backend == "flash2":
        return flash_attn_func()(q, k, v, causal=True)
    if backend == "fa3":
        out = fa3_func()(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out  # some versions also return lse
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    gqa = k.shape[2] != q.shape[2]
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(*args, is_causal=True, enable_gqa=gqa)
    else:
        key = "auto-cudnn" if backend == "cudnn" and configured_attention() == "auto" else backend
        with sdpa_kernel(_SDPA_KERNELS[key], set_priority=True):
            out = F.scaled_dot_product_attention(*args, is_causal=True, enable_gqa=gqa)
    return out.transpose(1, 2)
