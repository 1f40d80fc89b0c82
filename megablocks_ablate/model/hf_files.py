"""The weight files of a Hugging Face model directory, read for ``import-hf``.

A directory holds either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (its ``weight_map``: tensor name -> shard file). What
is read, and refused with one line naming the file:

* a shard name that is absolute, climbs out with ``..``, or resolves (through a
  symlink) outside the model directory: the index file and the shard are named, and
  nothing outside the directory is opened;
* an index that is not JSON or has no ``weight_map`` object of file names, a missing or
  unreadable shard;
* a tensor holding NaN/inf (:func:`~megablocks_ablate.checkpoint.check_finite_state`):
  the file and the tensor are named;
* pickle weights only (``pytorch_model.bin``): never unpickled.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from megablocks_ablate.checkpoint import check_finite_state, safetensors_header
from megablocks_ablate.errors import DataFormatError

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_NON_FINITE = "refusing to import a model with NaN/inf weights (a diverged or damaged model)"


def _escape(hf_dir: str, shard: str) -> str | None:
    """Why ``shard`` (a ``weight_map`` value) leads out of ``hf_dir``; None if it stays."""
    if os.path.isabs(shard) or shard.startswith(("/", "\\")) or os.path.splitdrive(shard)[0]:
        return "is an absolute path"
    if ".." in shard.replace("\\", "/").split("/"):
        return "climbs out with '..'"
    root = os.path.realpath(hf_dir)
    real = os.path.realpath(os.path.join(hf_dir, shard))
    if os.path.commonpath([root, real]) != root:
        return (
            f"resolves to {real} through a symlink (a Hugging Face cache snapshot links "
            "its files elsewhere: download the model with --local-dir to get plain files)"
        )
    return None


def shard_files(hf_dir: str) -> list[str]:
    """The shard paths ``hf_dir``'s index names, each checked to lie inside ``hf_dir``,
    sorted and without repeats."""
    index = os.path.join(hf_dir, INDEX_FILE)
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise DataFormatError(f"{index}: not a JSON object ({e})") from None
    if not (
        isinstance(weight_map, dict)
        and weight_map
        and all(isinstance(v, str) for v in weight_map.values())
    ):
        raise DataFormatError(
            f"{index}: expected a non-empty 'weight_map' object of tensor name -> shard file"
        )
    paths = []
    for shard in sorted(set(weight_map.values())):
        why = "is empty" if not shard.strip() else _escape(hf_dir, shard)
        if why:
            raise DataFormatError(
                f"{index}: shard {shard!r} in weight_map {why}; shard files must lie inside "
                f"the model directory {hf_dir}"
            )
        path = os.path.join(hf_dir, shard)
        if not os.path.isfile(path):
            raise DataFormatError(f"{path}: missing shard (listed in {index})")
        paths.append(path)
    return paths


def _load_checked(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    safetensors_header(path)  # the one header check every reader makes (DataFormatError)
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own types
        raise DataFormatError(f"{path}: cannot read safetensors file ({e})") from None
    check_finite_state(tensors, path, _NON_FINITE)
    return tensors


def read_hf_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``hf_dir``'s safetensors file(s), each file checked finite."""
    single = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return _load_checked(single)
    if os.path.isfile(os.path.join(hf_dir, INDEX_FILE)):
        state: dict[str, torch.Tensor] = {}
        for path in shard_files(hf_dir):
            state.update(_load_checked(path))
        return state
    if any(os.path.isfile(os.path.join(hf_dir, n)) for n in _PICKLE_FILES):
        raise DataFormatError(
            f"{hf_dir}: only pickle weights (pytorch_model.bin); convert them to "
            "safetensors first (we never unpickle untrusted files)"
        )
    raise DataFormatError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")
