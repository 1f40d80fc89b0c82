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
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

import torch

from megablocks_ablate import _ext

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
BACKENDS = ("reference", "triton", "cpp", "cuda")


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


def _triton_usable(device: torch.device) -> bool:
    from megablocks_ablate.kernels import merge_triton

    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return merge_triton.triton is not None and (device.type == "cuda" or interpret)


def select_backend(device: torch.device) -> str:
    """The backend ``merge_into`` uses for tensors on ``device`` right now."""
    name = _configured()
    if name == "reference":
        return "reference"
    if name == "triton":
        if not _triton_usable(device):
            from megablocks_ablate.errors import ConfigError

            raise ConfigError(
                "MBA_KERNELS=triton: triton is not installed, or the tensors "
                "are on CPU without TRITON_INTERPRET=1"
            )
        return "triton"
    if device.type == "cpu":
        return "cpp" if _ext.cpp is not None else "reference"
    if device.type == "cuda":
        if _ext.cuda is not None and hasattr(_ext.cuda, "merge_into"):
            return "cuda"
        return "triton" if _triton_usable(device) else "reference"
    return "reference"


def _check(out: torch.Tensor, inputs: Sequence[torch.Tensor], weights: list[float]) -> None:
    if len(inputs) != len(weights):
        raise ValueError(f"merge_into: {len(inputs)} inputs but {len(weights)} weights")
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise ValueError(f"merge_into: weight {i} is {w}, weights must be finite")
    for name, t in [("out", out)] + [(f"inputs[{i}]", x) for i, x in enumerate(inputs)]:
        if t.dtype not in DTYPE_CODES:
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
    if backend == "cpp":
        _ext.require_cpp().merge_into(
            flat.data_ptr(),
            DTYPE_CODES[flat.dtype],
            [x.data_ptr() for x in xs],
            [DTYPE_CODES[x.dtype] for x in xs],
            ws,
            flat.numel(),
        )
    elif backend == "cuda":
        if _ext.cuda is None:
            raise RuntimeError("merge_into: the CUDA extension _C_cuda is not built")
        _ext.cuda.merge_into(
            flat.data_ptr(),
            DTYPE_CODES[flat.dtype],
            [x.data_ptr() for x in xs],
            [DTYPE_CODES[x.dtype] for x in xs],
            ws,
            flat.numel(),
            torch.cuda.current_stream(flat.device).cuda_stream,
        )
    elif backend == "triton":
        from megablocks_ablate.kernels.merge_triton import merge_into_triton

        merge_into_triton(flat, xs, ws)
    else:
        from megablocks_ablate.kernels.merge_reference import merge_into_reference

        merge_into_reference(flat, xs, ws)
    return out
