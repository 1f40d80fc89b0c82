"""Cross-scored fidelity: every arm's proxies against every arm's seq references.

    python benchmarks/cross_fidelity.py --units NAME=STUDY_DIR [--units ...] \
        --seq NAME=STUDY_DIR [--seq ...] [--retrained NAME=STUDY_DIR ...] \
        [--proxy merged] [--n-boot 1000] [--json OUT]

Two settings of a study (say unit models started from the seed's optimizer state or
from a fresh one) are compared fairly only against the *same* seq models. Each
``--units`` study gives the proxy values (its merged models), each ``--seq`` study the
seq values (its seq validation models); the studies must share mixtures and evaluation
domains (one corpus, one seed). For every (units, seq) pair the script prints the
figures a user acts on, for ``--proxy`` vs seq:

* ``OOD mean``: mean over evaluation domains of Pearson over the mixtures for which
  the domain is out of domain (a domain with fewer than 4 such mixtures is left out),
  with its 95% bootstrap interval over mixtures;
* ``summary``: the paper's summary row (:mod:`megablocks_ablate.ablate.decisions`):
  Pearson over mixtures of the mean perplexity over the domains out of domain for
  every validation mixture, with its interval;
* ``top-2``: share of OOD domains whose proxy pick is within seq's top 2;
  ``regret``: mean over OOD domains of seq(pick) / seq(best) - 1.

A ``--units`` value ``DIR1+DIR2+...`` is an ensemble: the geometric mean of those
studies' proxy perplexities (unit-model sets of one design, say two unit batch sizes),
scored as one proxy. A ``--seq`` value of that form is a reference averaged the same way
over several sets of seq models (other data orders): what a proxy reads against the
expected seq model rather than one training run of it.

``--blend ALPHA`` scores ``proxy^ALPHA x mean_ind^(1-ALPHA)`` instead of the proxy: a
geometric blend with the mean of the unit models' own perplexities (beyond the paper;
ALPHA picked by hand, not fitted, so judge it on more than one corpus).

``--fit-blend`` fits ALPHA instead, per cell, on half of the validated mixtures (the
scaled merge's split; the mean of the OOD per-domain mean and the summary row over a
grid) and prints the proxy and the fitted blend on the other half only.

``--per-domain`` also prints each OOD domain's Pearson for every pair and ceiling (the
JSON always has them, ``per_domain``): where a gap to the ceiling sits.

``--retrained NAME=STUDY_DIR`` names a study whose seq models retrain those of the
``--seq`` study NAME under another data order (``validation.train.overrides:
[data.seed=7]``): its seq models are then scored as if they were a proxy for NAME's.
That row is the noise ceiling of the reference: what an independently retrained seq
model reads against it (no proxy can be expected to do better on these figures), and
sqrt(r) of its OOD mean is the attenuation ceiling of a noise-free proxy.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate import decisions as dc
from megablocks_ablate.ablate import roles as rl
from megablocks_ablate.ablate.analysis import ROLE_OOD, SEQ
from megablocks_ablate.ablate.store import StoreError, read_study_table
from megablocks_ablate.utils.benchmark_result import check_writable, command_line, write_result

RETRAINED = "seq_retrained"  # the proxy name a retrained seq reference is scored under


def load(path: str) -> an.ResultTable:
    try:
        return read_study_table(path)
    except StoreError as e:
        raise SystemExit(f"error: {e}") from None


def ensemble(tables: list[an.ResultTable], proxy: str) -> an.ResultTable:
    """The first table with ``proxy`` replaced by the geometric mean of every table's
    ``proxy`` (per domain, over the mixtures all of them scored): one proxy from
    several unit-model sets of one design (other data orders or unit settings).
    ``mean_ind``, when every member has it, is averaged the same way, so a
    :func:`blend` of the ensemble blends with the ensemble's own unit models."""
    if any(proxy not in t.values for t in tables):
        raise SystemExit(f"error: an ensemble member has no {proxy!r} scores")
    values = dict(tables[0].values)
    for name in (proxy, "mean_ind"):
        if name == proxy or all(name in t.values for t in tables):
            values[name] = _geometric_mean([t.values[name] for t in tables])
    return dataclasses.replace(tables[0], values=values)


def _geometric_mean(members: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    mean: dict[str, dict[str, float]] = {}
    for d, by_m in members[0].items():
        for m in by_m:
            logs = [math.log(v[d][m]) for v in members if m in v.get(d, {})]
            if len(logs) == len(members):
                mean.setdefault(d, {})[m] = math.exp(sum(logs) / len(logs))
    return mean


def blend(table: an.ResultTable, alpha: float, proxy: str = "merged") -> an.ResultTable:
    """``table`` with ``proxy`` replaced by ``proxy^alpha x mean_ind^(1-alpha)`` per domain
    and mixture (the geometric blend with the mean of the unit models' perplexities)."""
    mean_ind = table.values.get("mean_ind", {})
    if proxy not in table.values or not mean_ind:
        raise SystemExit(f"error: a blend needs the study's {proxy} and mean_ind scores")
    mixed = {
        d: {
            m: math.exp(alpha * math.log(v) + (1 - alpha) * math.log(mean_ind[d][m]))
            for m, v in by_m.items()
            if m in mean_ind.get(d, {})
        }
        for d, by_m in table.values[proxy].items()
    }
    return dataclasses.replace(table, values={**table.values, proxy: mixed})


BLEND_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)


