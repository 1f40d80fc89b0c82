"""How reliable is the seq reference itself? Compare two sets of seq models of one study.

    python benchmarks/seq_reliability.py A=STUDY_DIR B=STUDY_DIR [--json OUT]

``B`` is the same study with the seq models trained again under another data order
(``validation.train.overrides: [data.seed=7]`` and another ``out_dir``; the seed and unit
models are the same). Per evaluation domain, over that domain's out-of-domain mixtures,
it prints Pearson(seq A, seq B) next to Pearson(merged, seq A) and Pearson(merged,
seq B), then the per-domain means and the pooled seq A vs seq B coefficient: the first
column is the ceiling a proxy can reach against seq models of this design
(docs/fidelity.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate.analysis import ROLE_OOD, SEQ
from megablocks_ablate.ablate.store import ResultStore, store_path
from megablocks_ablate.utils.benchmark_result import check_writable, command_line, write_result


def load(path: str) -> an.ResultTable:
    db = store_path(path)
    if not os.path.isfile(db):
        raise SystemExit(f"error: {path}: expected a study out_dir holding {db}")
    with ResultStore(db) as store:
        return an.build_table(store)


KEYS = ("seq_a_vs_seq_b", "merged_vs_seq_a", "merged_vs_seq_b")


def defined_mean(values: list[float]) -> float:
    """Mean of the defined coefficients (an.pearson gives NaN for a constant input: no
    coefficient, so it is left out, not averaged in); NaN when none is defined."""
    got = [v for v in values if not math.isnan(v)]
    return float(np.mean(got)) if got else math.nan


def reliability(a: an.ResultTable, b: an.ResultTable) -> dict:
    """Per domain: Pearson of seq A vs seq B, merged vs seq A and merged vs seq B over
    the domain's out-of-domain mixtures that both sets validated; then means and pooled."""
    rows: dict[str, dict[str, float]] = {}
    pooled_a: list[float] = []
    pooled_b: list[float] = []
    for d in a.domains:
        ids, merged, seq_a = a.paired("merged", d, ROLE_OOD)
        seq_b_by_m = b.values[SEQ].get(d, {})
        keep = [i for i, m in enumerate(ids) if m in seq_b_by_m]
        if len(keep) < 3:
            continue
        pm = [float(merged[i]) for i in keep]
        sa = [float(seq_a[i]) for i in keep]
        sb = [float(seq_b_by_m[ids[i]]) for i in keep]
        rows[d] = {
            "n": len(keep),
            "seq_a_vs_seq_b": an.pearson(sa, sb),
            "merged_vs_seq_a": an.pearson(pm, sa),
            "merged_vs_seq_b": an.pearson(pm, sb),
        }
        pooled_a += sa
        pooled_b += sb
    if not rows:
        raise SystemExit("error: the two studies share no out-of-domain seq mixtures")
    mean = {k: defined_mean([r[k] for r in rows.values()]) for k in KEYS}
    return {
        "domains": rows,
        "mean": mean,
        "pooled_seq_a_vs_seq_b": an.pearson(pooled_a, pooled_b),
    }


def _f(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="A=STUDY_DIR: the study")
    ap.add_argument("b", help="B=STUDY_DIR: the same study, seq models retrained")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.json:
        check_writable(args.json, "seq_reliability")
    tables = [load(item.partition("=")[2] or item) for item in (args.a, args.b)]
    res = reliability(*tables)
    print("| domain | OOD mixtures | seq A vs seq B | merged vs seq A | merged vs seq B |")
    print("|---|---|---|---|---|")
    for d, r in res["domains"].items():
        print(f"| {d} | {r['n']} | " + " | ".join(_f(r[k]) for k in KEYS) + " |")
    print("| per-domain mean | | " + " | ".join(_f(res["mean"][k]) for k in KEYS) + " |")
    print(f"pooled seq A vs seq B: {_f(res['pooled_seq_a_vs_seq_b'])}")
    if args.json:
        write_result(args.json, "seq_reliability", res, command_line(__file__, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
