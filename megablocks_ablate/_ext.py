"""The one place that imports the compiled extensions (with graceful fallback).

``cpp`` is ``megablocks_ablate._C`` or None when it was not built; ``cuda`` is
``megablocks_ablate._C_cuda`` or None. Callers choose the pure-Python/NumPy path
when they are None; MBA_DISABLE_CPP=1 forces that (used by tests of the fallbacks).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

cpp = None
cuda = None

if os.environ.get("MBA_DISABLE_CPP") != "1":
    try:
        from megablocks_ablate import _C as cpp  # type: ignore[no-redef]
    except ImportError as e:  # not built: numpy fallbacks are used
        warnings.warn(
            f"megablocks_ablate._C not available ({e}); using NumPy fallbacks", stacklevel=2
        )
    # _C_cuda links against torch's shared libraries: torch must be loaded first, or the
    # import fails and the CUDA kernels would silently be off. Only pay for torch when
    # the extension was built (the CPU-only merge path avoids importing torch).
    if importlib.util.find_spec("megablocks_ablate._C_cuda") is not None:
        try:
            import torch  # noqa: F401

            from megablocks_ablate import _C_cuda as cuda  # type: ignore[no-redef]
        except ImportError:
            cuda = None


def require_cpp():
    if cpp is None:
        raise RuntimeError(
            "megablocks_ablate._C is not built; run `make install` (pip install -e .)"
        )
    return cpp
