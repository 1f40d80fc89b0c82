"""The paper's summary row, and the decisions a user acts on, measured against seq.

**Summary row** (the paper's "Paloma" / "Avg" row, Tables 2-4): for each validation
mixture, its perplexity averaged across the *summary domains*, the evaluation domains
that are out of domain for every validation mixture (the paper's Paloma sets; a study
without such a domain has no summary row, and says so). One Pearson and one Spearman
over mixtures of proxy vs seq, for each of

=============  ==============================================================
``arith/raw``  arithmetic mean of the perplexities; the coefficient on it
               (the headline: the paper plots and averages perplexities)
``arith/log``  the same mean, coefficient on its logarithm
``geom/raw``   geometric mean (= exp of the mean log perplexity)
``geom/log``   its logarithm: the mean cross-entropy in nats
=============  ==============================================================

It is neither the per-domain mean of coefficients (stricter: every domain's noise
counts in full) nor the pooled coefficient over (mixture, domain) points (laxer: the
spread *between* domains dominates it).

**Decisions** (what :func:`decisions` returns per row: each OOD domain over the
mixtures for which it is out of domain, and the summary row): the proxy's pick (its
lowest-perplexity mixture), the pick's rank under seq (1 = seq's best too; the paper's
§A.5 "true rank"), how many of the proxy's top 3 are in seq's top 3, and the regret:
the seq perplexity of the pick over the best seq perplexity, minus 1 (0.004 = the
pick is 0.4% worse than what training every candidate would have found), and the
proxy's margin: the proxy perplexity of its second-best mixture over its pick's, minus
1, how decisively the proxy prefers its pick. A row needs
:data:`~.analysis.MIN_POINTS` mixtures.

A pick with a margin under :data:`CLOSE_CALL` (1%) is a *close call*: over 100
domain decisions of ten studies (two corpora x five data orders; docs/fidelity.md),
12 of the 13 picks of the ``fisher`` proxy that fell outside seq's top 2 had a margin
under 1%, against 1 of the 52 picks with a larger one. The report counts them; confirm
a close call with a seq model rather than trusting the proxy's order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate.analysis import MIN_POINTS, ROLE_OOD, SEQ, Corr, ResultTable

SUMMARY_ROW = "summary"
AVERAGES = ("arith", "geom")
SCALES = ("raw", "log")
VARIANTS = tuple(f"{a}/{s}" for a in AVERAGES for s in SCALES)
HEADLINE_VARIANT = "arith/raw"
TOP = 3  # top-k overlap of the decision figures
CLOSE_CALL = 0.01  # a pick this close to the proxy's runner-up is a close call (measured above)


def summary_domains(table: ResultTable) -> list[str]:
    """Evaluation domains out of domain for every validation (seq) mixture, in table
    order; empty without seq mixtures or when every domain is some mixture's own."""
    seq = table.seq_mixtures
    if not seq:
        return []
    return [
        d
        for d in table.domains
        if all(m in table.get(SEQ, d) and table.role(m, d) == ROLE_OOD for m in seq)
    ]


def summary_values(
    table: ResultTable, proxy: str, domains: Sequence[str], average: str = "arith"
) -> dict[str, float]:
    """Mixture id -> its ``proxy`` perplexity averaged over ``domains`` (``arith``:
    arithmetic mean; ``geom``: geometric), for the mixtures scored on all of them."""
    if average not in AVERAGES:
        raise ValueError(f"average: expected one of {AVERAGES}, got {average!r}")
    out: dict[str, float] = {}
    if not domains:
        return out
    for mid in table.mixtures:
        vals = [table.get(proxy, d).get(mid) for d in domains]
        if any(v is None for v in vals):
            continue
        a = np.asarray(vals, dtype=np.float64)
        out[mid] = float(a.mean() if average == "arith" else np.exp(np.log(a).mean()))
    return out


