"""Which partitions does the merge misjudge? Residuals of seq against the merged proxy.

    python benchmarks/merge_residuals.py STUDY_DIR [--proxy merged] [--json OUT]

Per evaluation domain, over its out-of-domain mixtures, fit log seq = a + b log proxy
(least squares) and average the residuals of the mixtures that hold each partition, as
100 x log(seq / fitted): about percent of perplexity. A negative cell: mixtures with
that partition make seq models better on that domain than the proxy predicts (the merge
undervalues the partition there); positive: worse. A partition whose cells share one sign across
domains is one the merge and seq models treat differently (docs/fidelity.md).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate.analysis import ROLE_OOD
from megablocks_ablate.ablate.store import StoreError, read_study_table
from megablocks_ablate.utils.benchmark_result import check_writable, command_line, write_result


def load(path: str) -> an.ResultTable:
    try:
        return read_study_table(path)
    except StoreError as e:
        raise SystemExit(f"error: {e}") from None


def residuals(table: an.ResultTable, proxy: str = "merged") -> dict[str, dict[str, float]]:
    """domain -> partition -> mean residual (100 x log(seq / fitted), ~ percent) of the
    domain's out-of-domain mixtures holding that partition."""
    out: dict[str, dict[str, float]] = {}
    for d in table.domains:
        ids, prox, seq = table.paired(proxy, d, ROLE_OOD)
        if len(ids) < 3:
            continue
        x, y = np.log(prox), np.log(seq)
        design = np.vstack([x, np.ones_like(x)]).T
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        rel = (y - design @ coef) * 100.0
        by_part: dict[str, list[float]] = {}
        for i, m in enumerate(ids):
            for p in table.mixtures[m].names:
                by_part.setdefault(p, []).append(float(rel[i]))
        out[d] = {p: float(np.mean(v)) for p, v in sorted(by_part.items())}
    if not out:
        raise SystemExit(f"error: no domain has 3 out-of-domain mixtures with {proxy} and seq")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", help="STUDY_DIR (holding results.sqlite)")
    ap.add_argument("--proxy", default="merged")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.json:
        check_writable(args.json, "merge_residuals")
    res = residuals(load(args.study), args.proxy)
    parts = sorted({p for row in res.values() for p in row})
    print("| domain | " + " | ".join(parts) + " |")
    print("|---|" + "---|" * len(parts))
    for d, row in res.items():
        cells = [f"{row[p]:+.1f}" if p in row else "" for p in parts]
        print(f"| {d} | " + " | ".join(cells) + " |")
    if args.json:
        write_result(
            args.json,
            "merge_residuals",
            {"proxy": args.proxy, "domains": res},
            command_line(__file__, argv),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
