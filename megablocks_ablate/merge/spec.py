"""Merge specs: every way of naming a mixture reduces to one weight vector over units.

A spec file (YAML) lists the unit models and says how to weight them::

    checkpoints:            # unit name -> checkpoint directory (relative to this file;
                            #   a training run directory means its final/)
      cs_0: pool/cs_0
      cs_1: pool/cs_1
      bio_0: pool/bio_0
    macro:                  # exactly one of: weights, uniform, by_tokens, macro, micro, tree
      cs: [cs_0, cs_1]
      bio: [bio_0]
    normalize: true         # default: explicit weights are scaled to sum 1
    allow_negative: false   # default: negative weights are refused
    dtype: bf16             # optional output dtype (fp32 | bf16 | fp16); default: the inputs'

The mixture forms (each is also a node of a ``tree``):

* ``uniform: [units]`` (or ``true`` for all checkpoints): equal weights.
* ``weights: {unit: w}``, or in a tree ``weights: [{node: NODE, weight: w}, ...]``.
* ``by_tokens: [units]`` / ``true``: weights proportional to each unit's tokens seen
  (from its lineage), or ``by_tokens: {unit: tokens}`` with explicit counts.
* ``macro: {partition: [NODE, ...]}``: average within each partition, then across
  partitions: unit u in partition g gets (1/G)(1/|g|) (Na et al. 2024).
* ``micro: [NODE, ...]`` / ``true``: uniform over all units below (partitions flattened).
* ``tree: NODE`` where NODE is a unit name or a one-key mapping of the forms above,
  nested freely (``{uniform: [NODE, ...]}`` averages subtrees with equal weight).

Every subtree contributes a weight vector summing to 1 (means are normalised by
construction); ``normalize: false`` keeps explicit weights as written (e.g. for
extrapolation), in which case only the final vector is checked. A macro merge is
therefore exactly the merge of its partition merges, weighted 1/G each.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from megablocks_ablate.checkpoint.run_dir import resolve_checkpoint_dir
from megablocks_ablate.errors import ConfigError, DataFormatError

MIXTURE_KEYS = ("weights", "uniform", "by_tokens", "macro", "micro", "tree")
TOP_KEYS = ("checkpoints", "normalize", "allow_negative", "dtype") + MIXTURE_KEYS
DTYPES = ("fp32", "bf16", "fp16")


# ----------------------------------------------------------------------------- helpers
# (used directly by the study runner: a mixture of partitions -> weights over units)


def micro_weights(units: Sequence[str]) -> dict[str, float]:
    """Uniform over all units: the paper's *micro* merge."""
    if not units:
        raise ConfigError("micro merge: no units")
    return {u: 1.0 / len(units) for u in units}


