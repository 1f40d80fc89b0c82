"""`megablocks-ablate demo`: the built-in end-to-end demo study.

Until the study runner lands (issue: ablation studies end to end) the demo runs the
part of the pipeline that exists: it generates a small synthetic corpus with
metadata, trains a SentencePiece tokenizer on it, preprocesses it into partitions and
base units, and packs a weighted mixture of units into training samples.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the built-in demo study on a synthetic corpus",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--workers", type=int, default=2, help="tokenization worker processes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megablocks_ablate.ablate.demo import run_demo

    return run_demo(args.out, workers=args.workers)
