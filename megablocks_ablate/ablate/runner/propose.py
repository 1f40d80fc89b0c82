"""Propose: mixtures chosen by a search, each scored lazily through the one scorer.

A proposer asks for the score of a mixture; one already in the store is read, any
other is merged in memory and evaluated by :meth:`.Scorer.score_mixture` (so its rows
and provenance are those ``study run`` would write). Beam search over partitions is
one proposer; :func:`optimize_blend` (``study optimize``) is the other, proposing
proportion vectors by a pattern search on the simplex (:mod:`..blend_search`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from megablocks_ablate.ablate import blend_search as bs
from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.mixtures import Mixture
from megablocks_ablate.ablate.runner.plan import RunPlan
from megablocks_ablate.ablate.runner.scoring import Scorer
from megablocks_ablate.ablate.search import SearchResult, beam_search
from megablocks_ablate.ablate.store import ResultStore
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.progress import progress

logger = logging.getLogger(__name__)

MERGED_PROXIES = ("merged", "macro", "micro")


def check_search(
    scorer: Scorer, plan: RunPlan, proxy: str, domains: Sequence[str] | None
) -> list[str]:
    """Validate the search request; returns the objective's domains."""
    if proxy not in MERGED_PROXIES:
        raise ConfigError(
            f"--proxy: search needs a merged proxy ({', '.join(MERGED_PROXIES)}), got {proxy!r}"
        )
    domains = list(domains or scorer.domains)
    unknown = [d for d in domains if d not in scorer.domains]
    if unknown:
        raise ConfigError(
            f"--domains: unknown evaluation domain {unknown[0]!r} "
            f"(known: {', '.join(scorer.domains)})"
        )
    jobs = {j.name: j for j in plan.units}
    missing = [u for u in scorer.study.units if u not in jobs or not jobs[u].entry.complete]
    if missing:
        raise ConfigError(
            f"unit model of {missing[0]!r} is not trained: search merges "
            "the models of every partition (run `study run` first, with "
            "mixtures covering every partition)"
        )
    if proxy == "merged" and scorer.study.spec.partition_models:
        lacking = [g for g in scorer.study.partitions if g not in scorer.study.partition_models]
        if lacking:
            raise ConfigError(
                f"proxy merged: partition {lacking[0]!r} has no partition-level model (no "
                "mixture of the study uses it); search by macro, or add mixtures using it"
            )
    return domains


def search_mixtures(
    scorer: Scorer,
    store_file: str,
    plan: RunPlan,
    k: int,
    proxy: str = "macro",
    domains: Sequence[str] | None = None,
    beam_width: int = 4,
) -> tuple[SearchResult, int]:
    """Beam search for the best ``k``-mixture of the study's partitions by ``proxy``
    (geometric-mean perplexity over ``domains``). Returns the result and the number of
    mixtures merged and evaluated now (the rest came from the store)."""
    domains = check_search(scorer, plan, proxy, domains)
    study = scorer.study
    members = set(study.units) | set(study.partition_models.values())
    scorer.open_pool([j for j in plan.pool_jobs if j.name in members])
    merged: list[str] = []

    def objective(names: tuple[str, ...]) -> float:
        m = Mixture.of({p: study.partitions[p] for p in names})
        with ResultStore(store_file) as store:
            if not store.done(m.id, proxy, domains):
                merged.append(m.id)
                store.add_mixtures([m])
                ((w, ps),) = mx.merge_plan(m, [proxy], study.partition_models)
                scorer.score_mixture(store, m, w, ps)
            ppl = {d: sc.perplexity for d, sc in store.scores(m.id, proxy).items()}
        logger.info("[search] %s: %s", m.label, ", ".join(f"{d} {ppl[d]:.2f}" for d in domains))
        return math.exp(sum(math.log(ppl[d]) for d in domains) / len(domains))

    result = beam_search(list(study.partitions), k, objective, beam_width=beam_width)
    return result, len(merged)


# --------------------------------------------------------------------------- blends


@dataclass(frozen=True)
class BlendObjective:
    """What ``study optimize`` minimises over the scored domains of a blend's merge:
    ``geomean`` (geometric-mean perplexity over ``domains``) or ``weighted`` (the
    ``domain_weights``-weighted mean of per-token losses, nats)."""

    kind: str = "geomean"
    domains: tuple[str, ...] = ()
    domain_weights: tuple[tuple[str, float], ...] = ()

    def __call__(self, ppl: Mapping[str, float]) -> float:
        if self.kind == "geomean":
            return bs.geometric_mean_objective(ppl, list(self.domains))
        loss = {d: math.log(v) for d, v in ppl.items()}
        return bs.weighted_loss_objective(loss, dict(self.domain_weights))

    def describe(self) -> str:
        if self.kind == "geomean":
            return f"geometric-mean perplexity over {', '.join(self.domains)}"
        return "weighted loss " + " + ".join(f"{w:g}*{d}" for d, w in self.domain_weights)


