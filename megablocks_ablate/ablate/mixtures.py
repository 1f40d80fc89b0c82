"""Mixtures of partitions, the proxies that score them, and what they cost.

A **mixture** is a set of partitions; a partition is a group of base units (the
paper's §2.2: partitions of interest ``P_i``, split into equal-size base units
``B_j``). Every merged proxy is ONE weight vector over the mixture's unit models:

=========  =============================================================  ==========
proxy      definition                                                     needs
=========  =============================================================  ==========
macro      unit u of partition g gets ``(1/G)(1/|g|)``: average within    a merge
           each partition, then across the G partitions (§5.2)
micro      every unit ``1/n``: uniform over all the mixture's units       a merge
merged     uniform over the mixture's component models. With the study's  a merge
           ``partition_models: true`` the components are partition-level
           models, each trained on all its partition's units for |g|x
           the unit budget: the paper's §5.2 "merged". Without, the pool
           holds unit models only, the components are the units and
           ``merged == micro``. Either way ``merged == macro == micro``
           when every partition is one unit (the paper's §5.1).
mean_ind   mean of the components' own perplexities (no merge): each      unit evals
           partition's model (its partition-level model when trained,
           else the mean of its unit models' perplexities), averaged over
           the partitions
ind_id     in-domain only (the paper's "ind ID"): on the held-out set     unit evals
           of a training partition P of the mixture, the perplexity of
           the component trained on P (mean over P's units); on the
           mixture's own combined held-out set (:data:`ID_DOMAIN`), the
           mean over components of each one's perplexity on its own
           held-out set. Undefined (None) on every other domain: the
           paper leaves it blank ("-") out of domain.
=========  =============================================================  ==========

A **proportion mixture** (beyond the paper; docs/proportions.md) also gives each
partition a share ``p_g`` (summing to 1): every merged proxy then gives unit u of
partition g the weight ``p_g / |g|`` (the partition weights on top of the macro weights
inside each partition; ``merged`` with partition-level models gives model g ``p_g``), its
seq model trains on that same blend for the budget of the equal-share mixture of those
partitions, and ``mean_ind`` / ``ind_id`` weight the partitions by ``p_g``. Equal shares
are the equal-share mixture itself (same id), and a zero share drops the partition.

The mixture's **in-domain** evaluation (the paper's "ID" rows) is the union of the
held-out sets of its partitions; its perplexity is pooled from the per-domain results
by summing NLL and tokens (:func:`pool`), so no extra evaluation pass is needed.

Cost (§2.1.1): each unit model is trained once on ``unit_tokens``; a seq model for a
mixture of n units trains on ``n * unit_tokens`` (:func:`seq_tokens`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from megablocks_ablate.data.mixture import partition_balanced_weights

MERGE_PROXIES = ("merged", "macro", "micro")
IND_PROXIES = ("mean_ind", "ind_id")
PROXIES = MERGE_PROXIES + IND_PROXIES
SEQ = "seq"  # the proxy name under which seq (truly trained) models are stored
IND = "ind"  # single unit-model evaluations, the inputs of mean_ind and ind_id
# cross-scale studies (paper Table 4): the seq model trained at the unit models' scale,
# stored as a proxy of the target-scale seq model
IND_SEQ = "ind_seq"
ID_DOMAIN = "ID"  # the mixture's own combined held-out set (pooled)


# ----------------------------------------------------------------------------- mixtures


SHARE_DECIMALS = 6  # shares are stored rounded, so that ids are stable across runs


@dataclass(frozen=True)
class Mixture:
    """A set of partitions, each a tuple of unit names, optionally with a share per
    partition (a proportion mixture); immutable and hashable.

    Build with :meth:`of`, which sorts partitions and units (and rounds shares) so that
    the same mixture always has the same :attr:`id`, whatever order it was written in.
    """

    groups: tuple[tuple[str, tuple[str, ...]], ...]
    # (partition, share) in the order of ``groups``; empty: every partition an equal share
    shares: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(
        cls, partitions: Mapping[str, Sequence[str]], shares: Mapping[str, float] | None = None
    ) -> Mixture:
        if not partitions:
            raise ValueError("a mixture needs at least one partition")
        groups = []
        for name, units in partitions.items():
            if not units:
                raise ValueError(f"partition {name!r} of the mixture has no units")
            groups.append((str(name), tuple(sorted(units))))
        if shares is None:
            return cls(tuple(sorted(groups)))
        norm = normalise_shares(shares, [g for g, _ in groups])
        kept = tuple(sorted(g for g in groups if norm[g[0]] > 0))
        kept_shares = [norm[g] for g, _ in kept]
        if max(kept_shares) - min(kept_shares) <= 2 * 10**-SHARE_DECIMALS:
            return cls(kept)  # equal shares (up to rounding): the equal-share mixture
        return cls(kept, tuple((g, norm[g]) for g, _ in kept))

    @property
    def weighted(self) -> bool:
        """True for a proportion mixture (unequal shares)."""
        return bool(self.shares)

    @property
    def proportions(self) -> dict[str, float]:
        """Partition -> share (``1/k`` each for an equal-share mixture)."""
        if self.shares:
            return dict(self.shares)
        return {g: 1.0 / self.k for g, _ in self.groups}

    @property
    def partitions(self) -> dict[str, tuple[str, ...]]:
        return dict(self.groups)

    @property
    def names(self) -> tuple[str, ...]:
        """Partition names, sorted."""
        return tuple(g for g, _ in self.groups)

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(u for _, us in self.groups for u in us)

    @property
    def k(self) -> int:
        """Number of partitions (the paper's k)."""
        return len(self.groups)

    @property
    def label(self) -> str:
        if self.shares:
            return "+".join(f"{g}:{p:.2f}" for g, p in self.shares)
        return "+".join(self.names)

    @property
    def id(self) -> str:
        """Stable 16-hex id: a hash of the sorted partitions and their sorted units (and,
        for a proportion mixture, the rounded shares; equal-share ids are unchanged)."""
        if self.shares:
            share = dict(self.shares)
            items: list = [[g, list(us), share[g]] for g, us in self.groups]
        else:
            items = [[g, list(us)] for g, us in self.groups]
        canon = json.dumps(items, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        out: dict = {"partitions": {g: list(us) for g, us in self.groups}}
        if self.shares:
            out["shares"] = dict(self.shares)
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> Mixture:
        return cls.of(data["partitions"], data.get("shares"))


def normalise_shares(shares: Mapping[str, float], partitions: Sequence[str]) -> dict[str, float]:
    """Shares over exactly ``partitions``, scaled to sum 1 and rounded to
    :data:`SHARE_DECIMALS` (the rounding residue goes to the largest share)."""
    if set(shares) != set(partitions):
        extra, missing = set(shares) - set(partitions), set(partitions) - set(shares)
        raise ValueError(
            "mixture shares must name exactly its partitions"
            + (f"; unknown: {sorted(extra)}" if extra else "")
            + (f"; missing: {sorted(missing)}" if missing else "")
        )
    vals = {g: float(v) for g, v in shares.items()}
    bad = {g: v for g, v in vals.items() if not math.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"mixture shares must be finite and >= 0, got {bad}")
    if math.fsum(vals.values()) <= 0:
        raise ValueError("mixture shares are all zero")
    return round_blend({g: vals[g] for g in sorted(vals)})


def round_blend(blend: Mapping[str, float], decimals: int = SHARE_DECIMALS) -> dict[str, float]:
    """Clip, renormalise and round ``blend``; the largest entry absorbs the residual.

    Rounding is what makes blends comparable (cache keys, reports), so the result sums
    to exactly 1 at ``decimals`` precision and keeps zero entries (a zero is a choice).
    """
    if not blend:
        raise ValueError("empty blend")
    bad = {k: v for k, v in blend.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"non-finite proportions in blend: {bad}")
    clipped = {k: max(float(v), 0.0) for k, v in blend.items()}
    total = sum(clipped.values())
    if total <= 0.0:
        raise ValueError(f"blend has no positive proportion: {dict(blend)}")
    out = {k: round(v / total, decimals) for k, v in clipped.items()}
    largest = max(out, key=lambda k: out[k])  # first of ties, in key order
    residual = 1.0 - sum(out.values())
    out[largest] = round(out[largest] + residual, decimals)
    return out


def weighted_mixture(
    shares: Mapping[str, float], partitions: Mapping[str, Sequence[str]]
) -> Mixture:
    """The proportion mixture of ``{partition: share}`` (units looked up in ``partitions``)."""
    return Mixture.of({p: partitions[p] for p in shares}, shares)


def dirichlet_shares(
    names: Sequence[str], n: int, alpha: float, seed: int, k: int | None = None
) -> list[dict[str, float]]:
    """``n`` seeded proportion vectors: a flat-or-peaked Dirichlet(``alpha``) over all
    partitions, or over a k-subset drawn uniformly per vector when ``k`` is given."""
    if n < 1:
        raise ValueError(f"dirichlet mixtures: n must be >= 1, got {n}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"dirichlet mixtures: alpha must be > 0, got {alpha}")
    if k is not None:
        _check_k(names, k)
        if k < 2:
            raise ValueError("dirichlet mixtures: k must be >= 2 (one partition has no blend)")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        members = list(names) if k is None else sorted(rng.choice(list(names), k, replace=False))
        p = rng.dirichlet([alpha] * len(members))
        out.append({str(g): float(v) for g, v in zip(members, p)})
    return out


def make_mixtures(
    names_list: Iterable[Sequence[str]], partitions: Mapping[str, Sequence[str]]
) -> list[Mixture]:
    """Mixtures from lists of partition names (looked up in ``partitions``)."""
    return [Mixture.of({p: partitions[p] for p in names}) for names in names_list]


def k_subsets(names: Sequence[str], k: int) -> list[tuple[str, ...]]:
    """Every k-subset of the partitions, in lexicographic order of ``names``."""
    _check_k(names, k)
    return list(itertools.combinations(names, k))


def random_subsets(names: Sequence[str], k: int, n: int, seed: int) -> list[tuple[str, ...]]:
    """``n`` distinct k-subsets drawn uniformly without replacement (all if fewer exist).

    Deterministic for (names, k, n, seed). Small spaces are enumerated and sampled by
    index; large ones (e.g. 5-subsets of 128) by rejection of repeated draws.
    """
    _check_k(names, k)
    if n < 1:
        raise ValueError(f"random mixtures: n must be >= 1, got {n}")
    total = math.comb(len(names), k)
    rng = np.random.default_rng(seed)
    if total <= 200_000:
        combos = list(itertools.combinations(names, k))
        if n >= total:
            return combos
        pick = np.sort(rng.choice(total, size=n, replace=False))
        return [combos[i] for i in pick]
    seen: dict[tuple[int, ...], None] = {}
    while len(seen) < n:
        seen.setdefault(tuple(sorted(int(i) for i in rng.choice(len(names), k, replace=False))))
    return [tuple(names[i] for i in c) for c in seen]


def leave_one_out(base: Sequence[str]) -> list[tuple[str, ...]]:
    """The base mixture and each mixture missing one of its partitions."""
    base = tuple(base)
    if len(base) < 2:
        raise ValueError("leave_one_out needs a base mixture of at least 2 partitions")
    return [base] + [tuple(p for p in base if p != drop) for drop in base]


def add_one(base: Sequence[str], names: Sequence[str]) -> list[tuple[str, ...]]:
    """The base mixture and the base plus each partition not in it."""
    base = tuple(base)
    extra = [p for p in names if p not in base]
    if not extra:
        raise ValueError("add_one: the base mixture already holds every partition")
    return [base] + [base + (p,) for p in extra]


def _check_k(names: Sequence[str], k: int) -> None:
    if not 1 <= k <= len(names):
        raise ValueError(f"k={k} must be between 1 and the number of partitions ({len(names)})")


# ----------------------------------------------------------------------------- weights


def proxy_weights(
    mixture: Mixture, proxy: str, partition_models: Mapping[str, str] | None = None
) -> dict[str, float]:
    """The weight vector (model -> weight, summing to 1) of a merged proxy.

    With ``partition_models`` (partition name -> the model trained on all its units, see
    :func:`partition_model_name`), ``merged`` is the paper's §5.2 "merged": the uniform
    average of the mixture's partition-level models. Without, the pool holds unit
    models only and ``merged`` is ``micro``.
    """
    if proxy == "merged" and partition_models:
        missing = [g for g in mixture.names if g not in partition_models]
        if missing:
            raise ValueError(f"no partition-level model for partition(s) {missing}")
        share = mixture.proportions
        return {partition_models[g]: share[g] for g in mixture.names}
    if mixture.weighted and proxy in MERGE_PROXIES:
        # the shares replace the between-partition averaging; units inside a partition
        # stay equal (macro), so merged (unit pool), macro and micro are one vector
        share = mixture.proportions
        return {u: share[g] / len(us) for g, us in mixture.groups for u in us}
    if proxy == "macro":
        return partition_balanced_weights(mixture.partitions)
    if proxy in ("micro", "merged"):
        units = mixture.units
        return {u: 1.0 / len(units) for u in units}
    if proxy in IND_PROXIES:
        raise ValueError(
            f"proxy {proxy!r} is not a merge: it averages unit-model perplexities "
            "(see mean_ind / ind_id)"
        )
    raise ValueError(f"unknown proxy {proxy!r} (known: {', '.join(PROXIES)})")


PARTITION_MODEL_PREFIX = "partition:"


def partition_model_name(partition: str, units: Sequence[str]) -> str:
    """The pool/store name of a partition's own model: its unit's name when the partition
    is one unit (that model IS the partition model: same data, same budget), else
    ``partition:<name>`` (trained on all its units for ``len(units)`` x the unit budget)."""
    return units[0] if len(units) == 1 else PARTITION_MODEL_PREFIX + partition


def weights_key(weights: Mapping[str, float]) -> str:
    """A canonical string for a weight vector (to evaluate identical merges once)."""
    return json.dumps({u: round(w, 12) for u, w in sorted(weights.items())}, separators=(",", ":"))


def merge_plan(
    mixture: Mixture, proxies: Iterable[str], partition_models: Mapping[str, str] | None = None
) -> list[tuple[dict[str, float], list[str]]]:
    """Distinct merges a mixture needs: ``[(weights, [proxies sharing them]), ...]``.

    Without partition-level models ``merged`` and ``micro`` are the same vector, and all
    three are when every partition is one unit (a one-unit partition's model is its
    unit model), so a runner evaluates one live model for all of them.
    """
    plan: dict[str, tuple[dict[str, float], list[str]]] = {}
    for proxy in proxies:
        if proxy not in MERGE_PROXIES:
            continue
        w = proxy_weights(mixture, proxy, partition_models)
        plan.setdefault(weights_key(w), (w, []))[1].append(proxy)
    return list(plan.values())


# ----------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class Score:
    """One evaluation: summed NLL (nats) over ``tokens`` predicted tokens of ``bytes`` bytes."""

    nll_sum: float
    tokens: int
    bytes: int = 0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / self.bytes if self.bytes else math.nan


def pool(scores: Iterable[Score]) -> Score:
    """The score of the union of the evaluated sets: NLL, tokens and bytes summed."""
    scores = list(scores)
    return Score(
        math.fsum(s.nll_sum for s in scores),
        sum(s.tokens for s in scores),
        sum(s.bytes for s in scores),
    )


def in_domain_sets(mixture: Mixture, domain_units: Mapping[str, Sequence[str]]) -> list[str]:
    """Evaluation domains that are held-out sets of the mixture's training data.

    ``domain_units`` maps a held-out domain to the units trained on its partition
    (from :class:`~megablocks_ablate.ablate.spec.Study`).
    """
    units = set(mixture.units)
    return sorted(d for d, us in domain_units.items() if set(us) & units)


def mean_ind(mixture: Mixture, domain: str, ind: Mapping[str, Mapping[str, float]]) -> float:
    """Mean over the mixture's partitions of their units' mean perplexity on ``domain``.

    ``ind[unit][domain]`` is the unit model's perplexity (``ID_DOMAIN`` included when
    the caller pooled it for this mixture). Missing evaluations raise KeyError.
    """
    share = mixture.proportions
    per_group = [np.mean([ind[u][domain] for u in us]) for _, us in mixture.groups]
    return float(np.average(per_group, weights=[share[g] for g in mixture.names]))


def ind_id(
    mixture: Mixture,
    domain: str,
    ind: Mapping[str, Mapping[str, float]],
    domain_units: Mapping[str, Sequence[str]],
) -> float | None:
    """The paper's "ind ID": in-domain perplexity of the components, else None.

    * ``domain`` is the held-out set of a partition the mixture trains on: the mean
      perplexity on it of the mixture's units trained on that partition;
    * ``domain == ID_DOMAIN``: mean over the mixture's partitions of each component's
      perplexity on its own held-out set(s) (``ind[u][d]`` for d in its in-domain sets);
    * any other domain: None (undefined out of domain).
    """
    units = set(mixture.units)
    if domain == ID_DOMAIN:
        per_group = []
        for _, us in mixture.groups:
            vals = [ind[u][d] for u in us for d, dus in domain_units.items() if u in dus]
            if not vals:
                return None
            per_group.append(np.mean(vals))
        share = mixture.proportions
        return float(np.average(per_group, weights=[share[g] for g in mixture.names]))
    trained = [u for u in domain_units.get(domain, ()) if u in units]
    if not trained:
        return None
    return float(np.mean([ind[u][domain] for u in trained]))


# ----------------------------------------------------------------------------- cost


def seq_tokens(mixture: Mixture, unit_tokens: int) -> int:
    """Token budget of the mixture's seq model: one unit budget per unit it holds."""
    return len(mixture.units) * int(unit_tokens)


@dataclass(frozen=True)
class Cost:
    """Training tokens of a study, modular (ours) vs one seq model per mixture (naive)."""

    units_trained: int
    unit_tokens: int
    mixtures: int
    seq_models: int
    seq_validation_tokens: int  # seq models actually trained to validate the proxies
    naive_tokens: int  # a seq model for every scored mixture
    partition_model_tokens: int = 0  # partition-level models (study partition_models)

    @property
    def modular_tokens(self) -> int:
        return self.units_trained * self.unit_tokens

    @property
    def total_tokens(self) -> int:
        return self.modular_tokens + self.partition_model_tokens + self.seq_validation_tokens

    @property
    def savings(self) -> float:
        """naive / modular: how many times cheaper scoring by merging is."""
        return self.naive_tokens / self.modular_tokens if self.modular_tokens else math.inf

    def to_dict(self) -> dict:
        return {
            "units_trained": self.units_trained,
            "unit_tokens": self.unit_tokens,
            "modular_tokens": self.modular_tokens,
            "mixtures": self.mixtures,
            "seq_models": self.seq_models,
            "seq_validation_tokens": self.seq_validation_tokens,
            "naive_tokens": self.naive_tokens,
            "partition_model_tokens": self.partition_model_tokens,
            "total_tokens": self.total_tokens,
            "savings": self.savings,
        }


def study_cost(
    mixtures: Sequence[Mixture],
    validation: Sequence[Mixture],
    unit_tokens: int,
    partition_units: Iterable[int] = (),
    seq_budget: int | None = None,
) -> Cost:
    """Cost of scoring ``mixtures`` by merging (every unit used trained once), plus one
    model per entry of ``partition_units`` (a partition-level model's unit count)."""
    units = {u for m in mixtures for u in m.units}
    return Cost(
        partition_model_tokens=sum(int(n) for n in partition_units) * int(unit_tokens),
        units_trained=len(units),
        unit_tokens=int(unit_tokens),
        mixtures=len(mixtures),
        seq_models=len(validation),
        seq_validation_tokens=sum(seq_budget or seq_tokens(m, unit_tokens) for m in validation),
        naive_tokens=sum(seq_tokens(m, unit_tokens) for m in mixtures),
    )
