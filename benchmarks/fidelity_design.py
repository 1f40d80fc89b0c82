"""How many seq validation models does a fidelity figure need? Subsample a finished study.

    python benchmarks/fidelity_design.py NAME=STUDY_DIR [NAME=STUDY_DIR ...] \
        [--n 6,12,20] [--draws 200] [--json OUT]

Each STUDY_DIR is a study's ``out_dir`` (its ``results.sqlite``), ideally one with many
seq validation models (``demo --k 2 --n-seq 28``: every pair). For each ``n`` the script
draws ``--draws`` random sets of ``n`` of the study's seq mixtures and recomputes, for
the headline proxy and ``mean_ind``, the out-of-domain figures of the report (per-domain
mean and pooled Pearson) on that set alone: the spread across draws is what a study
with ``n`` seq models of this design would see from the choice of its validation
mixtures alone (``--domains GLOB``: over the matching evaluation domains only;
``--exclude GLOB``: without the matching ones). It
prints the mean, standard deviation, 10th percentile and the share of draws at or
above the fidelity issue's 0.93, next to the full study's figure.

This is what chose the demo's default design (docs/fidelity.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import math
import sys

import numpy as np

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate.analysis import ROLE_OOD, SEQ
from megablocks_ablate.ablate.roles import headline_proxy
from megablocks_ablate.ablate.store import StoreError, read_study_table
from megablocks_ablate.utils.benchmark_result import check_writable, command_line, write_result

TARGET = 0.93


def restrict(table: an.ResultTable, keep: set[str]) -> an.ResultTable:
    """``table`` with seq values on the mixtures in ``keep`` only."""
    values = dict(table.values)
    values[SEQ] = {
        d: {m: v for m, v in by_m.items() if m in keep} for d, by_m in table.values[SEQ].items()
    }
    return dataclasses.replace(table, values=values)


def ood_figures(
    table: an.ResultTable, proxy: str, domains: list[str] | None = None
) -> tuple[float, float]:
    """(per-domain mean, pooled) out-of-domain Pearson of ``proxy`` vs seq over
    ``domains`` (default: all of the table's), no bootstrap."""
    domains = table.domains if domains is None else domains
    rs = [an.correlate(table, proxy, d, role=ROLE_OOD, n_boot=0).r for d in domains]
    rs = [r for r in rs if not math.isnan(r)]
    mean = float(np.mean(rs)) if rs else math.nan
    return mean, an.pooled_correlation(table, proxy, domains=domains, role=ROLE_OOD, n_boot=0).r


def select_domains(
    table: an.ResultTable, pattern: str | None, exclude: str | None = None
) -> list[str]:
    """The table's domains matching the glob ``pattern`` (all without one), less those
    matching the glob ``exclude``: how much one domain drives a pooled figure."""
    got = list(table.domains)
    if pattern is not None:
        got = [d for d in got if fnmatch.fnmatchcase(d, pattern)]
    if exclude is not None:
        got = [d for d in got if not fnmatch.fnmatchcase(d, exclude)]
    if not got:
        raise SystemExit(
            f"error: --domains {pattern!r} --exclude {exclude!r} leave none of {table.domains}"
        )
    return got


def summarise(values: list[float]) -> dict[str, float]:
    a = np.array([v for v in values if not math.isnan(v)])
    if not len(a):
        return {"mean": math.nan, "sd": math.nan, "p10": math.nan, "share_ge_target": math.nan}
    return {
        "mean": float(a.mean()),
        "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "p10": float(np.quantile(a, 0.1)),
        "share_ge_target": float((a >= TARGET).mean()),
    }


def study_design(
    table: an.ResultTable,
    sizes: list[int],
    draws: int,
    seed: int,
    domains: list[str] | None = None,
) -> dict:
    proxy = headline_proxy(table)[0] or "merged"
    seq = table.seq_mixtures
    proxies = (proxy, "mean_ind")
    full = {
        p: dict(zip(("mean", "pooled"), ood_figures(table, p, domains), strict=True))
        for p in proxies
    }
    out: dict = {"proxy": proxy, "seq_models": len(seq), "domains": domains, "full": full}
    out["by_n"] = {}
    rng = np.random.default_rng(seed)
    for n in sizes:
        if n > len(seq):
            continue
        got: dict[str, dict[str, list[float]]] = {p: {"mean": [], "pooled": []} for p in proxies}
        for _ in range(draws if n < len(seq) else 1):
            sub = restrict(table, set(rng.choice(seq, size=n, replace=False).tolist()))
            for p in got:
                mean, pooled = ood_figures(sub, p, domains)
                got[p]["mean"].append(mean)
                got[p]["pooled"].append(pooled)
        out["by_n"][n] = {p: {k: summarise(v) for k, v in g.items()} for p, g in got.items()}
    return out


def _f(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="+", help="NAME=STUDY_DIR (holding results.sqlite)")
    ap.add_argument("--n", default="6,12,20", help="seq set sizes to draw (comma-separated)")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--domains", help="only the evaluation domains matching this glob")
    ap.add_argument("--exclude", help="leave out the evaluation domains matching this glob")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.json:
        check_writable(args.json, "fidelity_design")
    sizes = [int(x) for x in args.n.split(",") if x.strip()]
    result = {}
    print(
        "| study | proxy | seq models | OOD mean: mean ± sd (p10) | share >= 0.93 "
        "| OOD pooled: mean ± sd (p10) | mean_ind OOD mean | margin (mean) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for item in args.studies:
        name, _, path = item.partition("=")
        if not path:
            print(f"error: {item}: expected NAME=STUDY_DIR", file=sys.stderr)
            return 2
        try:
            table = read_study_table(path)
        except StoreError as e:
            print(f"error: {item}: {e}", file=sys.stderr)
            return 2
        domains = select_domains(table, args.domains, args.exclude)
        res = study_design(table, sizes, args.draws, args.seed, domains)
        result[name] = res
        proxy = res["proxy"]
        for n, by_p in res["by_n"].items():
            head, ind = by_p[proxy], by_p["mean_ind"]
            m, pl = head["mean"], head["pooled"]
            print(
                f"| {name} | {proxy} | {n} | {_f(m['mean'])} ± {_f(m['sd'])} ({_f(m['p10'])}) "
                f"| {_f(m['share_ge_target'])} | {_f(pl['mean'])} ± {_f(pl['sd'])} "
                f"({_f(pl['p10'])}) | {_f(ind['mean']['mean'])} "
                f"| {_f(m['mean'] - ind['mean']['mean'])} |"
            )
    if args.json:
        write_result(
            args.json, "fidelity_design", {"studies": result}, command_line(__file__, argv)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
