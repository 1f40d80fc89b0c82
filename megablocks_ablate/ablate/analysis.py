"""Analysis of a study's results: how well proxies predict seq models, and what to pick.

* statistics: :func:`pearson`, :func:`spearman` (ties get average ranks) and seeded
  percentile :func:`bootstrap_ci` over mixtures (the units of observation);
* :func:`build_table` turns a results store into ``proxy -> domain -> mixture ->
  perplexity``, deriving ``mean_ind`` and ``ind_id`` from unit-model (or, with meta
  ``partition_models``, partition-model) results, each mixture's in-domain row ``ID``
  (its own held-out sets, pooled; :mod:`.mixtures`) and the paper's P rows (``P1``:
  its first partition's held-out set, ...; :func:`ordered_groups`);
* roles: :meth:`ResultTable.role` says whether a (mixture, domain) point is in-domain
  (the mixture trains on the domain's partition) or out-of-domain; ``role=`` on
  :meth:`ResultTable.paired`, :func:`correlate`, :func:`pooled_correlation`,
  :func:`top_k_agreement` and :func:`best_true_rank` restricts to one of them. The
  report's role-separated layout is :func:`.roles.role_table`;
* :func:`correlation_table`: the role-blind table: rows are evaluation domains, ``ID``,
  ``mean`` (mean of the per-domain coefficients) and ``pooled`` (one coefficient over
  every (mixture, domain) point of the individual domains); columns are proxies; each
  cell correlates a proxy with seq perplexity across the mixtures with a seq model;
* :func:`rank_mixtures`, :func:`recommend`: every scored mixture ranked by a proxy, and
  the recommended one (lowest perplexity; over several domains, lowest geometric mean);
* :func:`top_k_agreement`, :func:`best_true_rank`: do proxy and seq agree at the top?
* :func:`partition_influence`: the effect of adding a partition, from every pair of
  scored mixtures differing by one partition (leave-one-out and add-one studies).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.bootstrap import (
    CONSTANT_RTOL,
    MIN_POINTS,
    resample_counts,
    weighted_corr,
)
from megablocks_ablate.ablate.mixtures import ID_DOMAIN, IND_PROXIES, SEQ, Mixture, Score

# 1-D numbers: a list or a NumPy array (the statistics convert with np.asarray)
Values = Sequence[float] | np.ndarray

MEAN_ROW = "mean"
POOLED_ROW = "pooled"


# ----------------------------------------------------------------------------- statistics


def is_constant(a: np.ndarray) -> bool:
    """Whether ``a`` is constant up to :data:`CONSTANT_RTOL` of its magnitude."""
    if not len(a):
        return True
    spread = float(a.max() - a.min())
    return spread <= CONSTANT_RTOL * max(float(np.abs(a).max()), np.finfo(np.float64).tiny)


def pearson(x: Values, y: Values) -> float:
    """Pearson's r; NaN with fewer than 2 points or a constant input (up to float
    jitter, :func:`is_constant`)."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(
            f"pearson: expected two 1-D arrays of one length, got {xa.shape}, {ya.shape}"
        )
    if len(xa) < 2 or is_constant(xa) or is_constant(ya):
        return math.nan
    dx, dy = xa - xa.mean(), ya - ya.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0.0:
        return math.nan
    return float(np.clip((dx @ dy) / denom, -1.0, 1.0))


def rankdata(x: Values) -> np.ndarray:
    """1-based ranks, ties sharing the average of their positions (e.g. [1, 2.5, 2.5, 4])."""
    xa = np.asarray(x, dtype=np.float64)
    # vectorised (the bootstrap calls this thousands of times): a run of c equal values
    # starting at 0-based position i gets rank i + (c + 1) / 2
    _, inverse, counts = np.unique(xa, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts) + (counts + 1) / 2.0)[inverse.reshape(-1)].astype(np.float64)


