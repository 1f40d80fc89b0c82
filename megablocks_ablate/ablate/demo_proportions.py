"""``demo --proportions``: weighted merges checked against truly trained blends.

The demo's data and presets (:mod:`.demo`), on its first ``max_partitions`` partitions
(4 by default, one base unit each):

1. **study**: every subset of those partitions as an equal-share mixture, plus
   ``n_blends`` Dirichlet proportion vectors over all of them, each validated by a seq
   model trained on that blend; every seq model gets the same budget (the equal-share
   all-partition mixture's), so blends and subsets compare at equal cost;
2. **train and score**: seed, unit and seq models; every mixture by weighted merge;
3. **optimize**: ``study optimize`` from the uniform blend (geometric-mean perplexity
   over every evaluation domain, by the macro proxy = the weighted merge);
4. **check**: seq models for the optimizer's blend, the best equal-share subset by the
   proxy, and the natural blend (token-proportional: all partitions, one unit each, so
   equal shares) are trained; the demo prints Pearson/Spearman of weighted-merged vs seq
   over the sampled blends, per domain and per role, and the three seq objectives.

Figures as measured are in docs/proportions.md.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from dataclasses import replace

import yaml

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.demo import DemoSettings, _step, build_data, study_spec

logger = logging.getLogger(__name__)

N_BLENDS = 6  # sampled proportion vectors with seq models
ALPHA = 1.0  # flat Dirichlet: uniform on the simplex
BUDGET = 30  # optimizer merges
N_STEPS = 6


def proportions_spec(s: DemoSettings, data: str, seed_data: str, n_blends: int) -> dict:
    """The study spec: every subset as a mixture, ``n_blends`` Dirichlet blends validated."""
    spec = study_spec(s, data, seed_data)
    names = list(spec["partitions"])
    subsets = [list(c) for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]
    blends = mx.dirichlet_shares(names, n_blends, ALPHA, seed=0)
    unit_tokens = _tokens(s.unit_tokens)
    spec["name"] = spec["name"] + "-proportions"
    spec["out_dir"] = os.path.join(s.out, "study-proportions")
    spec["mixtures"] = {"explicit": subsets, "weighted": blends}
    spec["proxies"] = ["macro", "mean_ind"]
    spec["validation"] = dict(
        spec["validation"],
        n=0,
        weighted=blends,
        mixtures=[],
        train_tokens=len(names) * unit_tokens,
    )
    return spec


def _tokens(text: str) -> int:
    from megablocks_ablate.config import parse_count

    return parse_count(text, "--unit-tokens")


def _write(path: str, spec: dict):
    from megablocks_ablate.ablate.runner import resolve
    from megablocks_ablate.ablate.spec import StudySpec
    from megablocks_ablate.ablate.spec_paths import record_spec_paths
    from megablocks_ablate.utils.atomic import atomic_write_text

    # paths relative to the spec (the demo's own files always), as the demo's study.yaml
    spec = record_spec_paths(spec, path, inside=os.path.dirname(os.path.abspath(path)))
    atomic_write_text(path, yaml.safe_dump(spec, sort_keys=False))
    return resolve(StudySpec.load(path))


def _train_and_score(study) -> None:
    from megablocks_ablate.ablate.runner import RunOptions, run_study

    run_study(study, RunOptions())  # what `study run` does: only the missing work


def run_proportions_demo(s: DemoSettings, n_blends: int = N_BLENDS, budget: int = BUDGET) -> int:
    from megablocks_ablate.ablate.runner import RunOptions, StudyRunner
    from megablocks_ablate.ablate.runner.propose import BlendObjective
    from megablocks_ablate.ablate.store import ResultStore, store_path
    from megablocks_ablate.utils.atomic import atomic_write_json

    t0 = time.time()
    data, seed_data = build_data(s, t0)
    spec_path = os.path.join(s.out, "study-proportions.yaml")
    spec = proportions_spec(s, data, seed_data, n_blends)
    study = _write(spec_path, spec)
    _step(
        4,
        N_STEPS,
        f"study: {spec_path}: {len(study.partitions)} partitions, {len(study.mixtures)} "
        f"mixtures ({sum(m.weighted for m in study.mixtures)} blends), "
        f"{len(study.validation)} seq blends of {study.spec.validation.train_tokens:,} tokens",
        t0,
    )
    _train_and_score(study)
    sampled = [m.id for m in study.validation]
    _step(5, N_STEPS, "models trained, every mixture scored; optimizing the blend", t0)

    objective = BlendObjective("geomean", domains=tuple(study.eval_sets))
    runner = StudyRunner(study, RunOptions())
    try:
        opt = runner.optimize(objective, budget=budget, show_progress=False)
    finally:
        runner.close()
    with ResultStore(store_path(study.spec.out_dir)) as store:
        equal = [m for m in study.mixtures if not m.weighted]
        proxy_obj = {
            m.id: objective({d: v.perplexity for d, v in store.scores(m.id, "macro").items()})
            for m in equal
        }
    best_subset = min(equal, key=lambda m: proxy_obj[m.id])
    natural = mx.Mixture.of(study.partitions)  # one unit each: token-proportional = equal
    logger.info(
        "optimizer blend %s (proxy %.4f); best equal-share subset by the proxy %s (%.4f)",
        opt.mixture.label,
        opt.best.objective,
        best_subset.label,
        proxy_obj[best_subset.id],
    )
    checks = {"optimizer": opt.mixture, "best_subset": best_subset, "natural": natural}
    v = spec["validation"]
    extra = [opt.mixture.proportions] if opt.mixture.weighted else []
    v["weighted"] = list(v["weighted"]) + extra
    spec["mixtures"]["weighted"] = list(spec["mixtures"]["weighted"]) + extra
    v["mixtures"] = [list(m.names) for m in (opt.mixture, best_subset, natural) if not m.weighted]
    study = _write(spec_path, spec)
    _train_and_score(study)
    _step(6, N_STEPS, "seq models of the optimizer's blend and the baselines trained", t0)

    figures = proportion_figures(study, sampled, checks, objective)
    figures["optimizer"] = opt.to_dict()
    figures["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(os.path.join(s.out, "proportions.json"), figures)
    print(format_figures(figures))
    return 0


def proportion_figures(study, sampled: list[str], checks: dict, objective) -> dict:
    """Correlations over the sampled blends (per domain and per role) and the seq
    objective of each checked mixture."""
    from megablocks_ablate.ablate.analysis import build_table
    from megablocks_ablate.ablate.roles import ROLE_ALL, ROLE_ID, ROLE_OOD, role_table
    from megablocks_ablate.ablate.store import ResultStore, store_path

    with ResultStore(store_path(study.spec.out_dir)) as store:
        table = build_table(store)
        seq = {
            name: objective({d: v.perplexity for d, v in store.scores(m.id, mx.SEQ).items()})
            for name, m in checks.items()
        }
        proxy = {
            name: objective({d: v.perplexity for d, v in store.scores(m.id, "macro").items()})
            for name, m in checks.items()
        }
    keep = set(sampled)
    only = {
        p: {d: {m: x for m, x in by_m.items() if m in keep} for d, by_m in by_d.items()}
        for p, by_d in table.values.items()
    }
    table = replace(table, values=only, id_rows=[])
    out: dict = {
        "blends": len(sampled),
        "checks": {
            name: {"label": m.label, "seq": seq[name], "proxy": proxy[name]}
            for name, m in checks.items()
        },
    }
    for method in ("pearson", "spearman"):
        rt = role_table(table, method, proxies=["macro", "mean_ind"], n_boot=0)
        per_domain = {
            d: {p: _num(rt.per_domain[ROLE_ALL][d][p].r) for p in rt.proxies} for d in table.domains
        }
        roles = {
            role: {
                name: {p: _num(c.r) for p, c in cells.items()}
                for name, cells in rt.figures[role].items()
            }
            for role in (ROLE_OOD, ROLE_ID, ROLE_ALL)
        }
        out[method] = {"per_domain": per_domain, "roles": roles}
    return out


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def format_figures(f: dict) -> str:
    def cell(x):
        return "   -  " if x is None else f"{x:6.3f}"

    lines = [
        f"weighted merge (macro) vs seq over {f['blends']} sampled blends "
        "(Pearson / Spearman; mean_ind for comparison):",
        f"  {'domain':<24} {'merged P':>8} {'merged S':>8} {'mean_ind P':>10}",
    ]
    P, S = f["pearson"], f["spearman"]
    for d in P["per_domain"]:
        lines.append(
            f"  {d:<24} {cell(P['per_domain'][d]['macro']):>8} "
            f"{cell(S['per_domain'][d]['macro']):>8} {cell(P['per_domain'][d]['mean_ind']):>10}"
        )
    for role in ("ood", "id", "all"):
        for name in ("mean", "pooled"):
            got = P["roles"].get(role, {}).get(name)
            if not got or all(v is None for v in got.values()):
                continue  # e.g. no out-of-domain set in the stdlib corpus
            lines.append(
                f"  {role + ' ' + name:<24} {cell(got['macro']):>8} "
                f"{cell(S['roles'][role][name]['macro']):>8} {cell(got['mean_ind']):>10}"
            )
    lines.append("seq objective (geometric-mean perplexity over every domain; lower is better):")
    for name, c in f["checks"].items():
        lines.append(f"  {name:<12} {c['label']:<48} seq {c['seq']:.4f}  (proxy {c['proxy']:.4f})")
    return "\n".join(lines)
