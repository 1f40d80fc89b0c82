"""Propose: mixtures chosen by a search, each scored lazily through the one scorer.

A proposer asks for the score of a mixture; one already in the store is read, any
other is merged in memory and evaluated by :meth:`.Scorer.score_mixture` (so its rows
and provenance are those ``study run`` would write). Beam search over partitions is
one proposer; :func:`optimize_blend` (``study optimize``) is the other, proposing
proportion vectors by a pattern search on the simplex (:mod:`..blend_search`).
"""

from __future__ import annotations

import json
import logging
import math
import os
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
OPTIMIZE_FORMAT = "megablocks-ablate/optimize-result/1"  # marks a `study optimize` result file


def check_domains(scorer: Scorer, domains: Sequence[str], flag: str = "--domains") -> None:
    """Every objective domain must be one of the study's evaluation domains."""
    unknown = [d for d in domains if d not in scorer.domains]
    if unknown:
        raise ConfigError(
            f"{flag}: unknown evaluation domain {unknown[0]!r} (known: {', '.join(scorer.domains)})"
        )


def check_pool(
    scorer: Scorer, plan: RunPlan, proxy: str, partitions: Sequence[str], what: str
) -> None:
    """The proxy is a merge and every model it merges over ``partitions`` is trained
    (``what``: the command, for the messages)."""
    study = scorer.study
    if proxy not in MERGED_PROXIES:
        raise ConfigError(
            f"--proxy: {what} needs a merged proxy ({', '.join(MERGED_PROXIES)}), got {proxy!r}"
        )
    jobs = {j.name: j for j in plan.units}
    units = [u for p in partitions for u in study.partitions[p]]
    missing = [u for u in units if u not in jobs or not jobs[u].entry.complete]
    if missing:
        raise ConfigError(
            f"unit model of {missing[0]!r} is not trained: {what} merges the unit models "
            "of every partition it uses (run `study run` first, with mixtures covering "
            "those partitions)"
        )
    if proxy == "merged" and study.spec.partition_models:
        lacking = [g for g in partitions if g not in study.partition_models]
        if lacking:
            raise ConfigError(
                f"proxy merged: partition {lacking[0]!r} has no partition-level model (no "
                f"mixture of the study uses it); {what} by macro, or add mixtures using it"
            )


def check_search(
    scorer: Scorer, plan: RunPlan, proxy: str, domains: Sequence[str] | None
) -> list[str]:
    """Validate the search request; returns the objective's domains."""
    domains = list(domains or scorer.domains)
    check_pool(scorer, plan, proxy, list(scorer.study.partitions), "search")
    check_domains(scorer, domains)
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
            "format": OPTIMIZE_FORMAT,
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


def check_result_file(path: str) -> None:
    """A ``study optimize`` result may replace only an earlier result (its ``format``
    field says so); any other existing file is the user's and is refused."""
    if not os.path.lexists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            ours = json.load(f).get("format") == OPTIMIZE_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours or not os.path.isfile(path) or os.path.islink(path):
        raise ConfigError(
            f"--out {path}: exists and is not a `study optimize` result; it is left as it "
            "is (choose another --out, or move it away)"
        )


def check_blend_request(
    scorer: Scorer,
    plan: RunPlan,
    over: Sequence[str] | None,
    objective: BlendObjective,
    proxy: str,
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
    check_pool(scorer, plan, proxy, names, "optimize")
    check_domains(scorer, objective.domains)
    check_domains(scorer, [d for d, _ in objective.domain_weights], "--domain-weights")
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
    names = check_blend_request(scorer, plan, over, objective, proxy)
    study = scorer.study
    members = {u for p in names for u in study.partitions[p]}
    members |= {study.partition_models[p] for p in names if p in study.partition_models}
    scorer.open_pool([j for j in plan.pool_jobs if j.name in members])
    merged: list[str] = []
    store = ResultStore(store_file)  # one connection for the whole search

    def score(blend: Mapping[str, float]) -> float:
        m = Mixture.of({p: study.partitions[p] for p in blend}, blend)
        if not store.done(m.id, proxy, scorer.domains):
            merged.append(m.id)
            store.add_mixtures([m])
            for w, ps in study.merge_plan(m):
                if proxy in ps:
                    scorer.score_mixture(store, m, w, ps)
        value = objective({d: sc.perplexity for d, sc in store.scores(m.id, proxy).items()})
        logger.info("[optimize] %s: %.4f", m.label, value)
        return value

    with (
        store,
        progress(
            total=budget, desc="optimize", unit="blend", disable=None if show_progress else True
        ) as bar,
    ):
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
            blend = bs.round_blend(fit.optimum(min_share=min_share))
            reg_point = bs.BlendPoint(blend, score(blend), len(points), "regression")
            points.append(reg_point)
    best = min(points, key=lambda p: p.objective)
    mixture = Mixture.of({p: study.partitions[p] for p in best.blend}, best.blend)
    return OptimizeResult(best, search, fit, reg_point, len(merged), mixture)
