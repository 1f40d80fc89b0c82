"""Propose: mixtures chosen by a search, each scored lazily through the one scorer.

A proposer asks for the score of a mixture; one already in the store is read, any
other is merged in memory and evaluated by :meth:`.Scorer.score_mixture` (so its rows
and provenance are those ``study run`` would write). Beam search over partitions is
the proposer today; a proportion optimizer plugs in the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.mixtures import Mixture
from megablocks_ablate.ablate.runner.plan import RunPlan
from megablocks_ablate.ablate.runner.scoring import Scorer
from megablocks_ablate.ablate.search import SearchResult, beam_search
from megablocks_ablate.ablate.store import ResultStore
from megablocks_ablate.errors import ConfigError

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
