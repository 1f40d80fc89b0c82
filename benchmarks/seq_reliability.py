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
import json
import os
import sys

import numpy as np

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate.analysis import ROLE_OOD, SEQ
from megablocks_ablate.ablate.store import ResultStore, store_path


def load(path: str) -> an.ResultTable:
    db = store_path(path)
    if not os.path.isfile(db):
        raise SystemExit(f"error: {path}: expected a study out_dir holding {db}")
    with ResultStore(db) as store:
        return an.build_table(store)


def pearson(x: list[float], y: list[float]) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def reliability(a: an.ResultTable, b: an.ResultTable, proxy: str = "merged") -> dict:
    """Per domain: Pearson of seq A vs seq B, proxy vs seq A and proxy vs seq B over the
    domain's out-of-domain mixtures that both sets validated; then means and pooled."""
    rows: dict[str, dict[str, float]] = {}
    pooled_a: list[float] = []
    pooled_b: list[float] = []
    for d in a.domains:
        ids, proxy_v, seq_a = a.paired(proxy, d, ROLE_OOD)
        seq_b_by_m = b.values[SEQ].get(d, {})
        keep = [i for i, m in enumerate(ids) if m in seq_b_by_m]
        if len(keep) < 3:
            continue
        pa = [float(proxy_v[i]) for i in keep]
        sa = [float(seq_a[i]) for i in keep]
        sb = [float(seq_b_by_m[ids[i]]) for i in keep]
        rows[d] = {
            "n": len(keep),
            "seq_a_vs_seq_b": pearson(sa, sb),
            f"{proxy}_vs_seq_a": pearson(pa, sa),
            f"{proxy}_vs_seq_b": pearson(pa, sb),
        }
        pooled_a += sa
        pooled_b += sb
    if not rows:
        raise SystemExit("error: the two studies share no out-of-domain seq mixtures")
    keys = ("seq_a_vs_seq_b", f"{proxy}_vs_seq_a", f"{proxy}_vs_seq_b")
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}
    return {"domains": rows, "mean": mean, "pooled_seq_a_vs_seq_b": pearson(pooled_a, pooled_b)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="A=STUDY_DIR: the study")
    ap.add_argument("b", help="B=STUDY_DIR: the same study, seq models retrained")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    tables = [load(item.partition("=")[2] or item) for item in (args.a, args.b)]
    res = reliability(*tables)
    print("| domain | OOD mixtures | seq A vs seq B | merged vs seq A | merged vs seq B |")
    print("|---|---|---|---|---|")
    for d, r in res["domains"].items():
        print(
            f"| {d} | {r['n']} | {r['seq_a_vs_seq_b']:.3f} | {r['merged_vs_seq_a']:.3f} "
            f"| {r['merged_vs_seq_b']:.3f} |"
        )
    m = res["mean"]
    print(
        f"| per-domain mean | | {m['seq_a_vs_seq_b']:.3f} | {m['merged_vs_seq_a']:.3f} "
        f"| {m['merged_vs_seq_b']:.3f} |"
    )
    print(f"pooled seq A vs seq B: {res['pooled_seq_a_vs_seq_b']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
