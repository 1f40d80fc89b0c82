"""The scaled merge (beyond the paper): the seed moved by a multiple of the merge.

A seq model trains on the union of its units for the sum of their budgets, so it moves
further from the seed than the average of its unit models does. The ``scaled`` proxy
is ``seed + lambda * (merged - seed)`` = ``(1 - lambda) * seed + lambda * merged``: one
more pool row (the seed) and a weight vector that is the mixture's merge weights
times lambda plus ``1 - lambda`` on the seed (lambda = 1 is the plain merge).

lambda is **fitted on half of the study's validation mixtures** (a seeded split,
:func:`split_validation`) and the other half is kept for judging it: on the fit half,
every lambda of ``scaled.lambdas`` is scored and the one with the highest
out-of-domain per-domain mean Pearson against seq wins (the summary row when no domain
has enough points; ties go to the lambda nearest 1). Every mixture is then scored at
that lambda as proxy ``scaled``; each row's provenance records ``lambda`` and its
weights (the seed row included), and the store's meta ``scaled`` records the fit:
lambda, the grid with each lambda's fit figure, and the fit and held-out mixtures.
The report judges ``scaled`` against ``merged`` on the held-out mixtures only
(:mod:`..report_scaled`), so a user sees whether it predicts better before trusting it.
A rerun reuses the recorded fit when its fit mixtures and grid are the same; a refit
to another lambda replaces the ``scaled`` rows (the study wrote them, and rows at the
old lambda are no longer this proxy).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate import decisions as dc
from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.analysis import ROLE_OOD, SEQ
from megablocks_ablate.ablate.mixtures import Mixture
from megablocks_ablate.ablate.store import ResultStore
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.verify import verify_sha256

logger = logging.getLogger(__name__)

SCALED = "scaled"
SEED_ROW = "seed"  # the pool row holding the seed checkpoint
META_KEY = "scaled"


def split_validation(ids: Sequence[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """(fit, held-out): the validation mixtures ordered by a seeded hash of their id,
    the first half (rounded up) to fit lambda, the rest to judge it."""
    order = sorted(ids, key=lambda m: hashlib.sha256(f"{seed}:{m}".encode()).hexdigest())
    half = (len(order) + 1) // 2
    return sorted(order[:half]), sorted(order[half:])


def scaled_weights(weights: dict[str, float], lam: float) -> dict[str, float]:
    """``lambda`` x the merge weights, plus ``1 - lambda`` on the seed row."""
    if SEED_ROW in weights:
        raise ConfigError(f"a unit named {SEED_ROW!r} clashes with the scaled merge's seed row")
    out = {u: lam * w for u, w in weights.items()}
    out[SEED_ROW] = 1.0 - lam
    return out


def fit_figure(table: an.ResultTable, proxy: str) -> float:
    """What the fit maximises: the OOD per-domain mean Pearson of ``proxy`` vs seq
    (domains with at least MIN_POINTS mixtures), else the summary row's Pearson."""
    rs = []
    for d in table.domains:
        _, p, s = table.paired(proxy, d, ROLE_OOD)
        if len(p) >= an.MIN_POINTS:
            r = an.pearson(p, s)
            if not math.isnan(r):
                rs.append(r)
    if rs:
        return float(np.mean(rs))
    _, p, s = dc.summary_paired(table, proxy, dc.summary_domains(table))
    return an.pearson(p, s) if len(p) >= an.MIN_POINTS else math.nan


def choose_lambda(figures: dict[float, float]) -> float:
    """The lambda with the highest figure; ties (within 1e-9) to the one nearest 1.
    With no defined figure (too few fit mixtures per domain) the lambda nearest 1, with
    a warning: nothing was learned, so the grid's plainest merge."""
    defined = {lam: f for lam, f in figures.items() if not math.isnan(f)}
    if not defined:
        lam = min(figures, key=lambda x: abs(x - 1))
        logger.warning(
            "[scaled] no lambda gives a fit figure (fewer than %d fit mixtures per domain "
            "and on the summary row): lambda %g, the grid's nearest to the plain merge",
            an.MIN_POINTS,
            lam,
        )
        return lam
    best = max(defined.values())
    return min((lam for lam, f in defined.items() if f >= best - 1e-9), key=lambda x: abs(x - 1))


@dataclass(frozen=True)
class SeedRow:
    """The seed checkpoint as a pool row (what :meth:`Scorer.open_pool` reads of a job)."""

    name: str
    model_dir: str
    sha256: str

    @property
    def entry(self) -> SeedRow:
        return self

    def verified_sha256(self) -> str:
        return verify_sha256(
            os.path.join(self.model_dir, "model.safetensors"),
            self.sha256,
            "the seed the unit models were trained from",
            "the seed changed after its unit models were trained: retrain them",
        )


