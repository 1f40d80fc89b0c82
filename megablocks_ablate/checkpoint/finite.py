"""Finite weights: the one check every loaded or certified model goes through.

::

    check_finite_state(state_dict, "runs/x: the trained model", "no final model is written")
    check_finite_state("seed/final/model.safetensors")   # a file, one tensor at a time

A NaN or inf in a floating-point tensor raises :class:`NonFiniteError` naming where
(a file, or what the state dict is) and the first such tensor, in order, with how many
of its values are non-finite::

    seed/final/model.safetensors: tensor 'layers.0.in_proj.weight' has 3 non-finite
    values (NaN/inf); <consequence>

Used by the trainer before it writes ``final/`` and ``COMPLETE.json`` and on every
checkpoint it starts from (``init_from``, a study's seed, its own step checkpoints),
and by ``import-hf`` / ``export-hf``. A file is read memory-mapped tensor by tensor and
its pages dropped again, so checking a large checkpoint costs one read of it and
little resident memory. The test per tensor is one fp64 reduction (a sum of finite
fp32/bf16/fp16 values cannot overflow fp64, and any NaN/inf term makes it non-finite);
only for the tensor at fault are the bad values counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from megablocks_ablate.errors import NonFiniteError

if TYPE_CHECKING:
    import torch


def tensor_is_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN/inf (integer and bool tensors always do)."""
    import torch

    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    if t.dtype in (torch.float64, torch.complex128) or t.is_complex():
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def count_non_finite(t: torch.Tensor) -> int:
    """How many of ``t``'s values are NaN/inf."""
    import torch

    return int(t.numel() - int(torch.isfinite(t).sum()))


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int] | None:
    """``(name, how many values are NaN/inf)`` of the first tensor holding one; None
    when every one is finite."""
    for name, t in tensors:
        if not tensor_is_finite(t):
            return name, count_non_finite(t)
    return None


def non_finite_message(where: str, found: tuple[str, int], consequence: str = "") -> str:
    name, bad = found
    tail = f"; {consequence}" if consequence else ""
    return f"{where}: tensor {name!r} has {bad} non-finite values (NaN/inf){tail}"


def _file_tensors(path: str) -> Iterable[tuple[str, torch.Tensor]]:
    from megablocks_ablate.checkpoint.safetensors_io import MappedSafetensors

    mapped = MappedSafetensors(path)
    try:
        for name in mapped.names:
            t = mapped.tensor(name)
            try:
                yield name, t
            finally:
                del t
                mapped.release(name)
    finally:
        del mapped  # its views are gone; the map is closed with it


def check_finite_state(
    state: Mapping[str, torch.Tensor] | str, where: str | None = None, consequence: str = ""
) -> None:
    """Refuse (:class:`NonFiniteError`) a state dict, or a safetensors file given by
    path, holding a NaN/inf: the message names ``where`` (default: the file), the first
    such tensor and how many of its values, then ``consequence`` (what it means, what
    to do). A file that cannot be read is a :class:`DataFormatError` naming it."""
    if isinstance(state, str):
        found = first_non_finite(_file_tensors(state))
        where = where or state
    else:
        found = first_non_finite(state.items())
        where = where or "state dict"
    if found is not None:
        raise NonFiniteError(non_finite_message(where, found, consequence))