def spearman(x: Values, y: Values) -> float:
    """Spearman's rho: Pearson's r of the average ranks (NaN for a constant input, as
    :func:`pearson`: ranks of float jitter are not a ranking)."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.ndim == 1 and xa.shape == ya.shape and (is_constant(xa) or is_constant(ya)):
        return math.nan
    return pearson(rankdata(xa), rankdata(ya))


CORRELATIONS: dict[str, Callable[[Values, Values], float]] = {
    "pearson": pearson,
    "spearman": spearman,
}


@dataclass(frozen=True)
class Corr:
    """A coefficient, its bootstrap interval and the number of points (and of mixtures).

    ``per`` names what ``n`` counts when it is not (mixture, domain) points, e.g.
    ``"domains"`` for a mean of per-domain coefficients.
    """

    r: float
    lo: float = math.nan
    hi: float = math.nan
    n: int = 0
    mixtures: int = 0
    per: str = ""

    @property
    def n_label(self) -> str:
        return f"n={self.n}" + (f" {self.per}" if self.per else "")

    def fmt(self, ci: bool = True, n: bool = True) -> str:
        """``0.953 [0.91, 0.98] n=21``; "–" (with its n) where undefined or from fewer
        than :data:`MIN_POINTS` points."""
        tail = f" {self.n_label}" if n else ""
        if math.isnan(self.r):
            return "–" + (tail if n and self.n else "")
        if ci and not math.isnan(self.lo):
            return f"{self.r:.3f} [{self.lo:.2f}, {self.hi:.2f}]{tail}"
        return f"{self.r:.3f}{tail}"


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
    input) are dropped; the interval is NaN when fewer than half remain. Fewer than
    :data:`MIN_POINTS` points give no coefficient (NaN, with ``n``).
    """
    fn = CORRELATIONS[method]
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keys = np.arange(len(xa)) if clusters is None else np.asarray(clusters)
    uniq, inverse = np.unique(keys, return_inverse=True)
    r = fn(xa, ya) if len(xa) >= MIN_POINTS else math.nan
    if math.isnan(r) or len(uniq) < 3 or n_boot <= 0:
        return Corr(r, n=len(xa), mixtures=len(uniq))
    # every resample at once: a resample is a vector of draw counts over the clusters,
    # each point weighted by its cluster's count (ablate/bootstrap.py)
    counts = resample_counts(len(uniq), n_boot, seed)[:, inverse.reshape(-1)]
    stats = weighted_corr(method, xa, ya, counts)
    stats = stats[~np.isnan(stats)]
    if len(stats) < n_boot / 2:
        return Corr(r, n=len(xa), mixtures=len(uniq))
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [a, 1.0 - a])
    return Corr(r, float(lo), float(hi), len(xa), len(uniq))


# ----------------------------------------------------------------------------- table

ROLE_ID = "id"  # in-domain: the mixture trains on the domain's partition
ROLE_OOD = "ood"  # out-of-domain: it does not (extra sets are OOD for every mixture)


