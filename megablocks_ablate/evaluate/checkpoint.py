"""Models to evaluate, from checkpoint directories, and the tokenizer that goes with them.

A checkpoint's lineage records the fingerprint of the tokenizer it was trained with
(and, usually, the tokenizer's path under ``extra["tokenizer"]``). Evaluating with a
different tokenizer gives meaningless perplexities without any error, so it is refused
whenever both fingerprints are known.
"""

from __future__ import annotations

import os

import torch

from megablocks_ablate.errors import ConfigError, TokenizerError


def load_model(directory: str, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None):
    """``(model, lineage)`` of a checkpoint directory, in eval mode on ``device``."""
    from megablocks_ablate.model.config import ModelConfig
    from megablocks_ablate.train.checkpoint import load_model_checkpoint

    state, config, lineage = load_model_checkpoint(directory)
    cfg = ModelConfig.from_dict(config, _path=os.path.join(directory, "config.json"))
    with torch.device("meta"):
        model = cfg.build()
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), lineage


def check_tokenizer(expected: str | None, actual: str, what: str, model: str) -> None:
    """Raise :class:`TokenizerError` when a known ``expected`` fingerprint differs."""
    if expected is not None and expected != actual:
        raise TokenizerError(
            f"{what} has tokenizer fingerprint {actual[:16]}..., but {model} was trained with "
            f"{expected[:16]}... (lineage.json tokenizer_fingerprint): evaluate with the model's "
            "tokenizer")


def resolve_tokenizer(lineage, directory: str, path: str | None = None):
    """The tokenizer to evaluate a checkpoint with: ``path``, else the lineage's record.

    Refused when its fingerprint differs from the lineage's ``tokenizer_fingerprint``.
    """
    from megablocks_ablate.data.tokenizer import load_tokenizer

    if path is None:
        recorded = lineage.extra.get("tokenizer") if isinstance(lineage.extra, dict) else None
        if isinstance(recorded, dict):
            recorded = recorded.get("path")
        if not (isinstance(recorded, str) and os.path.isfile(recorded)):
            raise ConfigError(f"tokenizer: {directory}/lineage.json records no existing tokenizer "
                              f"file ({recorded!r}); pass --tokenizer")
        path = recorded
    tokenizer = load_tokenizer(path)
    check_tokenizer(lineage.tokenizer_fingerprint, tokenizer.fingerprint, f"tokenizer {path}",
                    directory)
    return tokenizer
