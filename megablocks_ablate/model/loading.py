"""A live model from a checkpoint directory (the format is :mod:`megablocks_ablate.checkpoint`)."""

from __future__ import annotations

import os

import torch

from megablocks_ablate.checkpoint import Lineage, load_model_checkpoint
from megablocks_ablate.model.config import ModelConfig


def load_model(
    directory: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, Lineage]:
    """``(model, lineage)`` of a checkpoint directory, in eval mode on ``device``."""
    state, config, lineage = load_model_checkpoint(directory)
    cfg = ModelConfig.from_dict(config, _path=os.path.join(directory, "config.json"))
    with torch.device("meta"):
        model = cfg.build()
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), lineage