@dataclass
class ResultTable:
    """``values[proxy][domain][mixture_id] = perplexity``, derived rows included.

    Besides the individual ``domains`` and ``ID``, ``values`` holds the paper's P rows
    under the keys :attr:`id_rows` (``P1``, ``P2``, ...): row ``Pi`` is, for each
    mixture, the held-out set(s) of its i-th partition, partitions ordered by
    :func:`ordered_groups` (fixed partitions first, then the study's order).
    """

    values: dict[str, dict[str, dict[str, float]]]
    mixtures: dict[str, Mixture]
    domains: list[str]  # individual evaluation domains
    proxies: list[str]  # proxies present (seq excluded)
    domain_units: dict[str, list[str]] = field(default_factory=dict)
    id_rows: list[str] = field(default_factory=list)  # keys of the P1..Pk rows, in order
    partition_order: list[str] = field(default_factory=list)  # the study's order
    fixed: list[str] = field(default_factory=list)  # partitions in every seq mixture

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

    def role(self, mixture_id: str, domain: str) -> str:
        """:data:`ROLE_ID` when the mixture trains on ``domain``'s partition, else
        :data:`ROLE_OOD`. ``ID`` and the P rows are in-domain by construction."""
        if domain == ID_DOMAIN or domain in self.id_rows:
            return ROLE_ID
        m = self.mixtures.get(mixture_id)
        trained = self.domain_units.get(domain, ())
        if m is not None and set(trained) & set(m.units):
            return ROLE_ID
        return ROLE_OOD

    def paired(
        self, proxy: str, domain: str, role: str | None = None
    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Mixtures having both a seq and a ``proxy`` value on ``domain`` (with ``role``:
        only those for which ``domain`` has that role), and the values."""
        p, s = self.get(proxy, domain), self.get(SEQ, domain)
        ids = [
            m
            for m in self.mixtures
            if m in p and m in s and (role is None or self.role(m, domain) == role)
        ]
        return ids, np.array([p[m] for m in ids]), np.array([s[m] for m in ids])


def _put(values: dict, proxy: str, domain: str, mixture_id: str, v: float | None) -> None:
    if v is not None and math.isfinite(v):
        values.setdefault(proxy, {}).setdefault(domain, {})[mixture_id] = float(v)


# ----------------------------------------------------------------------------- P rows


def partition_order(meta: Mapping, mixtures: Iterable[Mixture]) -> list[str]:
    """The study's partition order (meta ``partitions``, as the spec lists them), then
    any other partition of the mixtures, sorted (all sorted without that meta)."""
    order = list(meta.get("partitions") or {})
    return order + sorted({g for m in mixtures for g in m.names} - set(order))


def fixed_partitions(mixtures: Sequence[Mixture]) -> list[str]:
    """Partitions every given mixture holds (a fixed partition: §5.3.1, A.5), sorted."""
    if not mixtures:
        return []
    common = set(mixtures[0].names)
    for m in mixtures[1:]:
        common &= set(m.names)
    return sorted(common)


def ordered_groups(
    mixture: Mixture, order: Sequence[str], fixed: Iterable[str] = ()
) -> list[tuple[str, tuple[str, ...]]]:
    """The mixture's partitions in P1..Pk order: fixed partitions first (the paper puts
    the partition shared by every mixture first), then the study's partition order."""
    index = {g: i for i, g in enumerate(order)}
    fixed = set(fixed)
    return sorted(
        mixture.groups, key=lambda g: (g[0] not in fixed, index.get(g[0], len(index)), g[0])
    )


def id_row_keys(k: int, domains: Sequence[str]) -> list[str]:
    """``P1..Pk``; ``Pi (ID)`` where an evaluation domain is itself named ``Pi``."""
    return [f"P{i}" if f"P{i}" not in domains else f"P{i} (ID)" for i in range(1, k + 1)]


def held_out_sets(units: Iterable[str], domain_units: Mapping[str, Sequence[str]]) -> list[str]:
    """The held-out domains of the partitions these units belong to."""
    units = set(units)
    return sorted(d for d, us in domain_units.items() if set(us) & units)


# row key -> (the partition it is the held-out set of, or None for ID; domains pooled)
IdPlan = dict[str, tuple[str | None, tuple[str, ...]]]


def _id_plan(
    m: Mixture, keys: Sequence[str], order: Sequence[str], fixed: Sequence[str], du: Mapping
) -> IdPlan:
    """The in-domain rows of one mixture: ``ID`` (all its held-out sets) and P1..Pk."""
    plan: IdPlan = {ID_DOMAIN: (None, tuple(mx.in_domain_sets(m, du)))}
    for key, (g, units) in zip(keys, ordered_groups(m, order, fixed)):
        plan[key] = (g, tuple(held_out_sets(units, du)))
    return plan


# ----------------------------------------------------------------------------- build


