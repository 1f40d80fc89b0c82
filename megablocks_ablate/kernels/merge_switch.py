"""``MBA_MERGE_VEC``: aligned 16-byte vector loads in the GPU merge kernels.

* ``auto`` (default) -- the Triton and CUDA merge kernels read their inputs with
  16-byte vector loads (8 bf16/fp16 or 4 fp32 elements per load) when the output and
  every input start on a 16-byte boundary, and with today's element-wise loads
  otherwise; the last, partial block (Triton) or the last ``n % 8`` elements (CUDA)
  always take the element-wise path.
* ``off`` -- element-wise loads everywhere (the path before this switch existed).

Both paths compute the same fp32 fold in the same order, so they give bitwise equal
results; the switch changes only how memory is read. This module is the one place
that reads the variable (on first use); tests and benchmarks switch in-process with
:func:`merge_vec`. It imports neither torch nor triton, so a CPU file merge does not
pay for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from megablocks_ablate.utils.env_choice import check_choice, env_choice

ENV = "MBA_MERGE_VEC"
MODES = ("auto", "off")
ALIGNMENT = 16  # bytes: one uint4 / float4 / 8 bf16 per load
_mode: str | None = None


def _checked(name: str) -> str:
    return check_choice(name, MODES, ENV)


def _env_mode() -> str:
    return env_choice(ENV, MODES, "auto")


def configured_mode() -> str:
    """The setting in force: ``auto`` or ``off`` (the environment, read once)."""
    global _mode
    if _mode is None:
        _mode = _env_mode()
    return _mode


def set_mode(name: str | None) -> None:
    """Override ``MBA_MERGE_VEC`` in this process; ``None`` re-reads the environment."""
    global _mode
    _mode = None if name is None else _checked(name)


@contextlib.contextmanager
def merge_vec(name: str) -> Iterator[None]:
    """Run the block with ``MBA_MERGE_VEC=name`` in force in this process."""
    global _mode
    previous = _mode
    set_mode(name)
    try:
        yield
    finally:
        _mode = previous


def vector_loads_enabled() -> bool:
    """Whether the kernels may use vector loads (``auto``); they still check alignment."""
    return configured_mode() == "auto"


def all_aligned(addresses: Iterable[int], alignment: int = ALIGNMENT) -> bool:
    """Every address (``tensor.data_ptr()``) a multiple of ``alignment`` bytes."""
    return all(int(a) % alignment == 0 for a in addresses)


def use_vector_loads(out_address: int, in_addresses: Iterable[int]) -> bool:
    """The host's choice for one merge: vector loads only when the switch allows them
    and the output and every input are 16-byte aligned (the CUDA extension makes the
    same check itself, in ``csrc/cuda/merge.cu``)."""
    return vector_loads_enabled() and all_aligned([out_address, *in_addresses])
