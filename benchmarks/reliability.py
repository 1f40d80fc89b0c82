"""How reliable are the two sides of a fidelity figure? Retrain one side, compare.

    python benchmarks/reliability.py STUDY_DIR [--seq-retrained STUDY_DIR]
        [--units-retrained STUDY_DIR] [--json OUT]

``STUDY_DIR`` is a finished study (A). ``--seq-retrained`` is the same study with its seq
models trained again under another data order (``validation.train.overrides:
[data.seed=7]`` and another ``out_dir``; seed and unit models the same);
``--units-retrained`` the same study with its unit models trained again that way
(``data.seed=7`` in ``unit.overrides``; the seq models can be reused by hard-linking A's
``seq/`` into the new ``out_dir``). Per evaluation domain, over the domain's
out-of-domain mixtures, it prints:

* merged vs seq in A (the figure docs/fidelity.md reports);
* seq A vs seq B: the seq reference's test-retest reliability;
* merged A vs merged B: the merge's own (the unit models' data order);
* with both, the attenuation ceiling sqrt(seq reliability x merge reliability): the most
  merged vs seq can read when the two would agree perfectly without that noise;

then the per-domain means (of defined coefficients) and the pooled coefficients.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate.analysis import ROLE_OOD, SEQ
from megablocks_ablate.ablate.store import StoreError, read_study_table
from megablocks_ablate.utils.benchmark_result import check_writable, command_line, write_result

PROXY = "merged"
COLUMNS = {  # key -> printed header
    "merged_vs_seq": "merged vs seq (A)",
    "seq_a_vs_seq_b": "seq A vs seq B",
    "merged_a_vs_merged_b": "merged A vs merged B",
    "ceiling": "ceiling",
}


def load(path: str) -> an.ResultTable:
    try:
        return read_study_table(path)
    except StoreError as e:
        raise SystemExit(f"error: {e}") from None


def defined_mean(values: list[float]) -> float:
    """Mean of the defined coefficients (an.pearson gives NaN for a constant input: no
    coefficient, so it is left out, not averaged in); NaN when none is defined."""
    got = [v for v in values if not math.isnan(v)]
    return float(np.mean(got)) if got else math.nan


def ceiling(seq_rel: float, merged_rel: float) -> float:
    """sqrt(r_ss * r_mm): the expected merged vs seq coefficient if the two agreed exactly
    apart from their own retraining noise (undefined unless both are positive)."""
    if math.isnan(seq_rel) or math.isnan(merged_rel) or seq_rel <= 0 or merged_rel <= 0:
        return math.nan
    return math.sqrt(seq_rel * merged_rel)


def reliability(
    a: an.ResultTable, seq_b: an.ResultTable | None = None, units_b: an.ResultTable | None = None
) -> dict:
    """Per domain, over its out-of-domain mixtures present in every table given: the
    coefficients of :data:`COLUMNS` (absent where the retrained study is not given)."""
    if seq_b is None and units_b is None:
        raise SystemExit("error: give --seq-retrained and/or --units-retrained")
    rows: dict[str, dict[str, float]] = {}
    pooled: dict[str, list[list[float]]] = {k: [[], []] for k in COLUMNS if k != "ceiling"}
    for d in a.domains:
        ids, merged, seq = a.paired(PROXY, d, ROLE_OOD)
        other_seq = seq_b.get(SEQ, d) if seq_b is not None else None
        other_merged = units_b.get(PROXY, d) if units_b is not None else None
        keep = [
            i
            for i, m in enumerate(ids)
            if (other_seq is None or m in other_seq) and (other_merged is None or m in other_merged)
        ]
        if len(keep) < an.MIN_POINTS:  # no coefficient from fewer points (the report's rule)
            continue
        merged_a = [float(merged[i]) for i in keep]
        seq_a = [float(seq[i]) for i in keep]
        pairs = {"merged_vs_seq": (merged_a, seq_a)}
        if other_seq is not None:
            pairs["seq_a_vs_seq_b"] = (seq_a, [other_seq[ids[i]] for i in keep])
        if other_merged is not None:
            pairs["merged_a_vs_merged_b"] = (merged_a, [other_merged[ids[i]] for i in keep])
        row: dict[str, float] = {"n": len(keep)}
        for k, (x, y) in pairs.items():
            row[k] = an.pearson(x, y)
            pooled[k][0] += x
            pooled[k][1] += y
        if "seq_a_vs_seq_b" in row and "merged_a_vs_merged_b" in row:
            row["ceiling"] = ceiling(row["seq_a_vs_seq_b"], row["merged_a_vs_merged_b"])
        rows[d] = row
    if not rows:
        raise SystemExit("error: the studies share no out-of-domain seq mixtures")
    keys = [k for k in COLUMNS if any(k in r for r in rows.values())]
    return {
        "proxy": PROXY,
        "columns": keys,
        "domains": rows,
        "mean": {k: defined_mean([r[k] for r in rows.values() if k in r]) for k in keys},
        "pooled": {k: an.pearson(*pooled[k]) for k in keys if k != "ceiling" and pooled[k][0]},
    }


def _f(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", help="STUDY_DIR: the study (A)")
    ap.add_argument("--seq-retrained", help="STUDY_DIR: A with its seq models retrained")
    ap.add_argument("--units-retrained", help="STUDY_DIR: A with its unit models retrained")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.json:
        check_writable(args.json, "reliability")
    res = reliability(
        load(args.study),
        load(args.seq_retrained) if args.seq_retrained else None,
        load(args.units_retrained) if args.units_retrained else None,
    )
    keys = res["columns"]
    print("| domain | OOD mixtures | " + " | ".join(COLUMNS[k] for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for d, r in res["domains"].items():
        print(f"| {d} | {r['n']} | " + " | ".join(_f(r.get(k, math.nan)) for k in keys) + " |")
    print("| per-domain mean | | " + " | ".join(_f(res["mean"][k]) for k in keys) + " |")
    print("pooled: " + ", ".join(f"{COLUMNS[k]} {_f(v)}" for k, v in res["pooled"].items()))
    if args.json:
        write_result(args.json, "reliability", res, command_line(__file__, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
