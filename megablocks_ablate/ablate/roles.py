"""In-domain vs out-of-domain: the report's correlation layout (the paper's Tables 2-4).

A mixture's point on an evaluation domain d is **in-domain (ID)** when the mixture
trains on d's partition (``domain_units[d]`` meets the mixture's units), else
**out-of-domain (OOD)**; extra sets (the paper's Paloma) are OOD for every mixture
(:meth:`~.analysis.ResultTable.role`). The two regimes lie on different lines: a seq
model trained on a partition beats a 1/k-weighted merge on that partition's own
held-out set far more than it does elsewhere, so one coefficient over both regimes
mixes two relationships and reads lower than either. The paper keeps them apart
(Table 2: "ID" vs "Paloma" rows; Tables 3-4: P1, P2, P1+P2, then the Paloma domains),
and so does :func:`role_table`. Its rows, per method:

==================  ===============================================================
``P1`` .. ``Pk``    each mixture's i-th partition's held-out set(s); partitions in
                    the study's order, a partition shared by every seq mixture (a
                    fixed partition, §5.3.1 / A.5) first (:func:`~.analysis.ordered_groups`)
``ID (P1+P2)``      each mixture's own held-out sets pooled (plain ``ID`` when the
                    seq mixtures differ in k)
one per domain      the domain over the mixtures for which it is OOD (``-`` if none)
``OOD mean``        mean of those per-domain coefficients
``OOD pooled``      one coefficient over every OOD (mixture, domain) point
``ID pooled``       one coefficient over every ID (mixture, domain) point of the
                    individual domains
``all-domain mean`` the role-blind figures (secondary): the mean of the per-domain
``all-domain        coefficients over all mixtures, and one coefficient over every
pooled``            (mixture, domain) point
==================  ===============================================================

Columns are the proxies in the paper's order (:data:`PROXY_ORDER`). A
:class:`RoleTable` also keeps every per-domain coefficient for each role
(``per_domain``) and the per-role figures (``figures``) that the headline and
summary.json use. :func:`headline_proxy` picks the headline proxy;
:func:`rank_summary` gives the §A.5 median and max "true rank".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate.analysis import ROLE_ID, ROLE_OOD, Corr, ResultTable
from megablocks_ablate.ablate.bootstrap import mean_interval
from megablocks_ablate.ablate.mixtures import ID_DOMAIN

ROLE_ALL = "all"  # every mixture, whatever the domain's role
ROLES = (ROLE_OOD, ROLE_ID, ROLE_ALL)
OOD_MEAN_ROW = "OOD mean"
OOD_POOLED_ROW = "OOD pooled"
ID_POOLED_ROW = "ID pooled"
ALL_MEAN_ROW = "all-domain mean"
ALL_POOLED_ROW = "all-domain pooled"
# the paper's column order (Tables 2-4): ind ID, mean ind, merged, macro, micro, ind seq
PROXY_ORDER = ("ind_id", "mean_ind", "merged", "macro", "micro", "ind_seq")


def ordered_proxies(proxies: Sequence[str]) -> list[str]:
    """``proxies`` in :data:`PROXY_ORDER`; any other proxy after, in its given order."""
    return [p for p in PROXY_ORDER if p in proxies] + [p for p in proxies if p not in PROXY_ORDER]


@dataclass(frozen=True)
class Row:
    """One row of the report's correlation table."""

    key: str  # the ``row`` of correlations.csv: a domain, a P row, ``ID`` or a summary
    label: str  # the first column of report.md
    role: str  # ROLE_ID, ROLE_OOD or ROLE_ALL
    cells: dict[str, Corr]  # proxy -> coefficient


@dataclass
class RoleTable:
    """One method's role-separated correlations (rows: see the module docstring)."""

    method: str
    proxies: list[str]
    rows: list[Row]
    per_domain: dict[str, dict[str, dict[str, Corr]]]  # role -> domain -> proxy -> Corr
    # role -> figure -> proxy -> Corr; ood: mean, pooled; id: row, mean, pooled; all: mean, pooled
    figures: dict[str, dict[str, dict[str, Corr]]]
    id_label: str = ID_DOMAIN  # how the ID row is labelled, e.g. "ID (P1+P2)"

    def figure(self, proxy: str, role: str, name: str) -> Corr:
        """A per-role figure (NaN when undefined), e.g. ``figure("macro", "ood", "mean")``."""
        return self.figures.get(role, {}).get(name, {}).get(proxy, Corr(math.nan))

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)


