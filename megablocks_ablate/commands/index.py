"""`megablocks-ablate index`: inspect, validate and concatenate indexed datasets.

  index info PREFIX                       summary JSON with sequence-length statistics
  index validate PREFIX [PREFIX ...]      exit 0 if every dataset is valid, else 2
  index concat --out OUT PREFIX [...]     concatenate datasets of one dtype into OUT

PREFIX may be given with or without its .idx/.bin suffix.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="inspect, validate and concatenate indexed datasets (.bin/.idx)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    isub = p.add_subparsers(dest="index_command", metavar="ACTION")
    isub.required = True

    info = isub.add_parser("info", help="print a summary of one dataset as JSON")
    info.add_argument("prefix", metavar="PREFIX")
    info.set_defaults(func=run_info)

    val = isub.add_parser("validate", help="check datasets fully; exit 2 if any is invalid")
    val.add_argument("prefixes", nargs="+", metavar="PREFIX")
    val.set_defaults(func=run_validate)

    cat = isub.add_parser("concat", help="concatenate datasets (same dtype) into one")
    cat.add_argument("--out", required=True, metavar="OUT", help="output prefix")
    cat.add_argument("prefixes", nargs="+", metavar="PREFIX")
    cat.set_defaults(func=run_concat)


def run_info(args: argparse.Namespace) -> int:
    import numpy as np

    from megablocks_ablate.data.indexed import IndexedDataset, strip_suffix

    prefix = strip_suffix(args.prefix)
    with IndexedDataset(prefix) as ds:
        lengths = ds.sequence_lengths
        summary = {
            "prefix": prefix,
            "sequences": len(ds),
            "documents": ds.num_documents,
            "tokens": ds.num_tokens,
            "dtype": ds.dtype.name,
        }
        if len(lengths):
            summary["sequence_length"] = {
                "min": int(lengths.min()),
                "max": int(lengths.max()),
                "mean": round(float(lengths.mean(dtype=np.float64)), 3),
                "median": float(np.median(lengths)),
                "p99": float(np.percentile(lengths, 99)),
            }
        del lengths
    print(json.dumps(summary, indent=2))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from megablocks_ablate.data.indexed import strip_suffix, validate_indexed
    from megablocks_ablate.errors import DataFormatError

    failed = 0
    for raw in args.prefixes:
        prefix = strip_suffix(raw)
        try:
            s = validate_indexed(prefix)
        except DataFormatError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
            continue
        print(
            f"ok {prefix}: {s['sequences']} sequences, {s['documents']} documents, "
            f"{s['tokens']} tokens, {s['dtype']}"
        )
    if failed:
        print(f"{failed} of {len(args.prefixes)} datasets invalid", file=sys.stderr)
        return 2
    return 0


def run_concat(args: argparse.Namespace) -> int:
    from megablocks_ablate.data.indexed import concat_indexed, strip_suffix, validate_indexed

    out = strip_suffix(args.out)
    concat_indexed([strip_suffix(p) for p in args.prefixes], out)
    s = validate_indexed(out)
    print(
        f"wrote {out}.bin/.idx: {s['sequences']} sequences, {s['documents']} documents, "
        f"{s['tokens']} tokens, {s['dtype']}"
    )
    return 0
