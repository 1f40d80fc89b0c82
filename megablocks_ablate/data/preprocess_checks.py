"""Preprocess checks that the result is what the user meant.

Before anything is written, :func:`check_partition_fields` reads the first documents of
the inputs (up to :data:`PEEK_DOCS_PER_FILE` from the start of each file,
:data:`PEEK_DOCS_TOTAL` in all, stopping as soon as every ``--partition-by`` field has
been seen) and refuses a field none of them has. After stage 1 and before any unit is
written, :func:`check_result` refuses an empty corpus, a ``--partition-by`` field no document has
(unless ``allow_missing_partition``), zero base units, and more than half the training
tokens dropped as remainders. A refusal removes the unfinished run's temp dir. Used by
:mod:`.preprocess`.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

from megablocks_ablate.data.partition import split_units
from megablocks_ablate.data.preprocess_order import order_documents
from megablocks_ablate.errors import ConfigError, DataFormatError, MBAError

if TYPE_CHECKING:
    from megablocks_ablate.data.preprocess import PreprocessConfig

Plan = dict[str, list[tuple[str, dict]]]  # partition key -> its stage-1 pieces
PEEK_DOCS_PER_FILE = 100
PEEK_DOCS_TOTAL = 10_000


def _name_inputs(files: list[str]) -> str:
    """``a.jsonl, b.jsonl and 3 more``: the inputs, for messages."""
    shown = ", ".join(files[:3])
    return shown + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def _first_fields(files: list[str], text_key: str) -> str:
    """`` (the first document has fields: a, b)`` as a hint, or "" if it cannot be read."""
    from megablocks_ablate.data.jsonl import iter_jsonl

    for path in files:
        try:
            for _, rec in iter_jsonl(path, text_key=text_key, on_bad_line="skip"):
                return f" (the first document has fields: {', '.join(sorted(rec))})"
        except MBAError:
            return ""
    return ""


def _peek_fields(files: list[str], fields: list[str], text_key: str) -> tuple[set, list, int]:
    """Read the inputs' first documents until every field in ``fields`` has a value:
    (fields still missing, the first document's fields, documents read)."""
    from megablocks_ablate.data.jsonl import iter_jsonl
    from megablocks_ablate.data.partition import has_value

    missing, first, read = set(fields), [], 0
    for path in files:
        try:
            for n, (_, rec) in enumerate(iter_jsonl(path, text_key=text_key, on_bad_line="skip")):
                first = first if read else sorted(rec)
                missing = {f for f in missing if not has_value(rec, f)}
                read += 1
                if not missing or read >= PEEK_DOCS_TOTAL or n + 1 >= PEEK_DOCS_PER_FILE:
                    break
        except MBAError:
            continue  # unreadable: stage 1 reports it, naming the line
        if not missing or read >= PEEK_DOCS_TOTAL:
            break
    return missing, first, read


def check_partition_fields(cfg: PreprocessConfig, files: list[str]) -> None:
    """Refuse, before anything is written, a ``--partition-by`` field that none of the
    inputs' first documents has (see the module docstring), naming the field, the
    inputs and the first document's fields. Nothing read (an empty corpus) is left to
    the checks after stage 1."""
    if cfg.allow_missing_partition or not cfg.partition_by:
        return
    missing, first, read = _peek_fields(files, list(cfg.partition_by), cfg.text_key)
    if not missing or not read:
        return
    f = next(f for f in cfg.partition_by if f in missing)
    raise ConfigError(
        f"--partition-by {f}: no document of {_name_inputs(files)} has a field {f!r} (read "
        f"the first {read:,}: up to {PEEK_DOCS_PER_FILE} from the start of each file), so "
        f"they would land in partition 'NA' (the first document has fields: "
        f"{', '.join(first)}); nothing was changed: check the field name or pass "
        "--allow-missing-partition to accept this"
    )


def _check_corpus(cfg: PreprocessConfig, files: list[str], records: list[dict]) -> None:
    """Refuse an empty corpus, and a --partition-by or --order-by field no document has."""
    lines = sum(r["documents_read"] for r in records)
    bad = sum(n for r in records for n in r["bad_lines"].values())
    if lines - bad <= 0:
        skipped = f" ({bad} bad lines skipped by --on-bad-line skip)" if bad else ""
        raise DataFormatError(
            f"no documents to preprocess: the input(s) {_name_inputs(files)} hold no "
            f"JSONL documents{skipped}; check --input"
        )
    counted = all("order_present" in r for r in records)  # (older stage 1s did not count)
    if cfg.order_by and counted and not sum(r["order_present"] for r in records):
        raise ConfigError(
            f"--order-by {cfg.order_by}: no document of {_name_inputs(files)} has a field "
            f"{cfg.order_by!r}, so base units would keep the input order"
            f"{_first_fields(files, cfg.text_key)}; check the field name, or leave "
            "--order-by out to keep the input order"
        )
    if cfg.allow_missing_partition or any("fields_present" not in r for r in records):
        return  # (records of an older stage 1 do not count fields: nothing to check)
    for f in cfg.partition_by:
        if not sum(r["fields_present"].get(f, 0) for r in records):
            raise ConfigError(
                f"--partition-by {f}: no document of {_name_inputs(files)} has a field "
                f"{f!r}, so all {lines - bad:,} documents would land in partition 'NA'"
                f"{_first_fields(files, cfg.text_key)}; check the field name or pass "
                "--allow-missing-partition to accept this"
            )


def _partition_sizes(cfg: PreprocessConfig, plan: Plan) -> dict[str, tuple[int, int, int]]:
    """partition key -> (training tokens, units, tokens dropped as remainder), computed
    from the stage-1 shards in unit order without writing anything."""
    drops = cfg.unit_tokens is not None and cfg.remainder == "drop"
    sizes = {}
    for key, pieces in plan.items():  # the order decides only what a "drop" remainder is
        docs = order_documents(pieces, cfg.order_by if drops else None)
        try:
            ranges, _, left = split_units(
                docs.lengths[docs.order], cfg.unit_tokens, keep_remainder=cfg.remainder == "keep"
            )
        finally:
            for ds in docs.shards:
                ds.close()
        sizes[key] = (int(docs.lengths.sum()), len(ranges), int(left))
    return sizes


def _describe_sizes(sizes: dict[str, tuple[int, int, int]], top: int = 5) -> str:
    """``biology: 1,234, physics: 999, ... tokens``: the largest partitions' token counts."""
    largest = sorted(sizes.items(), key=lambda kv: -kv[1][0])
    text = ", ".join(f"{k}: {v[0]:,}" for k, v in largest[:top])
    return text + (f" and {len(largest) - top} more" if len(largest) > top else "")


def _check_units(cfg: PreprocessConfig, files: list[str], records: list[dict], plan: Plan) -> None:
    """Refuse zero base units, and more than half the training tokens dropped as
    partition remainders."""
    sizes = _partition_sizes(cfg, plan)
    total = sum(v[0] for v in sizes.values())
    if not total:
        held = sum(p["heldout_documents"] for r in records for p in r["partitions"].values())
        cont = sum(p["contaminated"] for r in records for p in r["partitions"].values())
        raise ConfigError(
            f"no base units: every document of {_name_inputs(files)} was held out ({held}) "
            f"or found in the evaluation sets ({cont}); lower --heldout-fraction or check --eval"
        )
    ut = cfg.unit_tokens
    n_part = f"{len(sizes)} partition{'s' if len(sizes) != 1 else ''}"
    if not sum(v[1] for v in sizes.values()):
        raise ConfigError(
            f"no base units: --unit-tokens {ut:,} is more than any partition holds ({n_part}, "
            f"tokens: {_describe_sizes(sizes)}); lower --unit-tokens or pass --remainder keep"
        )
    left = sum(v[2] for v in sizes.values())
    if 2 * left > total:
        raise ConfigError(
            f"{left:,} of {total:,} training tokens ({100 * left / total:.0f}%) would be "
            f"dropped as partition remainders smaller than --unit-tokens {ut:,} ({n_part}, "
            f"tokens: {_describe_sizes(sizes)}); lower --unit-tokens or pass --remainder "
            "keep to keep each remainder as a partial unit"
        )


def check_result(
    cfg: PreprocessConfig, files: list[str], records: list[dict], plan: Plan, tmp: str
) -> None:
    """Run the checks above after stage 1. A refusal removes the unfinished run's temp dir
    (its stage-1 files are of no use to a corrected rerun, which would otherwise be refused
    as "other settings"), so the output directory is left without partial results."""
    try:
        _check_corpus(cfg, files, records)
        _check_units(cfg, files, records, plan)
    except MBAError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
