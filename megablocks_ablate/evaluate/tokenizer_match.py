"""The tokenizer that goes with a checkpoint being evaluated.

A checkpoint's lineage records the fingerprint of the tokenizer it was trained with
(and, usually, the tokenizer's path under ``extra["tokenizer"]``). Evaluating with a
different tokenizer gives meaningless perplexities without any error, so it is refused
whenever both fingerprints are known.
"""

from __future__ import annotations

import os

from megablocks_ablate.errors import ConfigError, TokenizerError


def check_tokenizer(expected: str | None, actual: str, what: str, model: str) -> None:
    """Raise :class:`TokenizerError` when a known ``expected`` fingerprint differs."""
    if expected is not None and expected != actual:
        raise TokenizerError(
            f"{what} has tokenizer fingerprint {actual[:16]}..., but {model} was trained with "
            f"{expected[:16]}... (lineage.json tokenizer_fingerprint): evaluate with the model's "
            "tokenizer"
        )


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
            raise ConfigError(
                f"tokenizer: {directory}/lineage.json records no existing tokenizer "
                f"file ({recorded!r}); pass --tokenizer"
            )
        path = recorded
    tokenizer = load_tokenizer(path)
    check_tokenizer(
        lineage.tokenizer_fingerprint, tokenizer.fingerprint, f"tokenizer {path}", directory
    )
    return tokenizer
