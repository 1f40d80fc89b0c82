"""The weights a continued run (``init_from``) starts from, checked before use.

In order, each refusing with the file named: the weights' sha256 against the one the
trainer recorded when it wrote them (a run's ``final/``: COMPLETE.json; a step
checkpoint: trainer_state.json), once, on rank 0; the checkpoint's model config against
this run's (run-time fields such as ``compile`` aside); its tokenizer against the
data's; every weight finite; then a strict load into the model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from megablocks_ablate.checkpoint import MODEL_FILE, check_finite_state, load_model_checkpoint
from megablocks_ablate.errors import ConfigError, DataFormatError
from megablocks_ablate.train import state as st
from megablocks_ablate.utils.verify import verify_sha256

logger = logging.getLogger(__name__)

# Model-config fields that change how a model is run, not what it is.
RUNTIME_MODEL_FIELDS = ("activation_checkpointing", "compile")


def model_differences(a: dict, b: dict) -> list[str]:
    """The model-config fields in which ``a`` and ``b`` describe different models."""
    keys = (set(a) | set(b)) - set(RUNTIME_MODEL_FIELDS)
    return sorted(k for k in keys if a.get(k) != b.get(k))


def verify_init_weights(path: str) -> str:
    """The sha256 of ``path``'s weights, checked against the recorded one (if any)."""
    expected, source = st.recorded_model_sha256(path)
    if expected is None:
        logger.info(f"init_from {path}: no recorded sha256 to check its weights against")
    return verify_sha256(
        os.path.join(path, MODEL_FILE),
        expected,
        f"init_from in {source}" if source else "init_from",
        "restore it, or train that model again",
    )


def load_init_weights(
    model: torch.nn.Module,
    path: str,
    model_config: dict,
    manifest,
    manifest_path: str,
    device: torch.device,
    on_main: Callable,
) -> str:
    """Load ``path``'s weights into ``model`` (not yet wrapped), verified first (the
    hash by ``on_main``: rank 0 only); returns the sha256 of the verified bytes (the
    lineage's seed hash)."""
    digest = on_main(lambda: verify_init_weights(path))
    state, config, lineage = load_model_checkpoint(path)
    diff = model_differences(config, model_config)
    if diff:
        raise ConfigError(
            f"init_from {path}: its model config differs in {', '.join(diff)} "
            f"(checkpoint {[config.get(k) for k in diff]} vs "
            f"{[model_config.get(k) for k in diff]})"
        )
    fp = lineage.tokenizer_fingerprint
    if fp is not None and fp != manifest.tokenizer_fingerprint:
        raise ConfigError(
            f"init_from {path}: trained with tokenizer {fp}, but "
            f"{manifest_path} uses {manifest.tokenizer_fingerprint}"
        )
    check_finite_state(
        state,
        os.path.join(path, MODEL_FILE),
        f"the init_from checkpoint {path} holds broken weights and no run can start from "
        "it: give another init_from, or train that model again",
    )
    try:
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise DataFormatError(f"init_from {path}: weights do not fit the model ({e})") from None
    return digest