def fit_blend(units: an.ResultTable, seq: an.ResultTable, proxy: str, seed: int = 0) -> dict:
    """Fit the blend weight on half of the validated mixtures, judge it on the other.

    The mixtures both studies validated are split as the scaled merge splits them
    (:func:`megablocks_ablate.ablate.runner.scaled.split_validation`); on the fit half
    every ALPHA of :data:`BLEND_GRID` is scored by the mean of the OOD per-domain mean
    and the summary row (the two ranking figures), ties to the larger ALPHA; on the
    held-out half the figures of ``proxy`` (ALPHA 1) and of the fitted blend."""
    from megablocks_ablate.ablate.report_scaled import held_out_table
    from megablocks_ablate.ablate.runner.scaled import split_validation

    table = crossed(units, seq, proxy)
    fit, held = split_validation([m for m in seq.seq_mixtures if m in units.mixtures], seed)
    grid = {}
    for alpha in BLEND_GRID:
        blended = crossed(blend(units, alpha, proxy), seq, proxy)
        f = figures(held_out_table(blended, fit), proxy, n_boot=0)
        vals = [v for v in (f["ood_mean"]["r"], f["summary"]["r"]) if v is not None]
        grid[alpha] = sum(vals) / len(vals) if vals else 0.0
    best = max(BLEND_GRID, key=lambda a: (grid[a], a))
    return {
        "alpha": best,
        "grid": {str(a): v for a, v in grid.items()},
        "fit_mixtures": fit,
        "held_out_mixtures": held,
        "held_out": {
            proxy: figures(held_out_table(table, held), proxy, n_boot=0),
            "blend": figures(
                held_out_table(crossed(blend(units, best, proxy), seq, proxy), held),
                proxy,
                n_boot=0,
            ),
        },
    }


def _load_many(paths: str, proxy: str, alpha: float | None = None) -> an.ResultTable:
    members = [load(p) for p in paths.split("+")]
    table = members[0] if len(members) == 1 else ensemble(members, proxy)
    return table if alpha is None else blend(table, alpha, proxy)


def crossed(units: an.ResultTable, seq: an.ResultTable, proxy: str) -> an.ResultTable:
    """``units``' ``proxy`` values against ``seq``'s seq values, over the mixtures and
    domains both have; SystemExit when they share no validated mixture."""
    if proxy not in units.values:
        raise SystemExit(f"error: the units study has no {proxy!r} scores")
    values = {proxy: units.values[proxy], SEQ: seq.values.get(SEQ, {})}
    table = dataclasses.replace(units, values=values, proxies=[proxy])
    if not any(m in units.mixtures for m in seq.seq_mixtures):
        raise SystemExit("error: the two studies share no validated mixture (another corpus?)")
    return table


def retrained(seq: an.ResultTable, again: an.ResultTable) -> an.ResultTable:
    """``again``'s seq models scored as proxy :data:`RETRAINED` against ``seq``'s."""
    values = {RETRAINED: again.values.get(SEQ, {}), SEQ: seq.values.get(SEQ, {})}
    return dataclasses.replace(seq, values=values, proxies=[RETRAINED])


def figures(table: an.ResultTable, proxy: str, n_boot: int, seed: int = 0) -> dict:
    """The OOD mean, summary row and decision figures of ``proxy`` vs seq."""
    rt = rl.role_table(table, "pearson", proxies=[proxy], n_boot=n_boot, seed=seed)
    mean = rt.figure(proxy, ROLE_OOD, "mean")
    row = dc.summary_row(table, [proxy], n_boot=n_boot, seed=seed)
    summ, spear = row.get(proxy), row.get(proxy, "spearman")
    ds = dc.decisions(table, proxy)
    per_domain = {d: _num(v[proxy].r) for d, v in sorted(rt.per_domain.get(ROLE_OOD, {}).items())}
    return {
        "ood_mean": _corr(mean),
        "per_domain": per_domain,
        "summary": _corr(summ),
        "summary_spearman": _corr(spear),
        "summary_domains": row.domains,
        "share_top2": _num(ds.share_top2),
        "mean_regret": _num(ds.mean_regret),
        "max_regret": _num(ds.max_regret),
        "n_domains": ds.n,
        "summary_pick_rank": ds.summary.seq_rank if ds.summary else None,
        "summary_regret": ds.summary.regret if ds.summary else None,
    }


