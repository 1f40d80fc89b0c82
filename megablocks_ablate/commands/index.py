"""`megablocks-ablate index`: inspect, validate and concatenate indexed datasets.

  index info PREFIX                       summary JSON with sequence-length statistics
  index validate PREFIX [PREFIX ...]      exit 0 if every dataset is valid, else 2
        [--tokenizer PATH | --manifest DIR]  ... and every token id is below the vocabulary
                                          size (with --manifest: each unit's .bin/.idx
                                          against the size and sha256 it records; with no
                                          PREFIX, all its units and held-out files)
  index concat --out OUT PREFIX [...]     concatenate datasets of one dtype into OUT

PREFIX may be given with or without its .idx/.bin suffix.

concat writes OUT.bin and OUT.idx (built beside them and renamed into place once
complete). Each is claimed first (utils/output_files.py): a new path is written; an
existing file is replaced only when an earlier `index concat` wrote it (recorded in a
sidecar .OUT.bin.megablocks-ablate.json) and --overwrite is given; an input dataset, a
unit of a preprocess output or any other dataset or file concat did not write is refused,
naming it, with nothing changed. Two concats into one OUT at once: the second is refused.
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
        "records, and its units' .bin/.idx against the sizes and sha256 it records; "
        "without PREFIX, validate every unit and held-out file it lists",
    )
    val.set_defaults(func=run_validate)

    cat = isub.add_parser("concat", help="concatenate datasets (same dtype) into one")
    cat.add_argument(
        "--out",
        required=True,
        metavar="OUT",
        help="output prefix: writes OUT.bin and OUT.idx (never over an input or a dataset "
        "concat did not write)",
    )
    cat.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT.bin/.idx when an earlier `index concat` wrote them",
    )
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
    recorded = _recorded_unit_files(args.manifest) if args.manifest else {}
    failed = 0
    for prefix in prefixes:
        unit = recorded.get(os.path.realpath(prefix))
        problems = _unit_file_problems(prefix, *unit) if unit else []
        try:
            s = validate_indexed(prefix, vocab_size=vocab)
        except DataFormatError as e:
            problems.append(str(e))
        if problems:
            failed += 1
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            continue
        ids = f", ids < {vocab}" if vocab is not None else ""
        hashes = ", .bin/.idx hashes match the manifest" if unit else ""
        print(
            f"ok {prefix}: {s['sequences']} sequences, {s['documents']} documents, "
            f"{s['tokens']} tokens, {s['dtype']}{ids}{hashes}"
        )
    checked = len(prefixes)
    if args.manifest and not args.prefixes:  # the whole manifest: its held-out files too
        bad, n = _validate_heldout(args.manifest)
        failed, checked = failed + bad, checked + n
    if failed:
        print(f"{failed} of {checked} datasets invalid", file=sys.stderr)
        return 2
    return 0


def _recorded_unit_files(directory: str) -> dict[str, tuple[str, dict, str]]:
    """Each unit of the manifest in ``directory`` by its prefix's real path: (what, its
    record, the manifest file), for :func:`_unit_file_problems`."""
    from megablocks_ablate.data.manifest import MANIFEST_NAME, Manifest

    m = Manifest.load(directory)
    where = os.path.join(m.root, MANIFEST_NAME)
    return {
        os.path.realpath(m.unit_prefix(u)): (f"unit {u!r}", info, where)
        for u, info in m.units.items()
    }


def _recorded_file_problem(path: str, rec: object, what: str, where: str) -> str | None:
    """Why ``path`` is not the file ``rec`` (``{"bytes"?, "sha256"}``) records for
    ``what`` in ``where``; None when it is. Hashed afresh: validation reads every byte
    anyway, and a cached hash would trust a file rewritten with its old stamp."""
    from megablocks_ablate.utils.hashing import sha256_file

    expected = rec.get("sha256") if isinstance(rec, dict) else None
    if not isinstance(expected, str):
        return f"{path}: {where} records no sha256 for it ({what})"
    if not os.path.isfile(path):
        return f"{path}: missing ({what} in {where})"
    size = os.path.getsize(path)
    if isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and size != rec["bytes"]:
        return f"{path}: {size} bytes, {where} records {rec['bytes']} ({what})"
    actual = sha256_file(path)
    if actual != expected:
        return (
            f"{path}: sha256 {actual[:16]}... differs from the {expected[:16]}... recorded for "
            f"{what} in {where}: the file changed after it was written; preprocess the data again"
        )
    return None


def _unit_file_problems(prefix: str, what: str, info: dict, where: str) -> list[str]:
    """Each of a unit's ``.bin``/``.idx`` that differs from the manifest's size or sha256."""
    found = (
        _recorded_file_problem(f"{prefix}.{ext}", info.get(ext), f"{what}'s .{ext}", where)
        for ext in ("bin", "idx")
    )
    return [p for p in found if p]


def _validate_heldout(directory: str) -> tuple[int, int]:
    """Check each held-out file the manifest lists (every partition's and, when units are
    partitions, every unit's) against its recorded sha256; (failed, checked)."""
    from megablocks_ablate.data.manifest import MANIFEST_NAME, Manifest

    m = Manifest.load(directory)
    files = m.heldout_files()
    failed = 0
    for what, rec in files:
        path = os.path.join(m.root, rec["path"])
        problem = _recorded_file_problem(path, rec, what, os.path.join(m.root, MANIFEST_NAME))
        if problem:
            failed += 1
            print(f"error: {problem}", file=sys.stderr)
            continue
        print(f"ok {path}: {what}, {rec.get('documents', '?')} documents, sha256 as recorded")
    return failed, len(files)


CONCAT_KIND = "index-concat"  # what its output files' sidecars record


def run_concat(args: argparse.Namespace) -> int:
    from megablocks_ablate.data.indexed import (
        concat_indexed,
        data_file_path,
        index_file_path,
        strip_suffix,
        validate_indexed,
    )
    from megablocks_ablate.utils.output_files import (
        check_output_file,
        output_lock,
        staged_output_files,
    )

    out = strip_suffix(args.out)
    prefixes = [strip_suffix(p) for p in args.prefixes]
    outs = [data_file_path(out), index_file_path(out)]
    inputs = [f for p in prefixes for f in (data_file_path(p), index_file_path(p))]
    claim = {"overwrite": args.overwrite, "inputs": inputs}
    for path in outs:  # every refusal before the first write
        check_output_file(path, CONCAT_KIND, **claim)
    with (
        output_lock(out, f"index concat --out {out}"),
        staged_output_files(outs, CONCAT_KIND, **claim) as tmps,
    ):
        concat_indexed(prefixes, strip_suffix(tmps[0]))
    s = validate_indexed(out)
    print(
        f"wrote {out}.bin/.idx: {s['sequences']} sequences, {s['documents']} documents, "
        f"{s['tokens']} tokens, {s['dtype']}"
    )
    return 0
