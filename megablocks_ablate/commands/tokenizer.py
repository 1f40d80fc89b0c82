"""`megablocks-ablate tokenizer`: train a SentencePiece model, inspect or try a tokenizer.

megablocks-ablate tokenizer train --input 'corpus/*.jsonl.gz' --vocab-size 32000 --out tok
megablocks-ablate tokenizer info tok.model
megablocks-ablate tokenizer encode tok.model "some text"

`train --out PREFIX` writes PREFIX.model and PREFIX.vocab, claimed first
(utils/output_files.py): a new path is written; an existing tokenizer is replaced only
when an earlier `tokenizer train` wrote it (recorded in a sidecar
.PREFIX.model.megablocks-ablate.json) and --overwrite is given. Any other file there (a
tokenizer of yours, an input) is refused, naming it, with nothing changed; so is a
second `tokenizer train` into the same PREFIX while one runs.
"""

from __future__ import annotations

import argparse
import json

from megablocks_ablate.utils import cli_types as ct


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenizer",
        help="train, inspect or try a tokenizer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tsub.required = True

    t = tsub.add_parser("train", help="train a SentencePiece model on a corpus sample")
    t.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="GLOB",
        help="JSONL files (.gz/.zst ok) or plain .txt files; globs are expanded",
    )
    t.add_argument(
        "--vocab-size", type=ct.count(1), required=True, help="pieces, e.g. 32000 or 32k"
    )
    t.add_argument(
        "--out", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab"
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace PREFIX.model/.vocab when an earlier `tokenizer train` wrote them",
    )
    t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    t.add_argument("--text-key", default="text", help="JSONL field holding the text")
    t.add_argument(
        "--max-documents",
        type=ct.count(0),
        default=200_000,
        help="documents in the training sample (default 200000; 0 = all)",
    )
    t.add_argument(
        "--character-coverage",
        type=ct.fraction_to_one,
        default=0.9999,
        help="share of characters the pieces cover, in (0, 1] (default 0.9999)",
    )
    t.add_argument(
        "--no-byte-fallback",
        dest="byte_fallback",
        action="store_false",
        help="map unknown characters to <unk> instead of UTF-8 byte pieces",
    )
    t.add_argument(
        "--threads", type=ct.positive_int, default=2, help="SentencePiece trainer threads"
    )
    t.add_argument("--seed", type=ct.nonneg_int, default=0)
    t.set_defaults(func=run_train)

    i = tsub.add_parser("info", help="print kind, vocab size, EOD id and fingerprint as JSON")
    i.add_argument("path", help="a .model, a tokenizer.json, or a directory with one")
    i.add_argument("--eod-token", default=None, help="token that ends each document")
    i.set_defaults(func=run_info)

    e = tsub.add_parser("encode", help="print the ids of a text as a JSON list")
    e.add_argument("path", help="a .model, a tokenizer.json, or a directory with one")
    e.add_argument("text")
    e.add_argument("--eod-token", default=None, help="token that ends each document")
    e.add_argument("--document", action="store_true", help="append the EOD id")
    e.set_defaults(func=run_encode)


TOKENIZER_KIND = "tokenizer"


def run_train(args: argparse.Namespace) -> int:
    from megablocks_ablate.data.jsonl import expand_inputs
    from megablocks_ablate.data.tokenizer import load_tokenizer, train_sentencepiece
    from megablocks_ablate.utils.output_files import (
        check_output_file,
        output_lock,
        staged_output_files,
    )

    prefix = args.out[: -len(".model")] if args.out.endswith(".model") else args.out
    outs = [prefix + ".model", prefix + ".vocab"]
    claim = {"overwrite": args.overwrite, "inputs": expand_inputs(args.input)}
    for path in outs:  # every refusal before any work
        check_output_file(path, TOKENIZER_KIND, **claim)
    with (
        output_lock(prefix, f"tokenizer train --out {prefix}"),
        staged_output_files(outs, TOKENIZER_KIND, **claim) as tmps,
    ):
        train_sentencepiece(
            args.input,
            tmps[0],
            args.vocab_size,
            model_type=args.model_type,
            text_key=args.text_key,
            max_documents=args.max_documents or None,
            character_coverage=args.character_coverage,
            byte_fallback=args.byte_fallback,
            num_threads=args.threads,
            seed=args.seed,
        )
    model = outs[0]
    tok = load_tokenizer(model)
    print(model)
    print(f"fingerprint {tok.fingerprint}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from megablocks_ablate.data.tokenizer import load_tokenizer

    print(json.dumps(load_tokenizer(args.path, args.eod_token).describe(), indent=2))
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from megablocks_ablate.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.path, args.eod_token)
    ids = tok.encode_document(args.text) if args.document else tok.encode(args.text)
    print(json.dumps(ids))
    return 0
