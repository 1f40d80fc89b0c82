"""``lineage.json``: where a model checkpoint's weights came from.

The lineage is what makes merging safe: unit models may only be averaged when they
continue from the same seed (``seed_hash``) with the same tokenizer
(``tokenizer_fingerprint``). ``seed_hash`` is the sha256 of the seed checkpoint's
``model.safetensors`` (:func:`~megablocks_ablate.checkpoint.model_hash`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from megablocks_ablate.errors import DataFormatError

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
    """

    kind: str
    seed_hash: str | None = None
    units: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    tokenizer_fingerprint: str | None = None
    parents: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weights"] = [float(w) for w in self.weights]
        return d

    @classmethod
    def from_dict(cls, d: Any, path: str | None = None) -> Lineage:
        """Build and validate; errors name ``path`` (the lineage file) when given."""
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