def macro_weights(partitions: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Average within each partition, then across: unit u in g gets (1/G)(1/|g|).

    The same vector as the data side's equal-partition upsampling, so one function
    (:func:`megablocks_ablate.data.mixture.partition_balanced_weights`) defines both.
    """
    from megablocks_ablate.data.mixture import partition_balanced_weights

    try:
        return partition_balanced_weights(partitions)
    except ValueError as e:
        raise ConfigError(f"macro merge: {e}") from None


# ----------------------------------------------------------------------------- reduction


@dataclass
class _Context:
    units: Sequence[str]  # known unit names (the checkpoints)
    tokens: Mapping[str, int] | None  # tokens seen per unit, for by_tokens
    normalize: bool
    allow_negative: bool
    where: str  # the spec file, for messages


def _err(ctx: _Context, path: str, msg: str) -> ConfigError:
    return ConfigError(f"{ctx.where}: {path}: {msg}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _add(acc: dict[str, float], vec: Mapping[str, float], scale: float) -> None:
    for u, w in vec.items():
        acc[u] = acc.get(u, 0.0) + scale * w


def _number(ctx: _Context, path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(ctx, path, f"expected a number, got {value!r}")
    w = float(value)
    if not math.isfinite(w):
        raise _err(ctx, path, f"weight must be finite, got {w}")
    if w < 0 and not ctx.allow_negative:
        raise _err(ctx, path, f"negative weight {w} (set allow_negative: true to allow)")
    return w


def _combine(
    ctx: _Context, path: str, parts: list[tuple[dict[str, float], float]], normalize: bool
) -> dict[str, float]:
    """Weighted sum of child vectors; with ``normalize`` the child weights sum to 1."""
    total = sum(w for _, w in parts)
    if normalize and (total == 0 or not math.isfinite(total)):
        raise _err(
            ctx, path, f"weights sum to {total}; cannot normalise (all-zero or cancelling weights)"
        )
    out: dict[str, float] = {}
    for vec, w in parts:
        _add(out, vec, w / total if normalize else w)
    return out


def _children(ctx: _Context, path: str, value: Any) -> list[Any]:
    if value is True:
        return list(ctx.units)
    if not isinstance(value, list) or not value:
        raise _err(ctx, path, f"expected a non-empty list (or true for all units), got {value!r}")
    return value


def _leaves(ctx: _Context, path: str, node: Any) -> list[str]:
    """All unit names below a node (what a micro merge flattens)."""
    if isinstance(node, str):
        return [node]
    vec = _reduce(ctx, path, node)
    return list(vec)


def _reduce(ctx: _Context, path: str, node: Any) -> dict[str, float]:
    """The weight vector (unit -> weight) of one spec node."""
    if isinstance(node, str):
        if node not in ctx.units:
            raise _err(ctx, path, f"unknown unit {node!r}; checkpoints are: {', '.join(ctx.units)}")
        return {node: 1.0}
    if not isinstance(node, dict) or len(node) != 1:
        raise _err(
            ctx,
            path,
            "expected a unit name or a mapping with exactly one of "
            f"{', '.join(MIXTURE_KEYS[:5])}, got {node!r}",
        )
    ((kind, value),) = node.items()
    reduce_kind = _KINDS.get(kind)
    if reduce_kind is None:
        raise _err(
            ctx,
            path,
            f"unknown mixture kind {kind!r}; expected one of {', '.join(MIXTURE_KEYS[:5])}",
        )
    return reduce_kind(ctx, _join(path, kind), value)


def _uniform(ctx: _Context, here: str, value: Any) -> dict[str, float]:
    """Equal weight per child node."""
    kids = _children(ctx, here, value)
    return _combine(
        ctx,
        here,
        [(_reduce(ctx, f"{here}[{i}]", k), 1.0) for i, k in enumerate(kids)],
        normalize=True,
    )


def _micro(ctx: _Context, here: str, value: Any) -> dict[str, float]:
    """Equal weight per unit, over all units below the children."""
    kids = _children(ctx, here, value)
    units: list[str] = []
    for i, k in enumerate(kids):
        units += [u for u in _leaves(ctx, f"{here}[{i}]", k) if u not in units]
    return micro_weights(units)


def _macro(ctx: _Context, here: str, value: Any) -> dict[str, float]:
    """Equal weight per partition, split equally among its children."""
    if not isinstance(value, dict) or not value:
        raise _err(ctx, here, f"expected a mapping partition -> [units], got {value!r}")
    parts = [(_uniform(ctx, _join(here, str(g)), kids), 1.0) for g, kids in value.items()]
    return _combine(ctx, here, parts, normalize=True)


def _weights(ctx: _Context, here: str, value: Any) -> dict[str, float]:
    """Explicit weights: ``{unit: w}`` or a list of ``{node, weight}``."""
    if isinstance(value, dict) and value:
        items = [(k, v, _join(here, str(k))) for k, v in value.items()]
    elif isinstance(value, list) and value:
        items = []
        for i, e in enumerate(value):
            if not isinstance(e, dict) or set(e) != {"node", "weight"}:
                raise _err(ctx, f"{here}[{i}]", f"expected {{node: ..., weight: ...}}, got {e!r}")
            items.append((e["node"], e["weight"], f"{here}[{i}]"))
    else:
        raise _err(
            ctx, here, f"expected {{unit: weight}} or a list of {{node, weight}}, got {value!r}"
        )
    parts = [(_reduce(ctx, p, k), _number(ctx, p, w)) for k, w, p in items]
    return _combine(ctx, here, parts, normalize=ctx.normalize)


def _by_tokens(ctx: _Context, here: str, value: Any) -> dict[str, float]:
    """Weights proportional to token counts: given, or from the checkpoints' lineage."""
    if isinstance(value, dict) and value:
        parts = [
            (_reduce(ctx, _join(here, str(k)), k), _number(ctx, _join(here, str(k)), v))
            for k, v in value.items()
        ]
        return _combine(ctx, here, parts, normalize=True)
    kids = _children(ctx, here, value)
    parts = []
    for i, k in enumerate(kids):
        sub = f"{here}[{i}]"
        vec = _reduce(ctx, sub, k)
        if ctx.tokens is None:
            raise _err(
                ctx,
                sub,
                "by_tokens needs token counts (from the checkpoints' "
                "lineage, or given as {unit: tokens})",
            )
        parts.append((vec, float(sum(ctx.tokens.get(u, 0) for u in vec))))
    return _combine(ctx, here, parts, normalize=True)


_KINDS = {
    "uniform": _uniform,
    "micro": _micro,
    "macro": _macro,
    "weights": _weights,
    "by_tokens": _by_tokens,
}


# ----------------------------------------------------------------------------- the spec


def load_yaml(path: str) -> Any:
    """The parsed YAML of a merge spec (or a mergekit config: ``merge`` reads both)."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read merge spec ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None


def _resolve_run_dirs(ckpts: dict[str, str], source: str) -> dict[str, str]:
    """Each checkpoint path with a training run directory replaced by its final/; an
    unfinished run is refused, naming the spec entry and the run's latest checkpoint."""
    out = {}
    for unit, path in ckpts.items():
        try:
            out[unit] = resolve_checkpoint_dir(path)
        except DataFormatError as e:
            raise DataFormatError(f"{source}: checkpoints.{unit}: {e}") from None
    return out


@dataclass
class MergeSpec:
    """A parsed merge spec: checkpoints by unit name plus one mixture tree."""

    checkpoints: dict[str, str]
    tree: Any
    normalize: bool = True
    allow_negative: bool = False
    dtype: str | None = None
    source: str = "merge spec"
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(
        cls, d: Any, source: str = "merge spec", base_dir: str | None = None
    ) -> MergeSpec:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        unknown = sorted(set(d) - set(TOP_KEYS))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {', '.join(TOP_KEYS)}")
        ckpts = d.get("checkpoints")
        if (
            not isinstance(ckpts, dict)
            or not ckpts
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in ckpts.items())
        ):
            raise ConfigError(
                f"{source}: checkpoints: expected a non-empty mapping "
                f"unit name -> checkpoint directory, got {ckpts!r}"
            )
        if base_dir:
            ckpts = {
                k: v if os.path.isabs(v) else os.path.join(base_dir, v) for k, v in ckpts.items()
            }
        ckpts = _resolve_run_dirs(ckpts, source)
        kinds = [k for k in MIXTURE_KEYS if k in d]
        if len(kinds) != 1:
            raise ConfigError(
                f"{source}: expected exactly one of {', '.join(MIXTURE_KEYS)}, "
                f"got {kinds or 'none'}"
            )
        kind = kinds[0]
        tree = d[kind] if kind == "tree" else {kind: d[kind]}
        flags = {}
        for name in ("normalize", "allow_negative"):
            v = d.get(name, name == "normalize")
            if not isinstance(v, bool):
                raise ConfigError(f"{source}: {name}: expected true or false, got {v!r}")
            flags[name] = v
        dtype = d.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(
                f"{source}: dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}"
            )
        spec = cls(
            dict(ckpts), tree, flags["normalize"], flags["allow_negative"], dtype, source, dict(d)
        )
        # Check structure and weights now; real token counts may only come later.
        spec._vector({u: 1 for u in spec.units} if spec.needs_tokens() else None)
        return spec

    @classmethod
    def load(cls, path: str) -> MergeSpec:
        """Read a YAML spec; relative checkpoint paths are relative to the file."""
        return cls.from_file_data(load_yaml(path), path)

    @classmethod
    def from_file_data(cls, d: Any, path: str) -> MergeSpec:
        """A spec from the parsed contents of the file ``path`` (see :meth:`load`)."""
        return cls.from_dict(d, source=path, base_dir=os.path.dirname(os.path.abspath(path)))

    @property
    def units(self) -> list[str]:
        return list(self.checkpoints)

    def needs_tokens(self) -> bool:
        """Whether :meth:`weights` needs token counts (a by_tokens node without counts)."""

        def walk(node: Any) -> bool:
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "by_tokens" and not isinstance(v, dict):
                        return True
                    if walk(v):
                        return True
            if isinstance(node, list):
                return any(walk(x) for x in node)
            return False

        return walk(self.tree)

    def _vector(self, tokens: Mapping[str, int] | None) -> dict[str, float]:
        ctx = _Context(self.units, tokens, self.normalize, self.allow_negative, self.source)
        vec = _reduce(ctx, "tree" if "tree" in self.raw else "", self.tree)
        if not all(math.isfinite(w) for w in vec.values()):
            raise ConfigError(f"{self.source}: the weights are not finite: {vec}")
        if not any(vec.values()):
            raise ConfigError(f"{self.source}: all weights are zero")
        if not self.allow_negative and any(w < 0 for w in vec.values()):
            raise ConfigError(f"{self.source}: negative weights (set allow_negative: true)")
        return vec

    def weights(self, tokens: Mapping[str, int] | None = None) -> dict[str, float]:
        """The weight of every checkpoint (in checkpoint order; 0 for unused units).

        ``tokens``: tokens seen per unit, needed by ``by_tokens`` without explicit counts.
        """
        if tokens is None and self.needs_tokens():
            raise ConfigError(f"{self.source}: by_tokens needs token counts per unit")
        vec = self._vector(tokens)
        return {u: vec.get(u, 0.0) for u in self.units}
