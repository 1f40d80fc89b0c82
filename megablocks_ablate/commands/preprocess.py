"""`megablocks-ablate preprocess`: JSONL corpora -> partitions, base units, manifest.

Settings come from (lowest to highest precedence) the defaults, ``--config FILE.yaml``,
the flags below, and trailing ``key=value`` overrides::

    megablocks-ablate preprocess --input 'corpus/*.jsonl.gz' --partition-by fos \\
        --order-by year --unit-tokens 50M --tokenizer tok.model \\
        --heldout-fraction 0.01 --eval 'paloma/*.jsonl' --workers 16 --out data/

Every partition with two or more documents gets at least ``--heldout-min-docs``
held-out documents (default 1), even where its ``--heldout-fraction`` share rounds to
zero; a partition left without a held-out set is named, with the reason, in the log
and the manifest.
"""

from __future__ import annotations

import argparse

from megablocks_ablate.utils import cli_types as ct

# flag -> (config field, kind); kind "list" flags may repeat or take comma lists
_FLAGS = [
    ("--input", "input", "list", "input JSONL file(s) or glob(s); repeatable"),
    ("--out", "out", "str", "output directory"),
    ("--tokenizer", "tokenizer", "str", "SentencePiece .model or HF tokenizer.json"),
    ("--eod-token", "eod_token", "str", "end-of-document token (default: detected)"),
    ("--text-key", "text_key", "str", "JSON key of the text (default: text)"),
    ("--partition-by", "partition_by", "list", "metadata field(s) defining partitions, e.g. fos"),
    ("--order-by", "order_by", "str", "secondary key ordering documents into units, e.g. year"),
    ("--unit-tokens", "unit_tokens", "str", "tokens per base unit, e.g. 50M"),
    ("--remainder", "remainder", "str", "drop|keep the tail too small for a unit"),
    ("--heldout-fraction", "heldout_fraction", "float", "fraction held out per partition"),
    (
        "--heldout-min-docs",
        "heldout_min_docs",
        "int",
        "held-out documents per partition at least, when the fraction gives fewer and "
        "one document stays to train on (default: 1; 0 = the fraction alone)",
    ),
    ("--eval", "eval", "list", "evaluation JSONL file(s)/glob(s) to decontaminate against"),
    ("--on-bad-line", "on_bad_line", "str", "error|skip invalid lines (default: error)"),
    ("--workers", "workers", "int", "tokenization processes (default: 1)"),
]
# each flag's parse-time check (docs/reliability.md "One line for every bad argument");
# the rest are paths, keys and names, checked when read
_TYPES = {
    "--partition-by": ct.nonempty_csv,
    "--unit-tokens": ct.count_text(1),
    "--heldout-fraction": ct.fraction_from_zero,
    "--heldout-min-docs": ct.nonneg_int,
    "--workers": ct.positive_int,
}
_CHOICES = {"--remainder": ("drop", "keep"), "--on-bad-line": ("error", "skip")}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preprocess",
        help="tokenize corpora into partitions and base units",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with preprocess settings")
    for flag, _field, kind, help_ in _FLAGS:
        checks = {"type": _TYPES[flag]} if flag in _TYPES else {}
        if flag in _CHOICES:
            checks["choices"] = _CHOICES[flag]
        if kind == "list":
            p.add_argument(flag, action="append", help=help_, **checks)
        else:
            p.add_argument(flag, help=help_, **checks)
    p.add_argument(
        "--overwrite", action="store_true", help="replace output made with other settings"
    )
    p.add_argument(
        "--allow-missing-partition",
        action="store_true",
        help="accept a --partition-by field that no document has (all go to partition NA)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """Defaults < --config YAML < flags < key=value overrides."""
    import yaml

    from megablocks_ablate.config import apply_overrides, yaml_error_line
    from megablocks_ablate.data.preprocess import PreprocessConfig
    from megablocks_ablate.errors import ConfigError

    data: dict = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"{args.config}: cannot read config: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{args.config}: {yaml_error_line(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{args.config}: expected a mapping of preprocess settings")
    for _flag, field, kind, _ in _FLAGS:
        value = getattr(args, field)
        if value is None:
            continue
        if kind == "list":  # repeatable; fields other than paths also take "a,b"
            split = field not in ("input", "eval")
            value = [x for v in value for x in (v.split(",") if split else [v]) if x]
        data[field] = value
    if args.overwrite:
        data["overwrite"] = True
    if args.allow_missing_partition:
        data["allow_missing_partition"] = True
    apply_overrides(data, args.overrides)
    try:
        return PreprocessConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}" if args.config else str(e)) from None


def run(args: argparse.Namespace) -> int:
    from megablocks_ablate.data.preprocess import run_preprocess

    cfg = build_config(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    run_preprocess(cfg)
    return 0