def id_label(table: ResultTable) -> str:
    """``ID (P1+P2)`` when every seq mixture has the same k (and the P rows exist), else
    ``ID``; from k = 4 on, ``ID (P1+...+Pk)``."""
    ks = {table.mixtures[m].k for m in table.seq_mixtures}
    if len(ks) != 1:
        return ID_DOMAIN
    k = ks.pop()
    keys = table.id_rows[:k]
    if k < 1 or len(keys) < k:
        return ID_DOMAIN
    joined = "+".join(keys) if k <= 3 else f"{keys[0]}+...+{keys[-1]}"
    return f"{ID_DOMAIN} ({joined})"


def _mean(
    table: ResultTable,
    cells: dict[str, dict[str, Corr]],
    proxy: str,
    method: str,
    role: str,
    boot: tuple[int, int],
) -> Corr:
    """Mean of the defined per-domain coefficients (``n`` = how many were defined), with
    a bootstrap interval that resamples the mixtures all those domains share
    (:func:`~.bootstrap.mean_interval`)."""
    domains = [d for d, c in cells.items() if not math.isnan(c[proxy].r)]
    if not domains:
        return Corr(math.nan, per="domains")
    columns = [table.paired(proxy, d, _role(role)) for d in domains]
    lo, hi = mean_interval(columns, method, n_boot=boot[0], seed=boot[1])
    mixtures = len({m for ids, _, _ in columns for m in ids})
    r = float(np.mean([cells[d][proxy].r for d in domains]))
    return Corr(r, lo, hi, n=len(domains), mixtures=mixtures, per="domains")


def _role(role: str) -> str | None:
    """The ``role=`` filter of :mod:`.analysis` for one of :data:`ROLES`."""
    return None if role == ROLE_ALL else role


def _figures(
    table: ResultTable,
    method: str,
    proxies: list[str],
    per_domain: dict,
    id_row: dict,
    boot: tuple[int, int],  # (n_boot, seed)
) -> dict[str, dict[str, dict[str, Corr]]]:
    def mean(role: str, p: str) -> Corr:
        return _mean(table, per_domain[role], p, method, role, boot)

    def pooled(role: str) -> dict[str, Corr]:
        return {
            p: an.pooled_correlation(
                table, p, method, role=_role(role), n_boot=boot[0], seed=boot[1]
            )
            for p in proxies
        }

    return {
        ROLE_OOD: {
            "mean": {p: mean(ROLE_OOD, p) for p in proxies},
            "pooled": pooled(ROLE_OOD),
        },
        ROLE_ID: {
            "row": {p: id_row.get(p, Corr(math.nan)) for p in proxies},
            "mean": {p: mean(ROLE_ID, p) for p in proxies},
            "pooled": pooled(ROLE_ID),
        },
        ROLE_ALL: {
            "mean": {p: mean(ROLE_ALL, p) for p in proxies},
            "pooled": pooled(ROLE_ALL),
        },
    }


