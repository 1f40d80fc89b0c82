"""Fidelity of the proxies, per role, for finished studies: the figures of docs/fidelity.md.

    python benchmarks/fidelity.py NAME=REPORT_DIR [NAME=REPORT_DIR ...] [--json OUT]

Each REPORT_DIR is a study's ``report/`` (its ``summary.json``, written by ``study
report`` or at the end of ``study run`` / ``demo``). For every study and proxy the
script prints the summary row (the paper's Paloma / Avg row: Pearson over mixtures of
the mean perplexity over the domains out of domain for every validation mixture), the
out-of-domain (per-domain mean and pooled), in-domain (the mixtures' own held-out sets,
``ID``, and all in-domain points pooled) and all-domain figures, Pearson and Spearman,
and the decision figures (share of OOD domains whose pick is in seq's top 2, mean
regret), then checks the targets of the fidelity issue for the headline proxy and for
the best proxy (by OOD mean):

* out of domain: per-domain mean Pearson(proxy, seq) >= 0.95;
* summary row Pearson >= 0.97;
* the proxy's pick within seq's top 2 on >= 90% of the OOD domains;
* mean regret (seq perplexity of the pick over seq's best, minus 1) <= 1%.

Figures are read, not recomputed: they are exactly what the study's report shows.

**Replicates.** ``--replicates SETTING=NAME,NAME,...`` groups studies of one setting
that differ only in what should not matter (the data order of unit and seq models):
for each target figure of the headline proxy it prints the mean, the sample standard
deviation and the range over the replicates, and whether the *mean* meets the target.
Between two such studies a per-domain mean moves by a few hundredths, so a setting is
judged by its replicates' mean, not by one draw.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from megablocks_ablate.utils.benchmark_result import check_writable, command_line, write_result

ROLE_CELLS = [  # (column, role, statistic)
    ("summary row", "summary", "row"),
    ("OOD mean", "ood", "mean"),
    ("OOD pooled", "ood", "pooled"),
    ("ID", "id", "row"),
    ("ID pooled", "id", "pooled"),
    ("all mean", "all", "mean"),
    ("all pooled", "all", "pooled"),
]
OOD_MEAN_TARGET = 0.95
SUMMARY_TARGET = 0.97
TOP2_TARGET = 0.9
REGRET_TARGET = 0.01


def _r(summary: dict, proxy: str, role: str, stat: str, method: str) -> float | None:
    if role == "summary":
        cells = (summary.get("summary_row") or {}).get("cells", {})
        return cells.get("arith/raw", {}).get(method, {}).get(proxy, {}).get("r")
    cell = summary.get("roles", {}).get(proxy, {}).get(role, {}).get(stat, {}).get(method, {})
    return cell.get("r")


def _decision(summary: dict, proxy: str, key: str) -> float | None:
    return summary.get("decisions", {}).get(proxy, {}).get(key)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def study_rows(name: str, summary: dict) -> list[list[str]]:
    """One Markdown row per proxy: Pearson / Spearman per role cell, and the A.5 rank."""
    rows = []
    for proxy in summary.get("roles", {}):
        cells = [
            f"{_fmt(_r(summary, proxy, role, stat, 'pearson'))} / "
            f"{_fmt(_r(summary, proxy, role, stat, 'spearman'))}"
            for _, role, stat in ROLE_CELLS
        ]
        top2, regret = (_decision(summary, proxy, k) for k in ("share_top2", "mean_regret"))
        label = f"**{proxy}**" if proxy == summary.get("primary") else proxy
        rows.append(
            [
                name,
                label,
                *cells,
                "-" if top2 is None else f"{top2:.0%}",
                "-" if regret is None else f"{100 * regret:.2f}%",
            ]
        )
    return rows


def best_proxy(summary: dict) -> str | None:
    """The proxy with the highest OOD per-domain mean Pearson; not ``scaled``, whose
    figures over all validation mixtures include those its lambda was fitted on (the
    report judges it on the held-out half: summary.json's ``scaled``)."""
    scored = [
        (r, p)
        for p in summary.get("roles", {})
        if p != "scaled" and (r := _r(summary, p, "ood", "mean", "pearson"))
    ]
    return max(scored)[1] if scored else None


# target name -> (limit, higher is better)
TARGETS = {
    f"OOD mean >= {OOD_MEAN_TARGET}": (OOD_MEAN_TARGET, True),
    f"summary row >= {SUMMARY_TARGET}": (SUMMARY_TARGET, True),
    f"pick in seq top 2 on >= {TOP2_TARGET:.0%} of OOD domains": (TOP2_TARGET, True),
    f"mean regret <= {REGRET_TARGET:.0%}": (REGRET_TARGET, False),
}


def _met(key: str, v: float | None) -> bool:
    limit, higher = TARGETS[key]
    return v is not None and (v >= limit if higher else v <= limit)


def targets(summary: dict, proxy: str | None = None) -> dict[str, tuple[float | None, bool]]:
    """The issue's targets for ``proxy`` (default: the headline proxy): name -> (value,
    met)."""
    p = proxy or summary.get("primary") or ""
    values = [
        _r(summary, p, "ood", "mean", "pearson"),
        _r(summary, p, "summary", "row", "pearson"),
        _decision(summary, p, "share_top2"),
        _decision(summary, p, "mean_regret"),
    ]
    return {key: (v, _met(key, v)) for key, v in zip(TARGETS, values)}


def replicate_stats(results: dict[str, dict], names: list[str]) -> dict[str, dict]:
    """Per target (of the headline proxy): mean, sample sd, min, max over ``names`` and
    whether the mean meets the target. A figure missing from any replicate is skipped."""
    out: dict[str, dict] = {}
    first = results[names[0]]["targets"]
    for key in first:
        values = [results[n]["targets"][key][0] for n in names]
        if any(v is None for v in values):
            continue
        vals = [float(v) for v in values]
        mean = statistics.fmean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out[key] = {
            "values": vals,
            "mean": mean,
            "sd": sd,
            "min": min(vals),
            "max": max(vals),
            "n": len(vals),
            "mean_met": _met(key, mean),
        }
    return out


def _replicate_lines(setting: str, stats: dict[str, dict]) -> list[str]:
    lines = []
    for key, st in stats.items():
        pct = "regret" in key or "top 2" in key
        # 4 decimals: a mean judged against 0.97 must not print as 0.970 when it is 0.9697
        f = (lambda v: f"{100 * v:.2f}%") if pct else (lambda v: f"{v:.4f}")
        lines.append(
            f"{setting} ({st['n']} replicates): {key}: mean {f(st['mean'])} sd {f(st['sd'])} "
            f"[{f(st['min'])}, {f(st['max'])}] {'met' if st['mean_met'] else 'NOT met'} by the mean"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="+", help="NAME=REPORT_DIR")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument(
        "--replicates",
        action="append",
        default=[],
        metavar="SETTING=NAME,NAME,...",
        help="studies (by NAME) that replicate one setting: mean, sd and range per target",
    )
    args = ap.parse_args(argv)
    groups: dict[str, list[str]] = {}
    for item in args.replicates:
        setting, _, names = item.partition("=")
        members = [n for n in names.split(",") if n]
        if not setting or len(members) < 2:
            ap.error(f"--replicates: expected SETTING=NAME,NAME[,...], got {item!r}")
        groups[setting] = members
    if args.json:
        check_writable(args.json, "fidelity")
    header = ["study", "proxy", *(c for c, _, _ in ROLE_CELLS), "pick in seq top 2", "regret"]
    rows, result = [], {}
    for item in args.studies:
        name, _, path = item.partition("=")
        if not path:
            ap.error(f"expected NAME=REPORT_DIR, got {item!r}")
        file = os.path.join(path, "summary.json")
        if not os.path.isfile(file):
            print(f"error: {file}: no such file (run `study report` first)", file=sys.stderr)
            return 2
        with open(file, encoding="utf-8") as f:
            summary = json.load(f)
        rows += study_rows(name, summary)
        best = best_proxy(summary)
        result[name] = {
            "summary": summary,
            "targets": targets(summary),
            "best_proxy": best,
            "best_targets": targets(summary, best),
        }
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    for name, res in result.items():
        met = ", ".join(
            f"{k}: {_fmt(v)} {'met' if ok else 'NOT met'}" for k, (v, ok) in res["targets"].items()
        )
        print(f"{name} ({res['summary'].get('primary')}): {met}")
        best = ", ".join(
            f"{k}: {_fmt(v)} {'met' if ok else 'NOT met'}"
            for k, (v, ok) in res["best_targets"].items()
        )
        print(f"{name}, best proxy ({res['best_proxy']}): {best}")
    replicates = {}
    for setting, members in groups.items():
        unknown = [n for n in members if n not in result]
        if unknown:
            print(f"error: --replicates {setting}: no study named {unknown[0]!r}", file=sys.stderr)
            return 2
        replicates[setting] = {"studies": members, "targets": replicate_stats(result, members)}
        print()
        print("\n".join(_replicate_lines(setting, replicates[setting]["targets"])))
    if args.json:
        studies = {
            n: {
                "targets": r["targets"],
                "best_proxy": r["best_proxy"],
                "best_targets": r["best_targets"],
                "roles": r["summary"].get("roles"),
                "summary_row": r["summary"].get("summary_row"),
                "decisions": r["summary"].get("decisions"),
                "scaled": r["summary"].get("scaled"),
            }
            for n, r in result.items()
        }
        payload: dict = {"studies": studies}
        if replicates:
            payload["replicates"] = replicates
        write_result(args.json, "fidelity", payload, command_line(__file__, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