def _num(v: float) -> float | None:
    return None if math.isnan(v) else v


def _corr(c: an.Corr) -> dict:
    return {"r": _num(c.r), "lo": _num(c.lo), "hi": _num(c.hi), "n": c.n}


def _cell(c: dict) -> str:
    if c["r"] is None:
        return "–"
    ci = f" [{c['lo']:.2f}, {c['hi']:.2f}]" if c["lo"] is not None else ""
    return f"{c['r']:.3f}{ci}"


def _row(units: str, seq: str, f: dict) -> str:
    top2 = "–" if f["share_top2"] is None else f"{f['share_top2']:.0%} of {f['n_domains']}"
    reg = "–" if f["mean_regret"] is None else f"{100 * f['mean_regret']:.2f}%"
    return f"| {units} | {seq} | {_cell(f['ood_mean'])} | {_cell(f['summary'])} | {top2} | {reg} |"


def _print_per_domain(result: dict) -> None:
    columns = {f"{u} / {s}": f for u, row in result["cells"].items() for s, f in row.items()}
    columns.update({f"ceiling / {s}": f for s, f in result["ceilings"].items()})
    domains = sorted({d for f in columns.values() for d in f["per_domain"]})
    print("\nOOD Pearson per domain (units / seq reference)")
    print("| domain | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for d in domains:
        cells = [f["per_domain"].get(d) for f in columns.values()]
        print(f"| {d} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")


def named(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, _, path = item.partition("=")
        if not name or not path:
            raise SystemExit(f"error: {flag}: expected NAME=STUDY_DIR, got {item!r}")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", action="append", required=True, metavar="NAME=STUDY_DIR")
    ap.add_argument("--seq", action="append", required=True, metavar="NAME=STUDY_DIR")
    ap.add_argument("--retrained", action="append", default=[], metavar="NAME=STUDY_DIR")
    ap.add_argument("--proxy", default="merged", help="the proxy of the units studies")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument(
        "--blend",
        type=float,
        metavar="ALPHA",
        help="score proxy^ALPHA x mean_ind^(1-ALPHA) of each units study (of a + "
        "ensemble: both averaged over its members) instead of the proxy alone",
    )
    ap.add_argument(
        "--fit-blend",
        action="store_true",
        help="per cell, also fit the blend weight on half of the validated mixtures and "
        "print the proxy and the fitted blend on the other half",
    )
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument(
        "--per-domain", action="store_true", help="also print each OOD domain's Pearson"
    )
    args = ap.parse_args(argv)
    if args.json:
        check_writable(args.json, "cross_fidelity")
    if args.blend is not None and args.fit_blend:
        raise SystemExit("error: --blend and --fit-blend: give one (a fixed or a fitted ALPHA)")
    if args.blend is not None and not 0.0 <= args.blend <= 1.0:
        raise SystemExit("error: --blend: ALPHA must lie in [0, 1]")
    units, seqs = named(args.units, "--units"), named(args.seq, "--seq")
    again = named(args.retrained, "--retrained")
    unknown = sorted(set(again) - set(seqs))
    if unknown:
        raise SystemExit(f"error: --retrained {unknown[0]}: no --seq study of that name")
    # DIR1+DIR2: one table holding the geometric mean of their proxy (or seq) scores
    seq_tables = {n: _load_many(p, SEQ) for n, p in seqs.items()}
    unit_tables = {n: _load_many(p, args.proxy, args.blend) for n, p in units.items()}
    result: dict = {"proxy": args.proxy, "blend": args.blend, "cells": {}, "ceilings": {}}
    print(f"{args.proxy} vs seq; OOD mean and summary row: Pearson [95% interval]")
    print("| units | seq reference | OOD mean | summary row | pick in seq top 2 | mean regret |")
    print("|---|---|---|---|---|---|")
    for u in units:
        for s in seqs:
            f = figures(crossed(unit_tables[u], seq_tables[s], args.proxy), args.proxy, args.n_boot)
            result["cells"].setdefault(u, {})[s] = f
            print(_row(u, s, f))
            if args.fit_blend:
                fb = fit_blend(unit_tables[u], seq_tables[s], args.proxy)
                f["fitted_blend"] = fb
                ho = fb["held_out"]
                print(_row(f"{u} (held-out half)", s, ho[args.proxy]))
                print(_row(f"{u} blend {fb['alpha']:g} (held-out half)", s, ho["blend"]))
    for s, path in again.items():
        f = figures(retrained(seq_tables[s], load(path)), RETRAINED, args.n_boot)
        r = f["ood_mean"]["r"]
        f["attenuation_ceiling"] = math.sqrt(r) if r is not None and r > 0 else None
        result["ceilings"][s] = f
        print(_row("seq retrained (noise ceiling)", s, f))
    if args.per_domain:
        _print_per_domain(result)
    if args.json:
        write_result(args.json, "cross_fidelity", result, command_line(__file__, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
