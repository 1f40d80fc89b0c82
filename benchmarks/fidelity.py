"""Fidelity of the proxies, per role, for finished studies: the figures of docs/fidelity.md.

    python benchmarks/fidelity.py NAME=REPORT_DIR [NAME=REPORT_DIR ...] [--json OUT]

Each REPORT_DIR is a study's ``report/`` (its ``summary.json``, written by ``study
report`` or at the end of ``study run`` / ``demo``). For every study and proxy the
script prints the out-of-domain (per-domain mean and pooled), in-domain (the mixtures'
own held-out sets, ``ID``, and all in-domain points pooled) and all-domain figures,
Pearson and Spearman, and the median seq rank of the proxy's first pick (paper A.5),
then checks the targets of the fidelity issue:

* out of domain: per-domain mean Pearson(headline proxy, seq) >= 0.93 and pooled >= 0.93;
* the headline proxy beats mean_ind by >= 0.1 on both;
* all-domain per-domain mean >= 0.93.

Figures are read, not recomputed: they are exactly what the study's report shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megablocks_ablate.utils.benchmark_result import check_writable, command_line, write_result

ROLE_CELLS = [  # (column, role, statistic)
    ("OOD mean", "ood", "mean"),
    ("OOD pooled", "ood", "pooled"),
    ("ID", "id", "row"),
    ("ID pooled", "id", "pooled"),
    ("all mean", "all", "mean"),
    ("all pooled", "all", "pooled"),
]
TARGET = 0.93
MARGIN = 0.1


def _r(summary: dict, proxy: str, role: str, stat: str, method: str) -> float | None:
    cell = summary.get("roles", {}).get(proxy, {}).get(role, {}).get(stat, {}).get(method, {})
    return cell.get("r")


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
        rank = summary.get("best_true_rank", {}).get(proxy, {}).get("ood", {})
        median = rank.get("median")
        label = f"**{proxy}**" if proxy == summary.get("primary") else proxy
        rows.append([name, label, *cells, "-" if median is None else f"{median:g}"])
    return rows


def targets(summary: dict) -> dict[str, tuple[float | None, bool]]:
    """The issue's targets for the headline proxy: name -> (value, met)."""
    p = summary.get("primary")

    def r(role: str, stat: str, proxy: str | None = p) -> float | None:
        return _r(summary, proxy or "", role, stat, "pearson")

    def gap(stat: str) -> float | None:
        a, b = r("ood", stat), r("ood", stat, "mean_ind")
        return None if a is None or b is None else a - b

    out = {
        "OOD mean >= 0.93": (r("ood", "mean"), TARGET),
        "OOD pooled >= 0.93": (r("ood", "pooled"), TARGET),
        "OOD mean - mean_ind >= 0.1": (gap("mean"), MARGIN),
        "OOD pooled - mean_ind >= 0.1": (gap("pooled"), MARGIN),
        "all-domain mean >= 0.93": (r("all", "mean"), TARGET),
    }
    return {k: (v, v is not None and v >= t) for k, (v, t) in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="+", help="NAME=REPORT_DIR")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.json:
        check_writable(args.json, "fidelity")
    header = ["study", "proxy", *(c for c, _, _ in ROLE_CELLS), "A.5 median rank (OOD)"]
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
        result[name] = {"summary": summary, "targets": targets(summary)}
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
    if args.json:
        studies = {
            n: {"targets": r["targets"], "roles": r["summary"].get("roles")}
            for n, r in result.items()
        }
        write_result(args.json, "fidelity", {"studies": studies}, command_line(__file__, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
