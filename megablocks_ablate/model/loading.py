"""A live model from a checkpoint directory (the format is :mod:`megablocks_ablate.checkpoint`)."""

from __future__ import annotations

import os

import torch

from megablocks_ablate.checkpoint import Lineage, load_model_checkpoint
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.model.config import ModelConfig


def load_model(
    directory: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, Lineage]:
    """``(model, lineage)`` of a checkpoint directory, in eval mode on ``device``."""
    state, config, lineage = load_model_checkpoint(directory)
    cfg = ModelConfig.from_dict(config, _path=os.path.join(directory, "config.json"))
    with torch.device("meta"):
        model = cfg.build()
    check_weights_match_config(state, model, directory)
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), lineage


def check_weights_match_config(state: dict, model: torch.nn.Module, directory: str) -> None:
    """Refuse (DataFormatError naming the tensor) weights whose names or shapes are not
    those of the model ``config.json`` describes: a config edited or copied from another
    model, which would otherwise fail deep inside loading with a traceback."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    where = os.path.join(directory, "model.safetensors")
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise DataFormatError(
            f"{where}: no tensor {missing[0]!r}, which {directory}/config.json's model has"
        )
    if extra:
        raise DataFormatError(
            f"{where}: tensor {extra[0]!r} is not part of the model {directory}/config.json "
            "describes (weights and config from different models?)"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise DataFormatError(
                f"{where}: tensor {name!r} has shape {list(state[name].shape)}, but "
                f"{directory}/config.json describes {list(shape)} (weights and config "
                "from different models?)"
            )