@dataclass
class OptimizeResult:
    """The chosen blend (the best point scored), the search path, the regression fitted
    on the scored points and its own optimum (scored too), and the merge count."""

    best: bs.BlendPoint
    search: bs.SearchResult
    regression: bs.BlendRegression | None
    regression_point: bs.BlendPoint | None
    merged_now: int
    mixture: Mixture

    def to_dict(self) -> dict:
        return {
            "best": {
                "blend": self.best.blend,
                "objective": self.best.objective,
                "kind": self.best.kind,
                "mixture_id": self.mixture.id,
                "label": self.mixture.label,
            },
            "search": self.search.to_dict(),
            "regression": self.regression.to_dict() if self.regression else None,
            "regression_point": (
                {"blend": self.regression_point.blend, "objective": self.regression_point.objective}
                if self.regression_point
                else None
            ),
            "merged_now": self.merged_now,
        }


def check_blend_request(
    scorer: Scorer, plan: RunPlan, over: Sequence[str] | None, objective: BlendObjective
) -> list[str]:
    """Validate ``study optimize``'s request; returns the partitions searched over."""
    study = scorer.study
    names = list(over or study.partitions)
    unknown = [p for p in names if p not in study.partitions]
    if unknown:
        raise ConfigError(
            f"--over: unknown partition {unknown[0]!r} (study partitions: "
            f"{', '.join(study.partitions)})"
        )
    if len(set(names)) < 2:
        raise ConfigError("--over: a blend needs at least 2 distinct partitions")
    domains = list(objective.domains) + [d for d, _ in objective.domain_weights]
    bad = [d for d in domains if d not in scorer.domains]
    if bad:
        raise ConfigError(
            f"--domains: unknown evaluation domain {bad[0]!r} (known: {', '.join(scorer.domains)})"
        )
    jobs = {j.name: j for j in plan.units}
    missing = [
        u for p in names for u in study.partitions[p] if u not in jobs or not jobs[u].entry.complete
    ]
    if missing:
        raise ConfigError(
            f"unit model of {missing[0]!r} is not trained: optimize merges the unit models "
            "of every partition it blends (run `study run` first, with mixtures covering "
            "those partitions)"
        )
    return names


def optimize_blend(
    scorer: Scorer,
    store_file: str,
    plan: RunPlan,
    objective: BlendObjective,
    over: Sequence[str] | None = None,
    proxy: str = "macro",
    budget: int = 40,
    step: float = 0.2,
    min_share: float = 0.0,
    regression: bool = True,
    show_progress: bool = True,
) -> OptimizeResult:
    """Search the simplex over ``over`` (default: every partition) for the blend whose
    weighted merge minimises ``objective``; every point is a proportion mixture scored
    into the store (or read from it). Then fit the RegMix-style regression on the
    scored points, score its optimum too, and return the best point scored."""
    if proxy not in MERGED_PROXIES:
        raise ConfigError(f"--proxy: optimize needs a merged proxy, got {proxy!r}")
    names = check_blend_request(scorer, plan, over, objective)
    study = scorer.study
    members = {u for p in names for u in study.partitions[p]}
    if proxy == "merged" and study.spec.partition_models:
        members |= {study.partition_models[p] for p in names if p in study.partition_models}
    scorer.open_pool([j for j in plan.pool_jobs if j.name in members])
    merged: list[str] = []

    def score(blend: Mapping[str, float]) -> float:
        m = Mixture.of({p: study.partitions[p] for p in blend}, blend)
        with ResultStore(store_file) as store:
            if not store.done(m.id, proxy, scorer.domains):
                merged.append(m.id)
                store.add_mixtures([m])
                for w, ps in study.merge_plan(m):
                    if proxy in ps:
                        scorer.score_mixture(store, m, w, ps)
            ppl = {d: sc.perplexity for d, sc in store.scores(m.id, proxy).items()}
        value = objective(ppl)
        logger.info("[optimize] %s: %.4f", m.label, value)
        return value

    with progress(
        total=budget, desc="optimize", unit="blend", disable=None if show_progress else True
    ) as bar:
        search = bs.SimplexSearch(
            names,
            score,
            budget=budget,
            step=step,
            min_share=min_share,
            on_point=lambda pt: bar.update(1),
        ).run()
    points = list(search.path)
    fit, reg_point = None, None
    if regression and len(points) >= 2:
        fit = bs.fit_regression(points, names)
        blend = fit.optimum(min_share=min_share)
        reg_point = bs.BlendPoint(bs.round_blend(blend), score(blend), len(points), "regression")
        points.append(reg_point)
    best = min(points, key=lambda p: p.objective)
    mixture = Mixture.of({p: study.partitions[p] for p in best.blend}, best.blend)
    return OptimizeResult(best, search, fit, reg_point, len(merged), mixture)
