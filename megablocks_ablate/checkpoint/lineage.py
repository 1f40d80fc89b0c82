"""``lineage.json``: where a model checkpoint's weights came from.

The lineage is what makes merging safe: unit models may only be averaged when they
continue from the same seed (``seed_hash``) with the same tokenizer
(``tokenizer_fingerprint``). ``seed_hash`` is the sha256 of the seed checkpoint's
``model.safetensors`` (:func:`~megablocks_ablate.checkpoint.model_hash`).

**Trained context.** ``trained_seq_len`` is the sequence length the weights were trained
at: the positions evaluation may score without asking (docs/evaluation.md). The trainer
records its ``seq_len``; ``import-hf`` the exported lineage's value, else the Hugging
Face config's ``max_position_embeddings``; a merge the minimum over its inputs
(:func:`merged_seq_len`). A checkpoint from before the field reads it from the trainer's
older ``extra["seq_len"]``, else falls back to the model's ``max_seq_len`` with one
warning naming it (:func:`trained_seq_len`).

**Paths travel with the checkpoint.** ``parents`` and the tokenizer record
(``extra["tokenizer"]``) are paths. In memory they are absolute, or relative to the
working directory; ``lineage.json`` records a relative one relative to the checkpoint
directory and keeps an absolute one as given (:meth:`Lineage.to_dict` with
``recorded_in``), and reading resolves a relative one against the checkpoint directory
(:meth:`Lineage.from_dict` with ``recorded_in``), so a checkpoint copied with its
tokenizer, or read from another directory, still finds it
(:mod:`megablocks_ablate.utils.paths`). A relative path of a lineage written before this
rule (relative to the trainer's working directory) is still found there when it is not
beside the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.utils.paths import record_path, recorded_as_given

logger = logging.getLogger(__name__)

LINEAGE_KINDS = ("seed", "unit", "seq", "merged", "imported")


@dataclass
class Lineage:
    """Provenance of a model checkpoint (``lineage.json``).

    kind: "seed" (pretrained from scratch), "unit" (continued from the seed on one
        base unit), "seq" (trained on a mixture of units), "merged" (weighted parameter
        average of unit models) or "imported" (e.g. from Hugging Face).
    seed_hash: sha256 of the seed's ``model.safetensors`` (None for a seed itself).
    units: base units trained on (or merged).
    weights: weight per unit (training blend, or merge weights), same length as units.
    tokens_seen: tokens trained on (for merges: the total over the inputs).
    tokenizer_fingerprint: fingerprint of the tokenizer the model expects.
    parents: for merges, the input checkpoints (paths or hashes).
    extra: free-form JSON-serialisable details.
    trained_seq_len: the sequence length the weights were trained at (None: not
        recorded; see the module docstring).
    """

    kind: str
    seed_hash: str | None = None
    units: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    tokenizer_fingerprint: str | None = None
    parents: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    trained_seq_len: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "lineage") -> None:
        """Raise DataFormatError (naming ``where`` and the field) if a field is invalid."""

        def bad(name: str, expected: str, got: Any) -> DataFormatError:
            return DataFormatError(f"{where}: field '{name}' must be {expected}, got {got!r}")

        if self.kind not in LINEAGE_KINDS:
            raise bad("kind", f"one of {', '.join(LINEAGE_KINDS)}", self.kind)
        for name in ("seed_hash", "tokenizer_fingerprint"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise bad(name, "a string or null", v)
        for name in ("units", "parents"):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise bad(name, "a list of strings", v)
        if not isinstance(self.weights, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            for x in self.weights
        ):
            raise bad("weights", "a list of finite numbers", self.weights)
        if self.weights and len(self.weights) != len(self.units):
            raise bad("weights", f"one weight per unit ({len(self.units)})", self.weights)
        if (
            isinstance(self.tokens_seen, bool)
            or not isinstance(self.tokens_seen, int)
            or self.tokens_seen < 0
        ):
            raise bad("tokens_seen", "a non-negative integer", self.tokens_seen)
        if not isinstance(self.extra, dict):
            raise bad("extra", "an object", self.extra)
        if self.trained_seq_len is not None and not _positive_int(self.trained_seq_len):
            raise bad("trained_seq_len", "a positive integer or null", self.trained_seq_len)

    def recorded_seq_len(self) -> int | None:
        """The trained sequence length this lineage records: ``trained_seq_len``, else
        the trainer's older record ``extra["seq_len"]``; None when neither is there."""
        if self.trained_seq_len is not None:
            return self.trained_seq_len
        legacy = self.extra.get("seq_len")
        return legacy if _positive_int(legacy) else None

    def to_dict(self, recorded_in: str | None = None) -> dict:
        """The JSON object; ``recorded_in``: the file it is written to, which records the
        relative paths (parents, the tokenizer) relative to its directory (see the
        module docstring); without it they are written as held."""
        d = dataclasses.asdict(self)
        d["weights"] = [float(w) for w in self.weights]
        if recorded_in is not None:
            _map_paths(d, lambda p: record_path(p, recorded_in))
        return d

    @classmethod
    def from_dict(cls, d: Any, path: str | None = None, recorded_in: str | None = None) -> Lineage:
        """Build and validate; errors name ``path`` (the lineage file) when given.
        ``recorded_in``: the file ``d`` was read from; its relative paths are resolved
        against that file's directory (see the module docstring)."""
        if recorded_in is not None and isinstance(d, dict):
            d = dict(d, extra=dict(d["extra"])) if isinstance(d.get("extra"), dict) else dict(d)
            _map_paths(d, lambda p: recorded_as_given(p, recorded_in, cwd_fallback=True))
        where = path or "lineage"
        if not isinstance(d, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataFormatError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
        if "kind" not in d:
            raise DataFormatError(f"{where}: missing required field 'kind'")
        obj = cls.__new__(cls)  # bypass __post_init__ so errors can name the file
        for f in dataclasses.fields(cls):
            if f.name in d:
                value = d[f.name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                value = f.default_factory()  # type: ignore[operator]
            setattr(obj, f.name, value)
        if isinstance(obj.weights, list):  # JSON ints are fine as weights
            obj.weights = [
                float(w) if isinstance(w, int) and not isinstance(w, bool) else w
                for w in obj.weights
            ]
        obj.validate(where)
        return obj


def _map_paths(d: dict, fn) -> None:
    """Apply ``fn`` to the paths of a lineage's JSON object ``d`` (in place; only well
    formed values: validation reports the others): each parent and the tokenizer
    record's path (a ``{"path", ...}`` record or an older bare path string)."""
    parents = d.get("parents")
    if isinstance(parents, list):
        d["parents"] = [fn(p) if isinstance(p, str) and p else p for p in parents]
    extra = d.get("extra")
    if not isinstance(extra, dict):
        return
    tok = extra.get("tokenizer")
    if isinstance(tok, str) and tok:
        extra["tokenizer"] = fn(tok)
    elif isinstance(tok, dict) and isinstance(tok.get("path"), str) and tok["path"]:
        extra["tokenizer"] = dict(tok, path=fn(tok["path"]))


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


_warned_unrecorded: set[str] = set()  # checkpoints already warned about (once each)


def trained_seq_len(lineage: Lineage, max_seq_len: int, where: str) -> int:
    """The sequence length the checkpoint ``where`` was trained at, never above its
    model's ``max_seq_len``. A lineage that records none (written before the field, or a
    merge of such inputs) falls back to ``max_seq_len``, with one warning per checkpoint."""
    recorded = lineage.recorded_seq_len()
    if recorded is not None:
        return min(recorded, max_seq_len)
    if where not in _warned_unrecorded:
        _warned_unrecorded.add(where)
        logger.warning(
            "%s: its lineage records no trained_seq_len (written before it was recorded); "
            "assuming it was trained at the model's max_seq_len=%d",
            where,
            max_seq_len,
        )
    return max_seq_len


def merged_seq_len(lineages: Mapping[str, Lineage], what: str = "merge") -> int | None:
    """The trained length a merge of ``lineages`` (``{name: lineage}``) inherits: the
    minimum over its inputs, with a warning when they disagree; None (not recorded) when
    any input records none, so the merged checkpoint's reader falls back and warns."""
    lengths = {name: lin.recorded_seq_len() for name, lin in lineages.items()}
    unknown = [name for name, n in lengths.items() if n is None]
    if unknown or not lengths:
        if unknown:
            logger.warning(
                "%s: input %s records no trained_seq_len, so the merge records none",
                what,
                unknown[0],
            )
        return None
    known = {name: n for name, n in lengths.items() if n is not None}
    low = min(known.values())
    if len(set(known.values())) > 1:
        logger.warning(
            "%s: the inputs were trained at different lengths (%s); the merge records "
            "the minimum, %d",
            what,
            ", ".join(f"{name} {n}" for name, n in known.items()),
            low,
        )
    return low