def role_table(
    table: ResultTable,
    method: str = "pearson",
    *,
    proxies: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> RoleTable:
    """The role-separated correlation table of one method (``pearson`` / ``spearman``)."""
    proxies = ordered_proxies(list(proxies if proxies is not None else table.proxies))
    per_domain = {
        role: {
            d: {
                p: an.correlate(table, p, d, method, role=_role(role), n_boot=n_boot, seed=seed)
                for p in proxies
            }
            for d in table.domains
        }
        for role in ROLES
    }
    id_keys = table.id_rows + ([ID_DOMAIN] if ID_DOMAIN in table.all_domains else [])
    id_cells = {
        k: {p: an.correlate(table, p, k, method, n_boot=n_boot, seed=seed) for p in proxies}
        for k in id_keys
    }
    id_row = id_cells.get(ID_DOMAIN, {})
    figures = _figures(table, method, proxies, per_domain, id_row, (n_boot, seed))
    label = id_label(table)
    rows = [Row(k, label if k == ID_DOMAIN else k, ROLE_ID, id_cells[k]) for k in id_keys]
    rows += [Row(d, d, ROLE_OOD, per_domain[ROLE_OOD][d]) for d in table.domains]
    rows += [
        Row(OOD_MEAN_ROW, OOD_MEAN_ROW, ROLE_OOD, figures[ROLE_OOD]["mean"]),
        Row(OOD_POOLED_ROW, OOD_POOLED_ROW, ROLE_OOD, figures[ROLE_OOD]["pooled"]),
        Row(ID_POOLED_ROW, ID_POOLED_ROW, ROLE_ID, figures[ROLE_ID]["pooled"]),
        Row(ALL_MEAN_ROW, ALL_MEAN_ROW, ROLE_ALL, figures[ROLE_ALL]["mean"]),
        Row(ALL_POOLED_ROW, ALL_POOLED_ROW, ROLE_ALL, figures[ROLE_ALL]["pooled"]),
    ]
    return RoleTable(method, proxies, rows, per_domain, figures, label)


# ----------------------------------------------------------------------------- headline


def headline_proxy(table: ResultTable) -> tuple[str | None, str]:
    """The headline (and recommendation) proxy and, in one clause, why.

    ``fisher`` when the study scored it: a user asks for it (it is opt-in), and it is
    the Fisher-weighted refinement of the macro merge, measured closer to seq than the
    plain merge on both built-in corpora (docs/fidelity.md). Else ``macro`` when a
    partition of any scored mixture holds more than one unit: it gives every partition
    an equal share, as the seq models train (the paper's upsampling), and is the paper's
    proxy for partitions of uneven size (§5.2). Otherwise ``merged``: with one unit per
    partition merged, macro and micro are one merge.
    """
    if "fisher" in table.proxies:
        return "fisher", (
            "the study asked for the Fisher-weighted merge (beyond the paper: each "
            "parameter merged in proportion to the unit models' own Fisher); the paper's "
            "merge is in the rows below"
        )
    uneven = any(len(us) > 1 for m in table.mixtures.values() for _, us in m.groups)
    if uneven and "macro" in table.proxies:
        return "macro", (
            "a partition holds more than one unit, and macro, averaging within each "
            "partition and then across partitions, gives each partition an equal share "
            "as the seq models train: the paper's proxy for uneven partitions, §5.2"
        )
    if "merged" in table.proxies:
        if uneven:
            return "merged", "macro was not scored, so merged (uniform over the units)"
        return "merged", (
            "every partition is one unit, so merged, macro and micro are the same merge"
        )
    for p in ("macro", "micro", "mean_ind", "ind_id", "ind_seq"):
        if p in table.proxies:
            return p, f"no merged or macro scores, so the first proxy present ({p})"
    return None, ""


# ----------------------------------------------------------------------------- true rank


@dataclass(frozen=True)
class RankSummary:
    """Median and max of the seq rank of the proxy's first choice over ``n`` rows."""

    median: float
    max: int | None
    n: int

    def fmt(self) -> str:
        if self.n == 0:
            return "-"
        return f"median {self.median:g}, max {self.max} ({self.n})"


def rank_summary(table: ResultTable, proxy: str, role: str) -> RankSummary:
    """§A.5's "median true rank": :func:`~.analysis.best_true_rank` over the OOD domains
    (each over the mixtures for which it is OOD) or over the ID rows (the P rows and
    ``ID``); rows without a ranking (too few mixtures, all tied) are skipped."""
    if role == ROLE_OOD:
        ranks = [an.best_true_rank(table, proxy, d, ROLE_OOD) for d in table.domains]
    else:
        keys = table.id_rows + ([ID_DOMAIN] if ID_DOMAIN in table.all_domains else [])
        ranks = [an.best_true_rank(table, proxy, k) for k in keys]
    known = [r for r in ranks if r is not None]
    if not known:
        return RankSummary(math.nan, None, 0)
    return RankSummary(float(np.median(known)), max(known), len(known))
