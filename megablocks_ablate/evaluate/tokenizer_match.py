"""The tokenizer that goes with a checkpoint being evaluated.

A checkpoint's lineage records the fingerprint of the tokenizer it was trained with
and, under ``extra["tokenizer"]``, the tokenizer itself (``{"path", "fingerprint"}``;
older checkpoints: a bare path). Evaluating with a
different tokenizer gives meaningless perplexities without any error, so it is refused
whenever both fingerprints are known.
"""

from __future__ import annotations

from megablocks_ablate.errors import TokenizerError


def check_tokenizer(expected: str | None, actual: str, what: str, model: str) -> None:
    """Raise :class:`TokenizerError` when a known ``expected`` fingerprint differs."""
    if expected is not None and expected != actual:
        raise TokenizerError(
            f"{what} has tokenizer fingerprint {actual[:16]}..., but {model} was trained with "
            f"{expected[:16]}... (lineage.json tokenizer_fingerprint): evaluate with the model's "
            "tokenizer"
        )


def resolve_tokenizer(lineage, directory: str, path: str | None = None):
    """The tokenizer to evaluate a checkpoint with: ``path`` (an override), else the one
    its lineage records (``extra["tokenizer"]``), else the nearest parent's (merged and
    continued checkpoints written before every checkpoint kept a record).

    Refused when its fingerprint differs from the lineage's ``tokenizer_fingerprint``
    (or, for a lineage without one, from the record's fingerprint).
    """
    from megablocks_ablate.checkpoint import read_checkpoint_meta
    from megablocks_ablate.data.tokenizer import (
        find_recorded_tokenizer,
        load_tokenizer,
        recorded_tokenizer,
    )

    if path is None:
        return find_recorded_tokenizer(
            lineage, directory, read_lineage=lambda d: read_checkpoint_meta(d)[1]
        )
    tokenizer = load_tokenizer(path)
    expected = lineage.tokenizer_fingerprint or (recorded_tokenizer(lineage.extra) or {}).get(
        "fingerprint"
    )
    check_tokenizer(expected, tokenizer.fingerprint, f"tokenizer {path}", directory)
    return tokenizer
