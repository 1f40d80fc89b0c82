"""`megablocks-ablate demo`: a complete small data-ablation study on CPU, no download.

Builds a corpus from this machine's Python standard library (``--builtin manpages``:
English prose from its manual pages and package docs, with 3 out-of-domain evaluation
sets; or takes yours with ``--corpus``), trains a tokenizer, preprocesses it into
partitions and base units, trains a seed model, one unit model per partition and a
few seq validation models, scores every k-subset of the partitions by merging unit
models in memory, and writes a report (correlation of the merged proxies with the seq
models, rankings, cost).
Rerunning continues where a killed run stopped. The study it runs is written to
``<out>/study.yaml``: edit it and continue with ``megablocks-ablate study run``.
"""

from __future__ import annotations

import argparse

from megablocks_ablate.utils import cli_types as ct

MANPAGES_OUT = "demo_manpages_out"
PROPORTIONS_PARTITIONS = 4  # demo --proportions: seq models of 4 units' budget each


def _corpus_args(p: argparse.ArgumentParser, d) -> None:
    """--out, --builtin and --eval-extra."""
    from megablocks_ablate.ablate.demo import BUILTINS

    p.add_argument(
        "--out",
        default=None,
        help=f"output directory (default: {d.out}; with --builtin manpages: {MANPAGES_OUT})",
    )
    p.add_argument(
        "--builtin",
        choices=BUILTINS,
        default=d.builtin,
        help="built-in corpus: stdlib (Python standard library: prose and code, the "
        "default) or manpages (English prose of the manual pages and /usr/share/doc, plus "
        "3 out-of-domain evaluation sets)",
    )
    p.add_argument(
        "--eval-extra",
        action="append",
        default=[],
        metavar="PATH_OR_NAME=PATH",
        help="another evaluation set (JSONL file, directory or glob; domain = file stem, "
        "or NAME=PATH), added to the study's eval.extra; repeatable",
    )


def _budget_args(p: argparse.ArgumentParser, d) -> None:
    """--unit-tokens, --unit-passes and --seed-tokens."""
    p.add_argument(
        "--unit-tokens",
        default=d.unit_tokens,
        type=ct.count_text(1),
        help=f"base unit size = unit-model budget (default: {d.unit_tokens})",
    )
    p.add_argument(
        "--unit-passes",
        type=ct.positive_int,
        default=d.unit_passes,
        help="passes over its base unit per unit model: the unit budget is "
        f"passes x --unit-tokens, a seq model's k x that (default: {d.unit_passes}; "
        "the paper: ~3.5)",
    )
    p.add_argument(
        "--seed-tokens",
        default=d.seed_tokens,
        type=ct.count_text(1),
        help=f"seed-model budget (default: {d.seed_tokens})",
    )


def _proportions_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--proportions",
        action="store_true",
        help="instead: check weighted merges against seq models trained on sampled "
        "partition proportions, and the blend `study optimize` proposes (on the first 4 "
        "partitions unless --max-partitions; out dir demo_proportions_out; "
        "docs/proportions.md)",
    )


def _study_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument(
        "--k", type=ct.positive_int, default=d.k, help=f"partitions per mixture (default: {d.k})"
    )
    p.add_argument(
        "--n-seq",
        type=ct.nonneg_int,
        default=d.n_seq,
        help=f"seq validation models (default: {d.n_seq})",
    )
    p.add_argument(
        "--proxies",
        type=ct.nonempty_csv,  # the names are checked by DemoSettings
        default=",".join(d.proxies),
        help=f"proxies the study scores, comma-separated (default: {','.join(d.proxies)}; "
        "add merged to see the paper's plain merge beside the Fisher merge, ~50 s more)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    from megablocks_ablate.ablate.demo import MANPAGES_HELDOUT_FRACTION, DemoSettings

    d = DemoSettings()
    p = sub.add_parser(
        "demo",
        help="run the built-in demo study (stdlib corpus, CPU, ~10 min)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _corpus_args(p, d)
    p.add_argument(
        "--corpus",
        help="your JSONL corpus (.jsonl/.gz/.zst) with a metadata field "
        "naming each document's partition, instead of the built-in one",
    )
    p.add_argument(
        "--partition-by",
        default=d.partition_by,
        help=f"metadata field defining partitions (default: {d.partition_by})",
    )
    p.add_argument(
        "--order-by",
        default=None,
        help="field ordering documents into base units (built-in corpus: order)",
    )
    p.add_argument(
        "--seed-corpus",
        help="JSONL for the seed model (default: the built-in "
        "'general' text; with --corpus: the whole corpus)",
    )
    _budget_args(p, d)
    _study_args(p, d)
    p.add_argument(
        "--max-partitions",
        type=ct.positive_int,
        default=None,
        help="use only the first N partitions (a smaller, faster study)",
    )
    p.add_argument(
        "--preset",
        default=d.preset,
        help=f"train presets configs/train/<preset>_{{seed,unit,seq}}.yaml (default: {d.preset})",
    )
    p.add_argument(
        "--heldout-fraction",
        type=ct.fraction_from_zero,
        default=None,
        help=f"documents held out per partition as its evaluation domain (default: "
        f"{d.heldout_fraction}; with --builtin manpages {MANPAGES_HELDOUT_FRACTION}; "
        "raise it for a small corpus)",
    )
    p.add_argument(
        "--vocab-size",
        type=ct.positive_int,
        default=d.vocab_size,
        help=f"tokenizer pieces (default: {d.vocab_size})",
    )
    p.add_argument(
        "--workers",
        type=ct.positive_int,
        default=d.workers,
        help="worker processes for preprocessing and, on CPU, for training the unit and "
        f"seq models and scoring them side by side (default: {d.workers})",
    )
    _proportions_args(p)
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides of every train config (e.g. seq_len=128)"
    )
    p.set_defaults(func=run)


def settings(args: argparse.Namespace):
    """The :class:`DemoSettings` the parsed arguments ask for."""
    from megablocks_ablate.ablate.demo import MANPAGES_HELDOUT_FRACTION, DemoSettings

    manpages = args.builtin == "manpages" and not args.corpus
    out = args.out  # each built-in corpus has its own default directory and held-out share
    if out is None:
        out = MANPAGES_OUT if manpages else DemoSettings.out
        if getattr(args, "proportions", False):
            out = out.replace("_out", "_proportions_out")
    heldout = args.heldout_fraction
    if heldout is None:
        heldout = MANPAGES_HELDOUT_FRACTION if manpages else DemoSettings.heldout_fraction
    return DemoSettings(
        out=out,
        corpus=args.corpus,
        seed_corpus=args.seed_corpus,
        partition_by=args.partition_by,
        order_by=args.order_by,
        vocab_size=args.vocab_size,
        heldout_fraction=heldout,
        unit_tokens=args.unit_tokens,
        unit_passes=args.unit_passes,
        seed_tokens=args.seed_tokens,
        k=args.k,
        n_seq=args.n_seq,
        preset=args.preset,
        train_overrides=list(args.overrides),
        workers=args.workers,
        max_partitions=args.max_partitions
        or (PROPORTIONS_PARTITIONS if getattr(args, "proportions", False) else None),
        builtin=args.builtin,
        eval_extra=list(args.eval_extra),
        proxies=[t.strip() for t in args.proxies.split(",")],
    )


def run(args: argparse.Namespace) -> int:
    from megablocks_ablate.ablate.demo import run_demo

    if args.proportions:
        from megablocks_ablate.ablate.demo_proportions import run_proportions_demo

        return run_proportions_demo(settings(args))
    return run_demo(settings(args))
