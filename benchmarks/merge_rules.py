"""Other merge rules than the paper's average, judged against the same seq references.

    python benchmarks/merge_rules.py --spec STUDY_YAML --seq NAME=STUDY_DIR [--seq ...] \
        [--rule average --rule norm ...] [--blend 0.8 ...] [--json OUT]

The paper's proxy is the weighted average of the unit models, ``seed + sum_u w_u d_u``
with ``d_u`` = unit - seed. Averaging displacements that point different ways shortens
them (two units at cosine 0.2 keep ~0.77 of a unit's length), so a mixture of dissimilar
partitions lands nearer the seed than one of similar partitions, while a seq model
trained on both moves as far as either. These rules test whether undoing that helps:

* ``average``: the paper's merge (must reproduce the study's stored ``merged`` rows;
  the largest difference is printed and kept in the JSON as a check);
* ``norm``: the average rescaled to the weighted mean length of its displacements,
  over all parameters (``norm-tensor``: tensor by tensor);
* ``relnorm`` (``relnorm-tensor``): that factor divided by its mean over the
  validation mixtures, so the rules keep the average's overall distance from the seed
  and change only how far one mixture goes relative to another.

``--blend A`` adds a proxy that needs no merge: the geometric blend
``merged^A x mean_ind^(1-A)`` of the stored merged and mean-of-units perplexities.

Each proxy is scored like ``cross_fidelity.py`` (OOD per-domain mean, summary row,
pick in seq's top 2, mean regret) against every ``--seq`` study's seq models (which
must share the spec study's mixtures and domains), and as the mean over them. Unit
models and the seed are found through the study's store and the units' lineage and
checked against their recorded hashes before anything is merged.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cross_fidelity as cf

from megablocks_ablate.ablate.analysis import SEQ
from megablocks_ablate.ablate.store import ResultStore, store_path
from megablocks_ablate.merge.stretch import shortening
from megablocks_ablate.utils.benchmark_result import (
    check_writable,
    command_line,
    write_result,
)

RULES = ("average", "norm", "norm-tensor", "relnorm", "relnorm-tensor")
Tensors = Mapping[str, torch.Tensor]


# ----------------------------------------------------------------------------- rules
def displacement_ratio(
    deltas: Sequence[Tensors], weights: Sequence[float], per_tensor: bool
) -> dict[str, float]:
    """Per tensor name: the weighted mean length of the displacements over the length
    of their weighted mean (whole vector: one factor for every tensor). 1 where the
    mean displacement is zero."""
    names = list(deltas[0])
    mean = {k: sum(w * d[k] for d, w in zip(deltas, weights)) for k in names}
    if per_tensor:  # the package's stretch measures the same, from a seed (here: zero)
        return shortening({k: torch.zeros_like(v) for k, v in mean.items()}, deltas, mean, weights)

    def total(t: Tensors) -> float:
        return math.sqrt(sum(float(v.double().square().sum()) for v in t.values()))

    length = total(mean)
    target = sum(w * total(d) for d, w in zip(deltas, weights))
    factor = target / length if length > 0 else 1.0
    return dict.fromkeys(names, factor)


def merge_rule(
    seed: Tensors,
    deltas: Sequence[Tensors],
    weights: Sequence[float],
    rule: str,
    ratio_mean: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """The merged state dict of ``rule`` (:data:`RULES`); ``relnorm*`` divide the
    factor by ``ratio_mean`` (its mean over the study's mixtures)."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r} (expected one of {', '.join(RULES)})")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"merge weights sum to {sum(weights)}, expected 1")
    factor = dict.fromkeys(seed, 1.0)
    if rule != "average":
        factor = displacement_ratio(deltas, weights, per_tensor=rule.endswith("-tensor"))
        if rule.startswith("relnorm"):
            if ratio_mean is None:
                raise ValueError(f"{rule}: needs the factor's mean over the mixtures")
            factor = {k: f / ratio_mean[k] for k, f in factor.items()}
    return {k: seed[k] + factor[k] * sum(w * d[k] for d, w in zip(deltas, weights)) for k in seed}


# ----------------------------------------------------------------------------- models
class Pool(NamedTuple):
    """The seed's weights and each unit model's displacement from it (fp32)."""

    seed_dir: str
    seed: dict[str, torch.Tensor]
    deltas: dict[str, dict[str, torch.Tensor]]


def load_pool(path: str, recorded: Mapping[str, dict], units: Sequence[str]) -> Pool:
    """The unit models the store at ``path`` scored (``recorded``: their rows'
    provenance; hash-checked), and the one seed they record (hash-checked against
    their lineage)."""
    from megablocks_ablate.checkpoint import load_model_checkpoint, read_checkpoint_meta
    from megablocks_ablate.utils.paths import resolve_recorded
    from megablocks_ablate.utils.verify import verify_sha256

    dirs, seeds = {}, set()
    for u in units:
        prov = recorded.get(u)
        if prov is None or not prov.get("model"):
            raise SystemExit(f"error: {path}: no scored unit model {u!r}")
        run = resolve_recorded(prov["model"], path, cwd_fallback=True)
        model_dir = os.path.join(run, "final") if os.path.isdir(os.path.join(run, "final")) else run
        verify_sha256(
            os.path.join(model_dir, "model.safetensors"), prov.get("model_sha256"), f"unit {u}"
        )
        lineage = read_checkpoint_meta(model_dir)[1]
        if not lineage.parents:
            raise SystemExit(f"error: {model_dir}: its lineage names no seed it continues")
        seeds.add((lineage.parents[0], lineage.seed_hash))
        dirs[u] = model_dir
    if len(seeds) != 1:
        raise SystemExit(f"error: the unit models continue different seeds: {sorted(seeds)}")
    seed_dir, seed_hash = seeds.pop()
    verify_sha256(os.path.join(seed_dir, "model.safetensors"), seed_hash, "the seed")
    seed = {k: v.float() for k, v in load_model_checkpoint(seed_dir)[0].items()}
    deltas = {}
    for u, d in dirs.items():
        state = load_model_checkpoint(d)[0]
        deltas[u] = {k: state[k].float() - seed[k] for k in seed}
    return Pool(seed_dir, seed, deltas)


def score_rules(
    study, pool: Pool, rules: Sequence[str], merged_rows: Mapping[str, dict]
) -> dict[str, dict[str, dict[str, float]]]:
    """Perplexity per rule, domain and mixture (the mixtures of ``merged_rows``:
    mixture -> merge weights), each merge scored on ``study``'s evaluation sets."""
    from megablocks_ablate.ablate.runner.scoring import ScoreOptions, load_suite, study_window
    from megablocks_ablate.data.manifest import Manifest
    from megablocks_ablate.evaluate import evaluate
    from megablocks_ablate.model.loading import load_model
    from megablocks_ablate.utils.progress import progress

    window = study_window(study)
    suite, _ = load_suite(study, Manifest.load(study.manifest_dir), ScoreOptions(), window)
    model, _ = load_model(pool.seed_dir)
    ratio_mean: dict[str, dict[str, float]] = {}
    for per_tensor in {r.endswith("-tensor") for r in rules if r.startswith("relnorm")}:
        ratios = [
            displacement_ratio([pool.deltas[u] for u in w], list(w.values()), per_tensor)
            for w in merged_rows.values()
        ]
        ratio_mean[str(per_tensor)] = {k: float(np.mean([r[k] for r in ratios])) for k in pool.seed}
    out: dict[str, dict[str, dict[str, float]]] = {}
    jobs = [(r, m, w) for r in rules for m, w in merged_rows.items()]
    with progress(total=len(jobs), desc="merge rules", unit="merge") as bar:
        for rule, m, w in jobs:
            deltas = [pool.deltas[u] for u in w]
            ratios = ratio_mean.get(str(rule.endswith("-tensor")))
            model.load_state_dict(merge_rule(pool.seed, deltas, list(w.values()), rule, ratios))
            res = evaluate(model, suite, max_len=window, trained_len=window, name=f"{rule} {m}")
            for d, r in res.items():
                out.setdefault(rule, {}).setdefault(d, {})[m] = math.exp(r.nll_sum / r.tokens)
            bar.update()
    return out


def _mean_figures(cells: Mapping[str, dict]) -> dict:
    def avg(key: str) -> float | None:
        vals = [f[key] for f in cells.values() if f[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "ood_mean": avg("ood_mean_r"),
        "summary": avg("summary_r"),
        "share_top2": avg("share_top2"),
        "mean_regret": avg("mean_regret"),
    }


def _flat(f: dict) -> dict:
    keep = ("share_top2", "mean_regret", "per_domain", "n_domains")
    return {"ood_mean_r": f["ood_mean"]["r"], "summary_r": f["summary"]["r"]} | {
        k: f[k] for k in keep
    }


def _pct(v: float | None, scale: float = 100.0, digits: int = 2) -> str:
    return "–" if v is None else f"{scale * v:.{digits}f}%"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="the units study's spec (YAML)")
    ap.add_argument("--seq", action="append", required=True, metavar="NAME=STUDY_DIR")
    ap.add_argument("--rule", action="append", choices=RULES, help="default: every rule")
    ap.add_argument("--blend", action="append", type=float, default=[], metavar="ALPHA")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.json:
        check_writable(args.json, "merge_rules")
    if any(not 0.0 <= a <= 1.0 for a in args.blend):
        raise SystemExit("error: --blend: ALPHA must lie in [0, 1]")
    rules = args.rule or list(RULES)
    from megablocks_ablate.ablate.runner.plan import load_study
    from megablocks_ablate.errors import MBAError

    try:
        study = load_study(args.spec)
        out_dir = study.spec.out_dir
        units_table = cf.load(out_dir)
        seqs = {n: cf.load(p) for n, p in cf.named(args.seq, "--seq").items()}
        validated = sorted({m for t in seqs.values() for m in t.seq_mixtures})
        path = store_path(out_dir)
        store = ResultStore(path)
        try:
            merged_rows = {
                r.subject: r.provenance["weights"]
                for r in store.results("merged")
                if r.subject in validated and r.provenance.get("weights")
            }
            recorded = {r.subject: r.provenance for r in store.unit_results()}
        finally:
            store.close()
        if not merged_rows:
            raise SystemExit("error: the --seq studies share no validated mixture with the spec's")
        units = sorted({u for w in merged_rows.values() for u in w})
        pool = load_pool(path, recorded, units)
        values = score_rules(study, pool, rules, merged_rows)
    except MBAError as e:  # a missing or changed file, a non-finite score: say which
        raise SystemExit(f"error: {e}") from None
    check = math.nan
    if "average" in values:
        stored = units_table.values["merged"]
        check = max(
            abs(math.log(v) - math.log(stored[d][m]))
            for d, by_m in values["average"].items()
            for m, v in by_m.items()
        )
    for a in args.blend:
        values[f"blend{a:g}"] = cf.blend(units_table, a).values["merged"]
    values = {"merged (stored)": units_table.values["merged"], **values}
    result: dict = {"check_average_vs_stored_log": check, "proxies": {}}
    print("| proxy | seq reference | OOD mean | summary row | pick in seq top 2 | mean regret |")
    print("|---|---|---|---|---|---|")
    for proxy, vals in values.items():
        cells = {}
        for name, seq in seqs.items():
            table = dataclasses.replace(units_table, values={"p": vals, SEQ: seq.values[SEQ]})
            table = dataclasses.replace(table, proxies=["p"])
            cells[name] = _flat(cf.figures(table, "p", n_boot=0))
            f = cells[name]
            print(
                f"| {proxy} | {name} | {_num(f['ood_mean_r'])} | {_num(f['summary_r'])} | "
                f"{_pct(f['share_top2'], digits=0)} | {_pct(f['mean_regret'])} |"
            )
        mean = _mean_figures(cells)
        result["proxies"][proxy] = {"cells": cells, "mean": mean}
        print(
            f"| **{proxy}** | mean of {len(cells)} | {_num(mean['ood_mean'])} | "
            f"{_num(mean['summary'])} | {_pct(mean['share_top2'], digits=0)} | "
            f"{_pct(mean['mean_regret'])} |"
        )
    if not math.isnan(check):
        print(f"check: average vs the stored merged rows, largest |log ppl| difference {check:.2e}")
    if args.json:
        write_result(args.json, "merge_rules", result, command_line(__file__, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
