"""Analysis of a study's results: how well proxies predict seq models, and what to pick.

* statistics: :func:`pearson`, :func:`spearman` (ties get average ranks) and seeded
  percentile :func:`bootstrap_ci` over mixtures (the units of observation);
* :func:`build_table` turns a results store into ``proxy -> domain -> mixture ->
  perplexity``, deriving ``mean_ind`` and ``ind_id`` from unit-model results and each
  mixture's in-domain row ``ID`` (its own held-out sets, pooled; :mod:`.mixtures`);
* :func:`correlation_table`: the paper's layout (Tables 2-4): rows are evaluation
  domains, ``ID``, ``mean`` (mean of the per-domain coefficients) and ``pooled`` (one
  coefficient over every (mixture, domain) point of the individual domains, as in a
  Figure 3 panel); columns are proxies; each cell correlates a proxy with seq
  perplexity across the mixtures that have a seq model;
* :func:`rank_mixtures`, :func:`recommend`: every scored mixture ranked by a proxy, and
  the recommended one (lowest perplexity; over several domains, lowest geometric mean);
* :func:`top_k_agreement`, :func:`best_true_rank`: do proxy and seq agree at the top?
* :func:`partition_influence`: the effect of adding a partition, from every pair of
  scored mixtures differing by one partition (leave-one-out and add-one studies).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.mixtures import ID_DOMAIN, SEQ, Mixture, Score

# 1-D numbers: a list or a NumPy array (the statistics convert with np.asarray)
Values = Sequence[float] | np.ndarray

MEAN_ROW = "mean"
POOLED_ROW = "pooled"


# ----------------------------------------------------------------------------- statistics


def pearson(x: Values, y: Values) -> float:
    """Pearson's r; NaN with fewer than 2 points or a constant input."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(
            f"pearson: expected two 1-D arrays of one length, got {xa.shape}, {ya.shape}"
        )
    if len(xa) < 2:
        return math.nan
    dx, dy = xa - xa.mean(), ya - ya.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0.0:
        return math.nan
    return float(np.clip((dx @ dy) / denom, -1.0, 1.0))


def rankdata(x: Values) -> np.ndarray:
    """1-based ranks, ties sharing the average of their positions (e.g. [1, 2.5, 2.5, 4])."""
    xa = np.asarray(x, dtype=np.float64)
    order = np.argsort(xa, kind="mergesort")
    sorted_x = xa[order]
    ranks = np.empty(len(xa), dtype=np.float64)
    i = 0
    while i < len(xa):
        j = i
        while j + 1 < len(xa) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Values, y: Values) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    return pearson(rankdata(x), rankdata(y))


CORRELATIONS: dict[str, Callable[[Values, Values], float]] = {
    "pearson": pearson,
    "spearman": spearman,
}


@dataclass(frozen=True)
class Corr:
    """A coefficient, its bootstrap interval and the number of points (and of mixtures)."""

    r: float
    lo: float = math.nan
    hi: float = math.nan
    n: int = 0
    mixtures: int = 0

    def fmt(self, ci: bool = True) -> str:
        if math.isnan(self.r):
            return "-"
        if ci and not math.isnan(self.lo):
            return f"{self.r:.3f} [{self.lo:.2f}, {self.hi:.2f}]"
        return f"{self.r:.3f}"


def bootstrap_ci(
    x: Values,
    y: Values,
    method: str = "pearson",
    *,
    clusters: Sequence | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Corr:
    """The coefficient with a percentile bootstrap interval.

    Points are resampled by cluster (default: each point its own cluster); pass the
    mixture of each point when one mixture contributes several points (pooled rows),
    so its points stay together. Resamples giving an undefined coefficient (constant
    input) are dropped; the interval is NaN when fewer than half remain.
    """
    fn = CORRELATIONS[method]
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keys = np.arange(len(xa)) if clusters is None else np.asarray(clusters)
    uniq, inverse = np.unique(keys, return_inverse=True)
    r = fn(xa, ya)
    if math.isnan(r) or len(uniq) < 3 or n_boot <= 0:
        return Corr(r, n=len(xa), mixtures=len(uniq))
    members = [np.flatnonzero(inverse == c) for c in range(len(uniq))]
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = np.concatenate([members[c] for c in rng.integers(0, len(uniq), len(uniq))])
        v = fn(xa[idx], ya[idx])
        if not math.isnan(v):
            stats.append(v)
    if len(stats) < n_boot / 2:
        return Corr(r, n=len(xa), mixtures=len(uniq))
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [a, 1.0 - a])
    return Corr(r, float(lo), float(hi), len(xa), len(uniq))


# ----------------------------------------------------------------------------- table


