"""`megablocks-ablate index`: inspect, validate and concatenate indexed datasets.

  index info PREFIX                       summary JSON with sequence-length statistics
  index validate PREFIX [PREFIX ...]      exit 0 if every dataset is valid, else 2
        [--tokenizer PATH | --manifest DIR]  ... and every token id is below the vocabulary
                                          size (with --manifest and no PREFIX: its units,
                                          and its held-out files against their sha256)
  index concat --out OUT PREFIX [...]     concatenate datasets of one dtype into OUT

PREFIX may be given with or without its .idx/.bin suffix.
"""

from __future__ import annotations

import argparse
import json
import os
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
    val.add_argument("prefixes", nargs="*", metavar="PREFIX")
    val.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="also check every token id is below this tokenizer's vocabulary size",
    )
    val.add_argument(
        "--manifest",
        metavar="DIR",
        help="also check token ids against the vocabulary size this preprocess output "
        "records; without PREFIX, validate every unit it lists",
    )
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


def _manifest_vocab(directory: str) -> tuple[int, list[str]]:
    """The vocabulary size a preprocess manifest records, and its units' prefixes."""
    from megablocks_ablate.data.manifest import MANIFEST_NAME, Manifest
    from megablocks_ablate.errors import DataFormatError

    m = Manifest.load(directory)
    vocab = m.data["tokenizer"].get("vocab_size") if isinstance(m.data["tokenizer"], dict) else None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise DataFormatError(
            f"{m.root}/{MANIFEST_NAME}: tokenizer.vocab_size is {vocab!r}; expected a "
            "positive integer"
        )
    return vocab, [m.unit_prefix(u) for u in m.units]


def _validate_vocab(args: argparse.Namespace) -> tuple[int | None, list[str]]:
    """(vocabulary size to check ids against or None, prefixes to validate)."""
    from megablocks_ablate.data.indexed import strip_suffix
    from megablocks_ablate.errors import ConfigError

    vocab, prefixes = None, [strip_suffix(p) for p in args.prefixes]
    if args.manifest:
        vocab, units = _manifest_vocab(args.manifest)
        prefixes = prefixes or units
    if args.tokenizer:
        from megablocks_ablate.data.tokenizer import load_tokenizer

        tok_vocab = load_tokenizer(args.tokenizer).vocab_size
        if vocab is not None and tok_vocab != vocab:
            raise ConfigError(
                f"--tokenizer {args.tokenizer} has {tok_vocab} ids but --manifest "
                f"{args.manifest} records a vocabulary of {vocab}; give one of them"
            )
        vocab = tok_vocab
    if not prefixes:
        raise ConfigError("index validate: give PREFIX(es) to check, or --manifest DIR")
    return vocab, prefixes


def run_validate(args: argparse.Namespace) -> int:
    from megablocks_ablate.data.indexed import validate_indexed
    from megablocks_ablate.errors import DataFormatError

    vocab, prefixes = _validate_vocab(args)
    failed = 0
    for prefix in prefixes:
        try:
            s = validate_indexed(prefix, vocab_size=vocab)
        except DataFormatError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
            continue
        ids = f", ids < {vocab}" if vocab is not None else ""
        print(
            f"ok {prefix}: {s['sequences']} sequences, {s['documents']} documents, "
            f"{s['tokens']} tokens, {s['dtype']}{ids}"
        )
    checked = len(prefixes)
    if args.manifest and not args.prefixes:  # the whole manifest: its held-out files too
        bad, n = _validate_heldout(args.manifest)
        failed, checked = failed + bad, checked + n
    if failed:
        print(f"{failed} of {checked} datasets invalid", file=sys.stderr)
        return 2
    return 0


def _validate_heldout(directory: str) -> tuple[int, int]:
    """Check each held-out file the manifest lists (every partition's and, when units are
    partitions, every unit's) against its recorded sha256; (failed, checked)."""
    from megablocks_ablate.data.manifest import MANIFEST_NAME, Manifest
    from megablocks_ablate.errors import DataFormatError
    from megablocks_ablate.utils.verify import verify_sha256

    m = Manifest.load(directory)
    files = m.heldout_files()
    failed = 0
    for what, rec in files:
        path = os.path.join(m.root, rec["path"])
        where = f"{what} in {m.root}/{MANIFEST_NAME}"
        try:
            if not os.path.isfile(path):
                raise DataFormatError(f"{path}: missing ({where})")
            verify_sha256(path, rec["sha256"], where, "preprocess the data again")
        except DataFormatError as e:
            failed += 1
            print(f"error: {e}", file=sys.stderr)
            continue
        print(f"ok {path}: {what}, {rec.get('documents', '?')} documents, sha256 as recorded")
    return failed, len(files)


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