def summary_paired(
    table: ResultTable, proxy: str, domains: Sequence[str], average: str = "arith"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Mixtures with both a proxy and a seq summary value, and the two values."""
    p = summary_values(table, proxy, domains, average)
    s = summary_values(table, SEQ, domains, average)
    ids = [m for m in table.mixtures if m in p and m in s]
    return ids, np.array([p[m] for m in ids]), np.array([s[m] for m in ids])


@dataclass
class SummaryRow:
    """The summary row of every proxy: ``cells[variant][method][proxy]``."""

    domains: list[str]
    cells: dict[str, dict[str, dict[str, Corr]]]

    def get(self, proxy: str, method: str = "pearson", variant: str = HEADLINE_VARIANT) -> Corr:
        return self.cells.get(variant, {}).get(method, {}).get(proxy, Corr(math.nan))

    @property
    def missing_reason(self) -> str:
        """Why there is no summary row ("" when there is one)."""
        if self.domains:
            return ""
        return (
            "no summary row: no evaluation domain is out of domain for every validation "
            "mixture (add sets no partition trains on, e.g. eval.extra: [paloma/])"
        )


def summary_row(
    table: ResultTable, proxies: Sequence[str], *, n_boot: int = 1000, seed: int = 0
) -> SummaryRow:
    """Pearson and Spearman of each proxy vs seq on the summary row, every variant."""
    domains = summary_domains(table)
    cells: dict[str, dict[str, dict[str, Corr]]] = {}
    for variant in VARIANTS:
        average, scale = variant.split("/")
        by_method: dict[str, dict[str, Corr]] = {"pearson": {}, "spearman": {}}
        for p in proxies:
            _, x, y = summary_paired(table, p, domains, average)
            if scale == "log":
                x, y = np.log(x), np.log(y)
            for method in by_method:
                by_method[method][p] = an.bootstrap_ci(x, y, method, n_boot=n_boot, seed=seed)
        cells[variant] = by_method
    return SummaryRow(domains, cells)


# ----------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    """How good the proxy's pick is under seq, on one row."""

    row: str  # an evaluation domain, or SUMMARY_ROW
    n: int  # mixtures ranked (those with both a proxy and a seq value)
    pick: str  # mixture id of the proxy's lowest perplexity
    seq_best: str  # mixture id of seq's lowest perplexity
    seq_rank: int  # seq rank of the pick (1 = seq's best; ties share the better rank)
    top_overlap: int  # of the proxy's top TOP, how many are in seq's top TOP
    regret: float  # seq perplexity of the pick / best seq perplexity - 1
    margin: float  # proxy perplexity of its second-best / of its pick - 1

    @property
    def close_call(self) -> bool:
        """The proxy prefers its pick by less than :data:`CLOSE_CALL`."""
        return self.margin < CLOSE_CALL

    def to_json(self) -> dict:
        return dict(self.__dict__)


def decide(row: str, ids: Sequence[str], p: np.ndarray, s: np.ndarray) -> Decision | None:
    """The decision figures of one row (None with fewer than MIN_POINTS mixtures or a
    proxy that ties every mixture)."""
    if len(ids) < MIN_POINTS or an.is_constant(np.asarray(p, dtype=np.float64)):
        return None
    order_p = np.argsort(p, kind="mergesort")
    order_s = np.argsort(s, kind="mergesort")
    pick, best = int(order_p[0]), int(order_s[0])
    top = min(TOP, len(ids))
    overlap = len({ids[i] for i in order_p[:top]} & {ids[i] for i in order_s[:top]})
    return Decision(
        row=row,
        n=len(ids),
        pick=ids[pick],
        seq_best=ids[best],
        seq_rank=int(1 + np.sum(s < s[pick])),
        top_overlap=overlap,
        regret=float(s[pick] / s[best] - 1.0),
        margin=float(p[order_p[1]] / p[pick] - 1.0),
    )


@dataclass
class DecisionSummary:
    """One proxy's decisions: per OOD domain, on the summary row, and aggregated over
    the OOD domains."""

    proxy: str
    domains: list[Decision]  # each OOD domain over the mixtures for which it is OOD
    summary: Decision | None  # the summary row (None without one)

    @property
    def n(self) -> int:
        return len(self.domains)

    @property
    def share_top2(self) -> float:
        """Share of OOD domains whose pick is within seq's top 2."""
        return float(np.mean([d.seq_rank <= 2 for d in self.domains])) if self.domains else math.nan

    @property
    def mean_regret(self) -> float:
        return float(np.mean([d.regret for d in self.domains])) if self.domains else math.nan

    @property
    def max_regret(self) -> float:
        return float(max(d.regret for d in self.domains)) if self.domains else math.nan

    @property
    def mean_overlap(self) -> float:
        return float(np.mean([d.top_overlap for d in self.domains])) if self.domains else math.nan

    @property
    def close_calls(self) -> int:
        """OOD domains whose pick is a close call (:data:`CLOSE_CALL`)."""
        return sum(d.close_call for d in self.domains)

    @property
    def median_rank(self) -> float:
        return float(np.median([d.seq_rank for d in self.domains])) if self.domains else math.nan

    def to_json(self) -> dict:
        def num(v: float) -> float | None:
            return None if math.isnan(v) else v

        return {
            "ood_domains": {d.row: d.to_json() for d in self.domains},
            "summary_row": self.summary.to_json() if self.summary else None,
            "n_domains": self.n,
            "share_top2": num(self.share_top2),
            "median_rank": num(self.median_rank),
            "mean_top3_overlap": num(self.mean_overlap),
            "mean_regret": num(self.mean_regret),
            "max_regret": num(self.max_regret),
            "close_calls": self.close_calls,
            "close_call_margin": CLOSE_CALL,
        }

    def fmt(self) -> str:
        """One line: ``pick in seq's top 2 on 7/8 OOD domains, mean regret 0.42%, ...``."""
        if not self.domains:
            line = "no OOD domain with enough validation mixtures"
        else:
            top2 = sum(d.seq_rank <= 2 for d in self.domains)
            line = (
                f"pick in seq's top 2 on {top2}/{self.n} OOD domains, median seq rank "
                f"{self.median_rank:g}, mean top-{TOP} overlap {self.mean_overlap:.2f}/{TOP}, "
                f"mean regret {100 * self.mean_regret:.2f}% (max "
                f"{100 * self.max_regret:.2f}%), {self.close_calls} close call(s) (a pick "
                f"within {100 * CLOSE_CALL:g}% of the proxy's runner-up)"
            )
        if self.summary:
            s = self.summary
            line += (
                f"; summary row: seq rank {s.seq_rank}/{s.n}, top-{TOP} overlap "
                f"{s.top_overlap}/{TOP}, regret {100 * s.regret:.2f}%"
            )
        return line


def decisions(
    table: ResultTable, proxy: str, domains: Sequence[str] | None = None
) -> DecisionSummary:
    """:class:`DecisionSummary` of ``proxy`` (summary row over ``domains``, default
    :func:`summary_domains`)."""
    rows = []
    for d in table.domains:
        got = decide(d, *table.paired(proxy, d, ROLE_OOD))
        if got is not None:
            rows.append(got)
    sdoms = summary_domains(table) if domains is None else list(domains)
    summary = decide(SUMMARY_ROW, *summary_paired(table, proxy, sdoms)) if sdoms else None
    return DecisionSummary(proxy, rows, summary)


def runner_up(
    table: ResultTable, proxy: str, domains: Sequence[str], pick: str
) -> tuple[str, float] | None:
    """The mixture ``proxy`` ranks second by the recommendation's score (its
    geometric-mean perplexity over ``domains``, as :func:`~.analysis.recommend`) and the
    margin of ``pick`` over it: the runner-up's score over the pick's, minus 1 (under
    :data:`CLOSE_CALL`: a close call). None without a score for ``pick`` or a second
    mixture."""
    scores = summary_values(table, proxy, domains, "geom")
    others = sorted((v, m) for m, v in scores.items() if m != pick)
    if pick not in scores or not others:
        return None
    value, mixture = others[0]
    return mixture, value / scores[pick] - 1.0