def _table_for(
    base: an.ResultTable, scores: dict[str, dict[str, float]], proxy: str
) -> an.ResultTable:
    """``base``'s seq values and ``scores`` (mixture -> domain -> perplexity) as ``proxy``."""
    values: dict[str, dict[str, dict[str, float]]] = {SEQ: base.values.get(SEQ, {}), proxy: {}}
    for mid, by_d in scores.items():
        for d, v in by_d.items():
            values[proxy].setdefault(d, {})[mid] = v
    return an.ResultTable(
        values, base.mixtures, base.domains, [proxy], base.domain_units, [], [], []
    )


def fit_and_score(
    scorer,
    store: ResultStore,
    plan,
    mixtures: Sequence[Mixture],
    lambdas: Sequence[float],
    split_seed: int = 0,
) -> dict:
    """Fit lambda on the fit half of the validation mixtures (unless the store already
    records a fit on the same mixtures), then score every mixture at it as proxy
    ``scaled``; returns the fit (what meta ``scaled`` holds)."""
    table = an.build_table(store)
    validated = [m for m in table.seq_mixtures if m in {x.id for x in mixtures}]
    fit_ids, held = split_validation(validated, split_seed)
    by_id = {m.id: m for m in mixtures}
    study = scorer.study
    _open_pool_with_seed(scorer, plan, study, mixtures)
    fit = store.get_meta(META_KEY) or {}
    if fit.get("fit") != fit_ids or sorted(fit.get("grid", {})) != sorted(map(str, lambdas)):
        grid: dict[float, float] = {}
        for lam in lambdas:
            scores = {}
            for mid in fit_ids:
                w = _merged_weights(study, by_id[mid])
                got = scorer.score_weights(by_id[mid], scaled_weights(w, lam), f"lambda {lam:g}")
                scores[mid] = {d: s.perplexity for d, s in got.items()}
            grid[lam] = fit_figure(_table_for(table, scores, SCALED), SCALED)
            logger.info(
                "[scaled] lambda %g: fit figure %.4f on %d mixtures", lam, grid[lam], len(fit_ids)
            )
        lam = choose_lambda(grid)
        if fit and fit.get("lambda") != lam:  # rows at the old lambda are not this proxy
            dropped = store.drop_proxy(SCALED)
            logger.info(
                "[scaled] lambda refitted %s -> %g: %d old rows replaced",
                fit["lambda"],
                lam,
                dropped,
            )
        fit = {
            "lambda": lam,
            "grid": {str(k): (None if math.isnan(v) else v) for k, v in grid.items()},
            "fit": fit_ids,
            "held_out": held,
            "split_seed": split_seed,
            "objective": "OOD per-domain mean Pearson vs seq on the fit mixtures",
        }
        store.set_meta(META_KEY, fit)
    lam = float(fit["lambda"])
    for m in mixtures:
        if store.done(m.id, SCALED, scorer.domains):
            continue
        w = scaled_weights(_merged_weights(study, m), lam)
        scorer.score_mixture(store, m, w, [SCALED], extra={"lambda": lam})
    logger.info(
        "[scaled] lambda %g (fitted on %d mixtures, %d held out)", lam, len(fit_ids), len(held)
    )
    return fit


def _merged_weights(study, mixture: Mixture) -> dict[str, float]:
    """The ``merged`` proxy's weight vector of ``mixture`` (its unit or partition models)."""
    return mx.proxy_weights(mixture, "merged", study.partition_models)


def _open_pool_with_seed(scorer, plan, study, mixtures: Sequence[Mixture]) -> None:
    """Open the scorer's pool on the mixtures' unit models plus the seed (row
    :data:`SEED_ROW`), the seed checked against the hash the unit models recorded."""
    from megablocks_ablate.checkpoint import read_checkpoint_meta

    needed = {u for m in mixtures for u in _merged_weights(study, m)}
    jobs = [j for j in plan.pool_jobs if j.name in needed]
    if not jobs:
        raise ConfigError("scaled: no trained unit model to merge")
    seed_hashes = {read_checkpoint_meta(j.entry.model_dir)[1].seed_hash for j in jobs}
    seed_hash = seed_hashes.pop() if len(seed_hashes) == 1 else None
    if seed_hash is None:
        raise ConfigError(
            "scaled: the unit models do not record one seed they continue "
            f"(seed hashes {sorted(map(str, seed_hashes))}); the scaled merge needs it"
        )
    seed = SeedRow(SEED_ROW, plan.seed_dir, seed_hash)
    scorer.open_pool([*jobs, seed])