def component_view(
    mixture: Mixture,
    partition_models: Mapping[str, str],
    domain_units: Mapping[str, Sequence[str]],
) -> tuple[Mixture, dict[str, list[str]]]:
    """The mixture as its ind components, and ``domain_units`` to match.

    A partition with a partition-level model (meta ``partition_models``: trained on all
    its units for |g|x the unit budget, the paper's component model) is that one
    subject; any other partition is its unit models. :func:`~.mixtures.mean_ind` and
    :func:`~.mixtures.ind_id` applied to the view are then the paper's definitions.
    """
    groups, sub = [], {}
    for g, units in mixture.groups:
        subject = partition_models.get(g)
        if subject is None:
            groups.append((g, units))
        else:
            groups.append((g, (subject,)))
            sub.update({u: subject for u in units})
    du = {d: list(dict.fromkeys(sub.get(u, u) for u in us)) for d, us in domain_units.items()}
    return Mixture(tuple(groups), mixture.shares), du  # a blend keeps its shares


def _ind_value(
    proxy: str, view: Mixture, row: str, ppl: dict, du: Mapping, plan: IdPlan
) -> float | None:
    """``mean_ind`` or ``ind_id`` of one mixture on one row (None: undefined / missing)."""
    if proxy == "mean_ind":
        if not all(row in ppl[s] for s in view.units):
            return None
        return mx.mean_ind(view, row, ppl)
    if row in plan and plan[row][0] is not None:  # Pi: the component trained on it
        subjects = view.partitions[plan[row][0]]  # type: ignore[index]
        vals = [ppl[s].get(row) for s in subjects]
        return float(np.mean(vals)) if all(v is not None for v in vals) else None
    try:
        return mx.ind_id(view, row, ppl, du)
    except KeyError:  # a component's own held-out set was not evaluated
        return None


@dataclass(frozen=True)
class _IndContext:
    """What deriving ``mean_ind`` / ``ind_id`` needs besides the scores."""

    wanted: list[str]  # of IND_PROXIES, the ones to derive
    domains: list[str]
    domain_units: Mapping[str, Sequence[str]]
    partition_models: Mapping[str, str]
    plans: dict[str, IdPlan]  # mixture id -> its in-domain rows


def _put_ind(values: dict, mixtures: Mapping, ind: Mapping, ctx: _IndContext) -> None:
    """``mean_ind`` and ``ind_id`` of every mixture whose components were all evaluated
    (a partition whose partition model has no results yet leaves the mixture out,
    rather than silently falling back to its unit models)."""
    for mid, m in mixtures.items():
        view, du = component_view(m, ctx.partition_models, ctx.domain_units)
        if not ctx.wanted or not all(s in ind for s in view.units):
            continue
        plan = ctx.plans[mid]
        ppl = {s: {d: sc.perplexity for d, sc in ind[s].items()} for s in view.units}
        for key, (_, sets) in plan.items():  # pooled in-domain rows, per component
            for s in view.units:
                if sets and all(d in ind[s] for d in sets):
                    ppl[s][key] = mx.pool(ind[s][d] for d in sets).perplexity
        for row in ctx.domains + list(plan):
            for proxy in ctx.wanted:
                _put(values, proxy, row, mid, _ind_value(proxy, view, row, ppl, du, plan))


def _read_scores(store, domains: list[str]) -> tuple[dict, dict]:
    """(mixture, proxy) -> domain -> Score, and subject -> domain -> Score of unit (and
    partition) models; domains first seen in the rows are appended to ``domains``."""
    raw: dict[tuple[str, str], dict[str, Score]] = {}
    ind: dict[str, dict[str, Score]] = {}
    for r in store.results():
        raw.setdefault((r.subject, r.proxy), {})[r.domain] = r.score
        if r.domain not in domains:
            domains.append(r.domain)
    for r in store.unit_results():
        ind.setdefault(r.subject, {})[r.domain] = r.score
        if r.domain not in domains:
            domains.append(r.domain)
    return raw, ind


