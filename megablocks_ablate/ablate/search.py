"""Searching for the best k-mixture by a proxy, and exporting it as a training blend.

The search only needs a scoring callable ``score(names) -> float`` (lower is better,
e.g. a merged model's perplexity): :func:`table_scorer` reads scores already in a
results table, and a runner can pass one that merges and evaluates lazily. Scores
are cached, so each mixture is scored at most once.

* :func:`greedy_search`: grow the mixture one partition at a time, keeping the best;
* :func:`beam_search`: keep the ``beam_width`` best partial mixtures at each size
  (greedy is beam width 1). Ties break by partition names, so results are
  deterministic.

A chosen mixture becomes training data with :func:`training_blend` (the ``data``
section of our train config: explicit partition-balanced unit weights, the paper's
equal-partition upsampling) or :func:`megatron_data_path` (``--data-path w1 p1 ...``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.mixtures import Mixture

Scorer = Callable[[tuple[str, ...]], float]


@dataclass
class SearchResult:
    best: tuple[str, ...]
    score: float
    scored: dict[tuple[str, ...], float] = field(default_factory=dict)  # in scoring order
    beams: list[list[tuple[tuple[str, ...], float]]] = field(default_factory=list)  # per size

    @property
    def evaluations(self) -> int:
        return len(self.scored)


def beam_search(
    partitions: Sequence[str],
    k: int,
    score: Scorer,
    *,
    beam_width: int = 4,
    start: Sequence[str] = (),
) -> SearchResult:
    """Best mixture of ``k`` partitions (containing ``start``) by beam search.

    Scores ``sum over sizes of beam_width * (remaining partitions)`` mixtures at most,
    instead of all ``C(P, k)``.
    """
    names = list(dict.fromkeys(partitions))
    start_t = tuple(sorted(start))
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    unknown = [p for p in start_t if p not in names]
    if unknown:
        raise ValueError(f"start: unknown partition {unknown[0]!r}")
    if not len(start_t) <= k <= len(names) or k < 1:
        raise ValueError(
            f"k={k} must be between max(1, len(start)={len(start_t)}) and the "
            f"number of partitions ({len(names)})"
        )
    cache: dict[tuple[str, ...], float] = {}

    def scored(m: tuple[str, ...]) -> float:
        if m not in cache:
            v = float(score(m))
            cache[m] = v if not math.isnan(v) else math.inf
        return cache[m]

    beam: list[tuple[tuple[str, ...], float]] = [
        (start_t, scored(start_t) if start_t else math.inf)
    ]
    result = SearchResult(start_t, beam[0][1])
    for _size in range(len(start_t), k):
        candidates = {tuple(sorted(m + (p,))) for m, _ in beam for p in names if p not in m}
        ranked = sorted(((c, scored(c)) for c in candidates), key=lambda cv: (cv[1], cv[0]))
        beam = ranked[:beam_width]
        result.beams.append(beam)
    result.best, result.score = beam[0]
    result.scored = dict(cache)
    return result


def greedy_search(
    partitions: Sequence[str], k: int, score: Scorer, *, start: Sequence[str] = ()
) -> SearchResult:
    """Add, k times, the partition whose addition scores best (beam width 1)."""
    return beam_search(partitions, k, score, beam_width=1, start=start)


def table_scorer(
    table,
    proxy: str,
    partitions: Mapping[str, Sequence[str]],
    domains: Sequence[str] | None = None,
    missing: str = "raise",
) -> Scorer:
    """Score mixtures from an :class:`~.analysis.ResultTable`: geometric-mean perplexity
    of ``proxy`` over ``domains`` (default: the table's individual domains).

    Greedy and beam search score the smaller mixtures on the way to size k; a mixture
    missing from the table raises LookupError (``missing="raise"``: score it first, or
    use a runner's lazy scorer) or scores ``inf`` (``missing="inf"``).
    """
    if missing not in ("raise", "inf"):
        raise ValueError(f"missing: expected 'raise' or 'inf', got {missing!r}")
    domains = list(domains if domains is not None else table.domains)

    def score(names: tuple[str, ...]) -> float:
        m = Mixture.of({p: partitions[p] for p in names})
        vals = [table.get(proxy, d).get(m.id) for d in domains]
        if any(v is None for v in vals):
            if missing == "inf":
                return math.inf
            raise LookupError(
                f"mixture {m.label} ({m.id}) has no {proxy} score on every domain of {domains}"
            )
        return float(np.exp(np.mean(np.log(vals))))

    return score


# ----------------------------------------------------------------------------- export


def blend_weights(mixture: Mixture) -> dict[str, float]:
    """Partition-balanced unit weights: every partition 1/G (its share, for a proportion
    mixture), split equally inside: the macro proxy's merge weights, which are also the
    blend a seq model of the mixture trains on."""
    return mx.proxy_weights(mixture, "macro")


def training_blend(mixture: Mixture, manifest: str) -> dict:
    """The ``data`` section of a train config that trains on ``mixture``."""
    return {"manifest": manifest, "weights": blend_weights(mixture)}


def megatron_data_path(mixture: Mixture, unit_paths: Mapping[str, str]) -> str:
    """Megatron-LM ``--data-path`` value: ``w1 prefix1 w2 prefix2 ...``.

    ``unit_paths`` maps each unit to its indexed-dataset prefix (no ``.bin``/``.idx``),
    e.g. :attr:`~.spec.Study.unit_paths`. Weights are partition-balanced and printed
    with enough digits to sum to 1.
    """
    missing = [u for u in mixture.units if u not in unit_paths]
    if missing:
        raise KeyError(f"no data prefix for unit {missing[0]!r}")
    w = blend_weights(mixture)
    return " ".join(f"{w[u]:.10g} {unit_paths[u]}" for u in mixture.units)