@dataclass
class ResultTable:
    """``values[proxy][domain][mixture_id] = perplexity``, derived rows included."""

    values: dict[str, dict[str, dict[str, float]]]
    mixtures: dict[str, Mixture]
    domains: list[str]  # individual evaluation domains
    proxies: list[str]  # proxies present (seq excluded)
    domain_units: dict[str, list[str]] = field(default_factory=dict)

    @property
    def all_domains(self) -> list[str]:
        """Individual domains, then ``ID`` when any mixture has it."""
        has_id = any(ID_DOMAIN in by_d for by_d in self.values.values())
        return self.domains + ([ID_DOMAIN] if has_id else [])

    def get(self, proxy: str, domain: str) -> dict[str, float]:
        return self.values.get(proxy, {}).get(domain, {})

    @property
    def seq_mixtures(self) -> list[str]:
        ids = {m for by_m in self.values.get(SEQ, {}).values() for m in by_m}
        return [m for m in self.mixtures if m in ids]

    def paired(self, proxy: str, domain: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Mixtures having both a seq and a ``proxy`` value on ``domain``, and the values."""
        p, s = self.get(proxy, domain), self.get(SEQ, domain)
        ids = [m for m in self.mixtures if m in p and m in s]
        return ids, np.array([p[m] for m in ids]), np.array([s[m] for m in ids])


def _put(values: dict, proxy: str, domain: str, mixture_id: str, v: float | None) -> None:
    if v is not None and math.isfinite(v):
        values.setdefault(proxy, {}).setdefault(domain, {})[mixture_id] = float(v)


def build_table(store, proxies: Iterable[str] | None = None) -> ResultTable:
    """Everything a report shows, from a :class:`~.store.ResultStore` alone.

    Uses the store's ``study`` meta (written by the runner from
    :meth:`~.spec.Study.to_meta`) for the held-out domain -> units map and the proxies;
    without it, ``ID`` and ``ind_id`` are left out.
    """
    meta = store.get_meta("study", {}) or {}
    domain_units: dict[str, list[str]] = meta.get("domain_units", {})
    wanted = list(proxies if proxies is not None else meta.get("proxies", mx.PROXIES))
    mixtures = store.mixtures()

    raw: dict[tuple[str, str], dict[str, Score]] = {}  # (mixture, proxy) -> domain -> score
    domains: list[str] = list(meta.get("eval_sets", {}))
    for r in store.results():
        raw.setdefault((r.subject, r.proxy), {})[r.domain] = r.score
        if r.domain not in domains:
            domains.append(r.domain)
    ind: dict[str, dict[str, Score]] = {}
    for r in store.unit_results():
        ind.setdefault(r.subject, {})[r.domain] = r.score
        if r.domain not in domains:
            domains.append(r.domain)

    values: dict[str, dict[str, dict[str, float]]] = {}
    for (mid, proxy), by_domain in raw.items():
        for d, s in by_domain.items():
            _put(values, proxy, d, mid, s.perplexity)
        m = mixtures.get(mid)
        own = mx.in_domain_sets(m, domain_units) if m is not None else []
        if own and all(d in by_domain for d in own):
            _put(values, proxy, ID_DOMAIN, mid, mx.pool(by_domain[d] for d in own).perplexity)

    for mid, m in mixtures.items():
        if not all(u in ind for u in m.units):
            continue
        ppl = {u: {d: s.perplexity for d, s in ind[u].items()} for u in m.units}
        own = mx.in_domain_sets(m, domain_units)
        if own and all(d in ind[u] for u in m.units for d in own):
            for u in m.units:
                ppl[u][ID_DOMAIN] = mx.pool(ind[u][d] for d in own).perplexity
        for d in domains + [ID_DOMAIN]:
            if "mean_ind" in wanted and all(d in ppl[u] for u in m.units):
                _put(values, "mean_ind", d, mid, mx.mean_ind(m, d, ppl))
            if "ind_id" in wanted:
                # KeyError: a unit's own held-out set was not evaluated
                with contextlib.suppress(KeyError):
                    _put(values, "ind_id", d, mid, mx.ind_id(m, d, ppl, domain_units))
    present = [p for p in wanted if p in values]
    return ResultTable(values, mixtures, domains, present, domain_units)


# ----------------------------------------------------------------------------- correlations


@dataclass
class CorrelationTable:
    """``cells[row][proxy]``; rows = domains, ``ID``, ``mean``, ``pooled``."""

    method: str
    rows: list[str]
    proxies: list[str]
    cells: dict[str, dict[str, Corr]]


def correlate(
    table: ResultTable,
    proxy: str,
    domain: str,
    method: str = "pearson",
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> Corr:
    """Proxy vs seq across the mixtures with both, on one domain."""
    _, p, s = table.paired(proxy, domain)
    return bootstrap_ci(p, s, method, n_boot=n_boot, seed=seed)


def pooled_correlation(
    table: ResultTable,
    proxy: str,
    method: str = "pearson",
    *,
    domains: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> Corr:
    """One coefficient over every (mixture, domain) point of the individual domains.

    Bootstrap resamples mixtures, keeping each mixture's points together.
    """
    xs, ys, groups = [], [], []
    for d in domains if domains is not None else table.domains:
        ids, p, s = table.paired(proxy, d)
        xs += list(p)
        ys += list(s)
        groups += ids
    return bootstrap_ci(xs, ys, method, clusters=groups, n_boot=n_boot, seed=seed)


def correlation_table(
    table: ResultTable,
    method: str = "pearson",
    *,
    proxies: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> CorrelationTable:
    proxies = list(proxies if proxies is not None else table.proxies)
    rows = table.all_domains + [MEAN_ROW, POOLED_ROW]
    cells: dict[str, dict[str, Corr]] = {r: {} for r in rows}
    for proxy in proxies:
        per_domain = []
        for d in table.all_domains:
            c = correlate(table, proxy, d, method, n_boot=n_boot, seed=seed)
            cells[d][proxy] = c
            if d != ID_DOMAIN and not math.isnan(c.r):
                per_domain.append(c.r)
        cells[MEAN_ROW][proxy] = Corr(
            float(np.mean(per_domain)) if per_domain else math.nan, n=len(per_domain)
        )
        cells[POOLED_ROW][proxy] = pooled_correlation(
            table, proxy, method, n_boot=n_boot, seed=seed
        )
    return CorrelationTable(method, rows, proxies, cells)


# ----------------------------------------------------------------------------- rankings


def rank_mixtures(table: ResultTable, proxy: str, domain: str) -> list[tuple[str, float]]:
    """All mixtures scored by ``proxy`` on ``domain``, best (lowest perplexity) first."""
    vals = table.get(proxy, domain)
    return sorted(vals.items(), key=lambda kv: (kv[1], kv[0]))


def recommend(
    table: ResultTable, proxy: str, domains: Sequence[str] | None = None
) -> tuple[str, float] | None:
    """The mixture with the lowest proxy perplexity (over several domains: geometric mean).

    The geometric mean (mean log-perplexity) keeps high-perplexity domains from
    dominating. Only mixtures scored on every chosen domain compete; None if none is.
    """
    domains = list(domains if domains is not None else table.domains)
    scored = []
    for mid in table.mixtures:
        vals = [table.get(proxy, d).get(mid) for d in domains]
        known = [v for v in vals if v is not None]
        if vals and len(known) == len(vals):
            scored.append((float(np.exp(np.mean(np.log(known)))), mid))
    if not scored:
        return None
    v, mid = min(scored)
    return mid, v


def top_k_agreement(table: ResultTable, proxy: str, domain: str, k: int) -> float:
    """|top-k by proxy ∩ top-k by seq| / k over the mixtures with both (NaN if fewer than k)."""
    ids, p, s = table.paired(proxy, domain)
    if len(ids) < k or k < 1 or np.all(p == p[0]):  # all tied: no ranking to compare
        return math.nan
    top_p = {ids[i] for i in np.argsort(p, kind="mergesort")[:k]}
    top_s = {ids[i] for i in np.argsort(s, kind="mergesort")[:k]}
    return len(top_p & top_s) / k


def best_true_rank(table: ResultTable, proxy: str, domain: str) -> int | None:
    """The seq rank (1 = best) of the mixture the proxy ranks first (paper §A.5)."""
    ids, p, s = table.paired(proxy, domain)
    if not ids or np.all(p == p[0]):
        return None
    best = int(np.argmin(p))
    return int(1 + np.sum(s < s[best]))  # ties with the best share its rank


# ----------------------------------------------------------------------------- influence


def partition_influence(table: ResultTable, proxy: str, domain: str) -> dict[str, float]:
    """Mean perplexity drop from adding each partition, over scored pairs (A, A + p).

    Positive: adding the partition helps on ``domain``. Leave-one-out and add-one
    studies provide such pairs by construction; k-subset studies do too.
    """
    vals = table.get(proxy, domain)
    by_names = {frozenset(table.mixtures[m].names): m for m in vals if m in table.mixtures}
    deltas: dict[str, list[float]] = {}
    for names, mid in by_names.items():
        for p in names:
            smaller = by_names.get(names - {p})
            if smaller is not None:
                deltas.setdefault(p, []).append(vals[smaller] - vals[mid])
    return {p: float(np.mean(v)) for p, v in sorted(deltas.items())}


# ----------------------------------------------------------------------------- cost


def cost_rows(cost: mx.Cost) -> list[tuple[str, str]]:
    """(item, value) rows of the cost table."""
    return [
        ("unit models trained", f"{cost.units_trained}"),
        ("tokens per unit model", f"{cost.unit_tokens:,}"),
        ("unit-model training tokens (modular)", f"{cost.modular_tokens:,}"),
        ("mixtures scored", f"{cost.mixtures}"),
        ("seq models trained for validation", f"{cost.seq_models}"),
        ("seq validation tokens", f"{cost.seq_validation_tokens:,}"),
        ("a seq model for every scored mixture (naive)", f"{cost.naive_tokens:,}"),
        ("naive / modular", f"{cost.savings:.1f}x"),
    ]
