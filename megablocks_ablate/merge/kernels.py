"""One dispatch for the merge kernel ``out = sum_i w_i * x_i`` (fp32 accumulation).

Backend by device and by ``MBA_KERNELS`` (shared with the model kernels, see
:mod:`megablocks_ablate.kernels.dispatch`):

* ``reference``: the chunked PyTorch reference everywhere.
* ``triton``: the Triton kernel (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).
* ``auto`` (default): CPU -> C++/OpenMP (``_C``), CUDA -> CUDA extension (``_C_cuda``),
  else Triton, else the reference.

Contract for every backend: ``out`` and the inputs are contiguous, have the same
number of elements and live on one device; dtypes fp32/bf16/fp16 (mixed allowed);
each input is read once, the output written once, no temporaries of model size;
``out`` may alias an input. Inputs with weight exactly 0 are skipped (not read),
which makes scoring subsets of a pool proportionally cheaper.

:func:`merge_raw` is the C++ kernel over raw addresses, for callers that hold no
torch tensors (the file merge over memory-mapped safetensors): this module imports
torch only when a torch-facing function or ``DTYPE_CODES`` is used.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from megablocks_ablate import _ext

if TYPE_CHECKING:
    import torch

# safetensors dtype names -> the kernels' dtype codes (and DTYPE_CODES, the same for
# torch dtypes, built on first use)
CODES = {"F32": 0, "BF16": 1, "F16": 2}
BACKENDS = ("reference", "triton", "cpp", "cuda")


def __getattr__(name: str) -> Any:
    if name == "DTYPE_CODES":
        import torch

        table = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
        globals()[name] = table
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _codes() -> dict:
    return globals().get("DTYPE_CODES") or __getattr__("DTYPE_CODES")


def _configured() -> str:
    """``MBA_KERNELS`` as the model kernels read it (reference | triton | auto).

    The model-kernel dispatch imports Triton and all model kernels, which a CPU file
    merge must not pay for (about 1 s and 130 MB), so it is consulted only when it is
    already loaded (it then also carries in-process overrides); otherwise the
    environment variable is read the same way here.
    """
    dispatch = sys.modules.get("megablocks_ablate.kernels.dispatch")
    if dispatch is not None:
        return dispatch.configured_backend()
    name = os.environ.get("MBA_KERNELS", "auto").strip().lower() or "auto"
    if name not in ("reference", "triton", "auto"):
        from megablocks_ablate.errors import ConfigError

        raise ConfigError(f"MBA_KERNELS: expected one of reference, triton, auto, got {name!r}")
    return name


def _triton_usable(device_type: str) -> bool:
    from megablocks_ablate.kernels import merge_triton

    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return merge_triton.triton is not None and (device_type == "cuda" or interpret)


def select_backend(device: torch.device | str) -> str:
    """The backend ``merge_into`` uses for tensors on ``device`` (a torch device or
    its type, ``"cpu"`` / ``"cuda"``) right now."""
    device_type = device if isinstance(device, str) else device.type
    name = _configured()
    if name == "reference":
        return "reference"
    if name == "triton":
        if not _triton_usable(device_type):
            from megablocks_ablate.errors import ConfigError

            raise ConfigError(
                "MBA_KERNELS=triton: triton is not installed, or the tensors "
                "are on CPU without TRITON_INTERPRET=1"
            )
        return "triton"
    if device_type == "cpu":
        return "cpp" if _ext.cpp is not None else "reference"
    if device_type == "cuda":
        if _ext.cuda is not None and hasattr(_ext.cuda, "merge_into"):
            return "cuda"
        return "triton" if _triton_usable(device_type) else "reference"
    return "reference"


def _check_weights(n_inputs: int, weights: list[float], what: str = "merge_into") -> None:
    if n_inputs != len(weights):
        raise ValueError(f"{what}: {n_inputs} inputs but {len(weights)} weights")
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise ValueError(f"{what}: weight {i} is {w}, weights must be finite")


def _check(out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: list[float]) -> None:
    _check_weights(len(inputs), weights)
    codes = _codes()
    for name, t in [("out", out)] + [(f"inputs[{i}]", x) for i, x in enumerate(inputs)]:
        if t.dtype not in codes:
            raise TypeError(f"merge_into: {name} has dtype {t.dtype}; expected fp32, bf16 or fp16")
        if not t.is_contiguous():
            raise ValueError(f"merge_into: {name} is not contiguous")
        if t.numel() != out.numel():
            raise ValueError(f"merge_into: {name} has {t.numel()} elements, out has {out.numel()}")
        if t.device != out.device:
            raise ValueError(f"merge_into: {name} is on {t.device}, out is on {out.device}")


def merge_into(
    out: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``out[:] = sum_i weights[i] * inputs[i]``, accumulated in fp32, written in out's dtype.

    ``backend`` forces one of ``reference``, ``triton``, ``cpp``, ``cuda`` (tests and
    benchmarks); by default :func:`select_backend` decides. Returns ``out``.
    """
    import torch

    if isinstance(weights, torch.Tensor):
        weights = weights.detach().to("cpu", torch.float64).tolist()
    weights = [float(w) for w in weights]
    inputs = list(inputs)
    _check(out, inputs, weights)
    kept = [(x, w) for x, w in zip(inputs, weights) if w != 0.0]
    if not kept:  # all weights zero: the sum is zero (specs refuse this earlier)
        return out.zero_()
    xs = [x.reshape(-1) for x, _ in kept]
    ws = [w for _, w in kept]
    flat = out.view(-1)
    backend = backend or select_backend(out.device)
    if backend not in BACKENDS:
        raise ValueError(f"merge_into: backend must be one of {BACKENDS}, got {backend!r}")
    codes = _codes()
    if backend == "cpp":
        _ext.require_cpp().merge_into(
            flat.data_ptr(),
            codes[flat.dtype],
            [x.data_ptr() for x in xs],
            [codes[x.dtype] for x in xs],
            ws,
            flat.numel(),
        )
    elif backend == "cuda":
        if _ext.cuda is None:
            raise RuntimeError("merge_into: the CUDA extension _C_cuda is not built")
        from megablocks_ablate.kernels.merge_switch import vector_loads_enabled

        vec: dict[str, bool] = {}  # MBA_MERGE_VEC; a _C_cuda built before it has no such arg
        if hasattr(_ext.cuda, "merge_vector_loads"):
            vec["vector_loads"] = vector_loads_enabled()
        _ext.cuda.merge_into(
            flat.data_ptr(),
            codes[flat.dtype],
            [x.data_ptr() for x in xs],
            [codes[x.dtype] for x in xs],
            ws,
            flat.numel(),
            torch.cuda.current_stream(flat.device).cuda_stream,
            **vec,
        )
    elif backend == "triton":
        from megablocks_ablate.kernels.merge_triton import merge_into_triton

        merge_into_triton(flat, xs, ws)
    else:
        from megablocks_ablate.kernels.merge_reference import merge_into_reference

        merge_into_reference(flat, xs, ws)
    return out


