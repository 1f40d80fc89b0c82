"""The model checkpoint directory: ``model.safetensors`` + ``config.json`` + ``lineage.json``.

::

    ckpt/
      model.safetensors   # weights, no pickle anywhere
      config.json         # the model config (a plain dict, written by the model package)
      lineage.json        # where the weights came from (see :class:`.Lineage`)

Writes are staged (:func:`.staged_checkpoint_dir`): a reader sees either the old
checkpoint or the complete new one. Reads validate before they trust: a missing
file, invalid JSON or a truncated safetensors file is a :class:`DataFormatError`
naming the path.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from megablocks_ablate.checkpoint.lineage import Lineage
from megablocks_ablate.checkpoint.safetensors_io import MappedSafetensors, safetensors_header
from megablocks_ablate.checkpoint.staging import staged_checkpoint_dir, write_json
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.utils.hashing import sha256_file

if TYPE_CHECKING:  # torch is imported on use: the file-merge path never needs it
    import torch

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LINEAGE_FILE = "lineage.json"


def plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; shared storages (tied weights) are cloned,
    because safetensors stores each tensor on its own."""
    import torch

    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, object]] = set()
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def save_model_checkpoint(
    directory: str, state_dict: dict[str, torch.Tensor], config: dict, lineage: Lineage
) -> None:
    """Write ``model.safetensors``, ``config.json`` and ``lineage.json`` atomically."""
    from safetensors.torch import save_file

    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    lineage.validate()
    tensors = plain_tensors(state_dict)
    with staged_checkpoint_dir(directory) as tmp:
        save_file(tensors, os.path.join(tmp, MODEL_FILE), metadata={"format": "pt"})
        write_checkpoint_meta(tmp, config, lineage)


def write_checkpoint_meta(directory: str, config: dict, lineage: Lineage) -> None:
    """Write ``config.json`` and ``lineage.json`` into a (staged) checkpoint directory."""
    write_json(os.path.join(directory, CONFIG_FILE), config)
    path = os.path.join(directory, LINEAGE_FILE)  # a staged directory sits beside its
    write_json(path, lineage.to_dict(recorded_in=path))  # target: same relative paths


def _require_file(directory: str, name: str) -> str:
    if not os.path.isdir(directory):
        raise DataFormatError(f"{directory}: checkpoint directory does not exist")
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise DataFormatError(
            f"{path}: missing checkpoint file (expected {MODEL_FILE}, "
            f"{CONFIG_FILE} and {LINEAGE_FILE})"
        )
    return path


def model_file(directory: str) -> str:
    """Path of the checkpoint's ``model.safetensors`` (DataFormatError if absent)."""
    return _require_file(directory, MODEL_FILE)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: invalid JSON ({e})") from None


def read_checkpoint_meta(directory: str) -> tuple[dict, Lineage]:
    """The model config and lineage of a checkpoint, without touching its weights."""
    cfg_path = _require_file(directory, CONFIG_FILE)
    config = _read_json(cfg_path)
    if not isinstance(config, dict):
        raise DataFormatError(f"{cfg_path}: expected a JSON object")
    lin_path = _require_file(directory, LINEAGE_FILE)
    return config, Lineage.from_dict(_read_json(lin_path), path=lin_path, recorded_in=lin_path)


def open_model_weights(directory: str):
    """A memory-mapped ``safetensors.safe_open`` handle (framework "pt") on the weights,
    after checking that every tensor's byte range lies inside the file (safetensors
    maps lazily, so a truncated file would otherwise fail late or not at all)."""
    from safetensors import SafetensorError, safe_open

    path = _require_file(directory, MODEL_FILE)
    safetensors_header(path)
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise DataFormatError(f"{path}: cannot read safetensors file ({e})") from None


def map_model_weights(directory: str) -> dict[str, torch.Tensor]:
    """Zero-copy tensors over a memory map of ``model.safetensors``, in file order.

    Pages are read from disk only when touched; the tensors keep the map alive (see
    :class:`MappedSafetensors` for streaming with bounded resident memory).
    """
    mapped = MappedSafetensors(_require_file(directory, MODEL_FILE))
    return {name: mapped.tensor(name) for name in mapped.names}


def load_model_checkpoint(
    directory: str, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict, Lineage]:
    """``(state_dict, config, lineage)`` of a checkpoint directory."""
    config, lineage = read_checkpoint_meta(directory)
    path = os.path.join(directory, MODEL_FILE)
    with open_model_weights(directory) as f:
        try:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open: no __iter__)
        except Exception as e:  # safetensors raises its own error types
            raise DataFormatError(f"{path}: cannot read tensors ({e})") from None
    if str(device) != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
    return state, config, lineage


def model_hash(directory: str) -> str:
    """sha256 of the checkpoint's ``model.safetensors`` (what ``Lineage.seed_hash`` records)."""
    return sha256_file(_require_file(directory, MODEL_FILE))