def build_table(store, proxies: Iterable[str] | None = None) -> ResultTable:
    """Everything a report shows, from a :class:`~.store.ResultStore` alone.

    Uses the store's ``study`` meta (written by the runner from
    :meth:`~.spec.Study.to_meta`) for the held-out domain -> units map, the partition
    order, the proxies and, when present, ``partition_models`` (partition -> subject of
    a partition-level model in the unit results; ``mean_ind`` and ``ind_id`` then use
    it for that partition instead of its unit models' mean). Without the meta, ``ID``,
    the P rows and ``ind_id`` are left out and partitions are ordered by name.
    """
    meta = store.get_meta("study", {}) or {}
    domain_units: dict[str, list[str]] = meta.get("domain_units", {})
    wanted = list(proxies if proxies is not None else meta.get("proxies", mx.PROXIES))
    mixtures = store.mixtures()
    domains: list[str] = list(meta.get("eval_sets", {}))
    raw, ind = _read_scores(store, domains)

    seq_ids = {mid for mid, proxy in raw if proxy == SEQ}
    order = partition_order(meta, mixtures.values())
    fixed = fixed_partitions(
        [m for i, m in mixtures.items() if i in seq_ids] or list(mixtures.values())
    )
    k_max = max((m.k for m in mixtures.values()), default=0)
    keys = id_row_keys(k_max, domains) if domain_units else []
    plans = {i: _id_plan(m, keys, order, fixed, domain_units) for i, m in mixtures.items()}

    values: dict[str, dict[str, dict[str, float]]] = {}
    for (mid, proxy), by_domain in raw.items():
        for d, s in by_domain.items():
            _put(values, proxy, d, mid, s.perplexity)
        for key, (_, sets) in plans.get(mid, {}).items():  # ID and P rows: pooled
            if sets and all(d in by_domain for d in sets):
                _put(values, proxy, key, mid, mx.pool(by_domain[d] for d in sets).perplexity)
    ctx = _IndContext(
        wanted=[p for p in IND_PROXIES if p in wanted],
        domains=domains,
        domain_units=domain_units,
        partition_models=meta.get("partition_models") or {},
        plans=plans,
    )
    _put_ind(values, mixtures, ind, ctx)
    present = [p for p in wanted if p in values]
    if proxies is None:  # e.g. ind_seq: a cross-scale study's proxy-scale seq model
        present += [p for p in values if p not in present and p not in (SEQ, mx.IND)]
    rows = [k for k in keys if any(k in by_d for by_d in values.values())]
    return ResultTable(values, mixtures, domains, present, domain_units, rows, order, fixed)


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
    role: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> Corr:
    """Proxy vs seq across the mixtures with both, on one domain (with ``role``: only
    the mixtures for which the domain is in-domain / out-of-domain)."""
    _, p, s = table.paired(proxy, domain, role)
    return bootstrap_ci(p, s, method, n_boot=n_boot, seed=seed)


def pooled_correlation(
    table: ResultTable,
    proxy: str,
    method: str = "pearson",
    *,
    domains: Sequence[str] | None = None,
    role: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> Corr:
    """One coefficient over every (mixture, domain) point of the individual domains
    (with ``role``: only the points where the domain has that role for the mixture).

    Bootstrap resamples mixtures, keeping each mixture's points together.
    """
    xs, ys, groups = [], [], []
    for d in domains if domains is not None else table.domains:
        ids, p, s = table.paired(proxy, d, role)
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
            float(np.mean(per_domain)) if per_domain else math.nan,
            n=len(per_domain),
            per="domains",
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


def top_k_agreement(
    table: ResultTable, proxy: str, domain: str, k: int, role: str | None = None
) -> float:
    """|top-k by proxy ∩ top-k by seq| / k over the mixtures with both (NaN if fewer than
    k); with ``role``, over the mixtures for which ``domain`` has that role."""
    ids, p, s = table.paired(proxy, domain, role)
    if len(ids) < k or k < 1 or np.all(p == p[0]):  # all tied: no ranking to compare
        return math.nan
    top_p = {ids[i] for i in np.argsort(p, kind="mergesort")[:k]}
    top_s = {ids[i] for i in np.argsort(s, kind="mergesort")[:k]}
    return len(top_p & top_s) / k


def best_true_rank(
    table: ResultTable, proxy: str, domain: str, role: str | None = None
) -> int | None:
    """The seq rank (1 = best) of the mixture the proxy ranks first (paper §A.5); with
    ``role``, among the mixtures for which ``domain`` has that role."""
    ids, p, s = table.paired(proxy, domain, role)
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