def merge_raw(
    out_addr: int,
    out_dtype: str,
    in_addrs: Sequence[int],
    in_dtypes: Sequence[str],
    weights: Sequence[float],
    n: int,
    threads: int = 1,
) -> bool:
    """``out[:n] = sum_i weights[i] * in_i[:n]`` with the C++ kernel over raw addresses
    (contiguous, element-aligned buffers on CPU; dtypes by safetensors name: ``F32``,
    ``BF16``, ``F16``). Returns whether every written value is finite: the check is
    fused into the kernel's store, so it costs no pass of its own. Inputs with weight 0
    are not read; at least one weight must be non-zero.

    ``threads``: OpenMP threads (default 1, which runs without a parallel region; the
    file merge passes :func:`.file_merge.kernel_threads`).
    """
    weights = [float(w) for w in weights]
    _check_weights(len(in_addrs), weights, "merge_raw")
    if len(in_dtypes) != len(in_addrs):
        raise ValueError(f"merge_raw: {len(in_addrs)} inputs but {len(in_dtypes)} dtypes")
    for d in [out_dtype, *in_dtypes]:
        if d not in CODES:
            raise TypeError(f"merge_raw: dtype {d!r}; expected one of {', '.join(CODES)}")
    kept = [(a, CODES[d], w) for a, d, w in zip(in_addrs, in_dtypes, weights) if w != 0.0]
    if not kept:
        raise ValueError("merge_raw: every weight is zero")
    return bool(
        _ext.require_cpp().merge_into(
            out_addr,
            CODES[out_dtype],
            [a for a, _, _ in kept],
            [c for _, c, _ in kept],
            [w for _, _, w in kept],
            n,
            threads,
        )
    )
