"""Preprocess: JSONL corpora -> per-unit indexed binaries + held-out JSONL + manifest.

::

    corpus/*.jsonl[.gz|.zst] ──read (main)──▶ batches of raw lines
        ──workers: parse · partition · held-out hash · decontaminate · tokenize+EOD──▶
    stage 1 (per input file, in input order): one shard .bin/.idx per partition
        + order keys + held-out lines                       [.preprocess-tmp/files/NNNNN/]
    held-out minimum: a partition with fewer than --heldout-min-docs held-out documents
        gets its training documents of smallest hash, if one stays to train on
    checks, before anything is written outside the temp dir: refuse an empty corpus, a
        --partition-by field no document has (unless --allow-missing-partition), zero base
        units, and more than half the training tokens dropped as remainders; a refusal
        removes .preprocess-tmp, so a corrected rerun starts clean
    stage 2 (per partition): order by --order-by, cut into base units of equal tokens,
        copy documents into units/<partition>-NNNN.bin/.idx; heldout/<partition>.jsonl;
        the same held-out lines split by unit stretch, heldout/units/<unit>.jsonl
    manifest.json (written last: its presence means the output is complete)

Check, then act: before anything is written or deleted, the output directory (a
file, under a file, not writable, a user's directory, other settings without
``overwrite``), the inputs and evaluation sets (a pattern matching nothing, a file
inside ``out``), the tokenizer and the ``--partition-by`` fields (on the inputs' first
documents) are checked; a refusal changes nothing.

Resumable: stage 1 keeps finished input files, stage 2 keeps finished units; a rerun
with the same settings continues, and one with different settings is refused unless
``overwrite`` is set. With ``overwrite``, a previous output is replaced only once the
new one is complete: it is built in ``<out>.staging-<host>-<pid>`` and swapped in
(:mod:`.preprocess_replace`). Every file is written under a temporary name and renamed,
so Ctrl-C or a crash leaves nothing half-written. Results do not depend on ``workers``.
Stage 1 lives in :mod:`.preprocess_stage1`, the held-out minimum in
:mod:`.preprocess_minimum`, the checks in :mod:`.preprocess_checks`, the unit order in
:mod:`.preprocess_order`, the per-unit held-out sets in :mod:`.preprocess_heldout`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from megablocks_ablate.config import Config, Count, doc
from megablocks_ablate.data.jsonl import expand_inputs
from megablocks_ablate.data.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    Manifest,
    record_in_manifest,
)
from megablocks_ablate.data.partition import safe_name, split_units
from megablocks_ablate.data.preprocess_checks import check_partition_fields, check_result
from megablocks_ablate.data.preprocess_heldout import UNIT_HELDOUT_DIR, write_unit_heldout
from megablocks_ablate.data.preprocess_minimum import added, log_heldout, missing_reason, top_up
from megablocks_ablate.data.preprocess_order import OrderedDocs, order_documents
from megablocks_ablate.data.preprocess_replace import (
    TMP_DIR,
    check_replace,
    prepare_staging,
    replace_output,
    state_hash,
)
from megablocks_ablate.data.preprocess_stage1 import file_dir, run_stage1
from megablocks_ablate.data.preprocess_worker import WorkerSettings
from megablocks_ablate.errors import ConfigError, MBAError
from megablocks_ablate.utils.atomic import atomic_open, atomic_write_json
from megablocks_ablate.utils.hashing import sha256_file, sha256_json
from megablocks_ablate.utils.outputs import (
    check_inputs_outside,
    check_output_dir,
    claim_output_dir,
    recover_swap,
    remove_side_dirs,
    sweep_stale_temporaries,
)
from megablocks_ablate.utils.progress import progress

logger = logging.getLogger(__name__)

# Settings that do not change the output; excluded from the config hash.
_NON_OUTPUT_FIELDS = ("workers", "batch_size", "overwrite", "allow_missing_partition")
_UNSET = object()


@dataclass
class PreprocessConfig(Config):
    """Settings of `megablocks-ablate preprocess`."""

    input: list[str] = doc(
        "input JSONL files or globs (.jsonl, .jsonl.gz, .jsonl.zst)", default_factory=list
    )
    out: str = doc("output directory (units/, heldout/, manifest.json)", "")
    tokenizer: str = doc("SentencePiece .model or HF tokenizer.json", "")
    eod_token: str | None = doc("end-of-document token (default: detected)", None)
    text_key: str = doc("JSON key holding the document text", "text")
    partition_by: list[str] = doc(
        "metadata field(s) defining partitions (e.g. [fos])", default_factory=list
    )
    order_by: str | None = doc("secondary key ordering documents into units (e.g. year)", None)
    unit_tokens: Count | None = doc(
        "tokens per base unit, e.g. 50M (EOD included); null = one unit per partition", None
    )
    remainder: Literal["drop", "keep"] = doc(
        "a partition's tail too small for a unit: drop it, or keep it as a partial unit", "drop"
    )
    heldout_fraction: float = doc("fraction of documents held out per partition for eval", 0.0)
    heldout_salt: int = doc("salt of the held-out document hash", 0)
    heldout_min_docs: int = doc(
        "held-out documents every partition gets at least (its training documents of "
        "smallest hash) when heldout_fraction > 0 gives it fewer, as long as one document "
        "stays to train on; 0 = the fraction alone",
        1,
    )
    eval: list[str] = doc("evaluation JSONL files to decontaminate against", default_factory=list)
    decontam_min_words: int = doc("minimum words of a paragraph to count as contamination", 13)
    bloom_error_rate: float = doc("Bloom filter false-positive rate", 1e-6)
    on_bad_line: Literal["error", "skip"] = doc("invalid JSON / missing text / bad UTF-8", "error")
    workers: int = doc("tokenization worker processes (1 = in the main process)", 1)
    batch_size: int = doc("documents per worker task", 256)
    overwrite: bool = doc("replace an existing output made with other settings", False)
    allow_missing_partition: bool = doc(
        "accept a partition_by field that no document has (all land in partition NA); "
        "without it that is an error",
        False,
    )

    def validate(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction: must be in [0, 1), got {self.heldout_fraction}")
        if self.heldout_min_docs < 0:
            raise ConfigError(f"heldout_min_docs: must be >= 0, got {self.heldout_min_docs}")
        if self.unit_tokens is not None and self.unit_tokens <= 0:
            raise ConfigError(f"unit_tokens: must be positive, got {self.unit_tokens}")
        if not 0.0 < self.bloom_error_rate < 1.0:
            raise ConfigError(f"bloom_error_rate: must be in (0, 1), got {self.bloom_error_rate}")

    def check_required(self) -> None:
        for name in ("input", "out", "tokenizer"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required (e.g. --{name.replace('_', '-')} ...)")

    def output_hash(self) -> str:
        d = {k: v for k, v in self.to_dict().items() if k not in _NON_OUTPUT_FIELDS}
        return sha256_json(d)


def _partition_plan(records: list[dict], tmp: str) -> dict[str, list[tuple[str, dict]]]:
    """partition key -> [(file dir, file's partition record)] in input order."""
    plan: dict[str, list] = {}
    for i, rec in enumerate(records):
        d = file_dir(tmp, i)
        for key, prec in rec["partitions"].items():
            plan.setdefault(key, []).append((d, prec))
    return dict(sorted(plan.items()))


def _write_unit(prefix: str, dtype, shards, shard_of, seq_of, positions) -> dict:
    """Copy documents ``positions`` into unit ``prefix``; return its files' sizes and hashes."""
    from megablocks_ablate.data.indexed import IndexedDatasetWriter

    with IndexedDatasetWriter(prefix, dtype) as w:
        for pos in positions:
            w.add_document(shards[int(shard_of[pos])][int(seq_of[pos])])
    return {
        ext: {"bytes": os.path.getsize(f"{prefix}.{ext}"), "sha256": sha256_file(f"{prefix}.{ext}")}
        for ext in ("bin", "idx")
    }


def _unique_name(key: str, names_used: set[str]) -> str:
    """A file-safe name for partition ``key``, suffixed ``_2``, ``_3``... if already taken."""
    name = safe_name(key)
    base, k = name, 1
    while name in names_used:
        k += 1
        name = f"{base}_{k}"
    names_used.add(name)
    return name


def _unit_files(prefix: str, marker: str, dtype, docs: OrderedDocs, positions) -> dict:
    """Reuse a unit an earlier, interrupted run finished intact, or write it now."""
    files = None
    if os.path.exists(marker):  # finished in an earlier, interrupted run
        with open(marker, encoding="utf-8") as f:
            files = json.load(f)
        if not all(
            os.path.exists(f"{prefix}.{e}")
            and os.path.getsize(f"{prefix}.{e}") == files[e]["bytes"]
            for e in ("bin", "idx")
        ):
            files = None
    if files is None:
        files = _write_unit(prefix, dtype, docs.shards, docs.shard_of, docs.seq_of, positions)
        atomic_write_json(marker, files)
    return files


def _stage2_unit(
    cfg: PreprocessConfig,
    unit_done_dir: str,
    dtype,
    docs: OrderedDocs,
    key: str,
    ui: int,
    unit: str,
    a: int,
    b: int,
) -> dict:
    """Write (or keep) unit ``unit``, ordered documents ``[a, b)``; return its manifest entry."""
    prefix_rel = f"units/{unit}"
    prefix = os.path.join(cfg.out, prefix_rel)
    positions = docs.order[a:b]
    files = _unit_files(prefix, os.path.join(unit_done_dir, unit + ".json"), dtype, docs, positions)
    n_tok = int(docs.lengths[positions].sum())
    return {
        "partition": key,
        "index": ui,
        "prefix": prefix_rel,
        "documents": int(b - a),
        "tokens": n_tok,
        "order_first": docs.label(positions[0]),
        "order_last": docs.label(positions[-1]),
        "partial": bool(cfg.unit_tokens is not None and n_tok < cfg.unit_tokens),
        **files,
    }


def _stage2_heldout(out: str, name: str, pieces: list[tuple[str, dict]]) -> dict | None:
    """Concatenate a partition's held-out lines into ``heldout/<name>.jsonl`` (None if none)."""
    n_heldout = sum(prec["heldout_documents"] for _, prec in pieces)
    if not n_heldout:
        return None
    tokens = sum(prec["heldout_tokens"] for _, prec in pieces)
    rel = f"heldout/{name}.jsonl"
    dest = os.path.join(out, rel)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with atomic_open(dest, "wb") as f:
        for d, prec in pieces:
            if prec["heldout"]:
                with open(os.path.join(d, prec["heldout"]), "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
    return {
        "path": rel,
        "documents": n_heldout,
        "tokens": tokens,
        "minimum_added": added(pieces),
        "sha256": sha256_file(dest),
    }


def _stage2_partition(
    cfg: PreprocessConfig,
    key: str,
    name: str,
    pieces: list[tuple[str, dict]],
    unit_done_dir: str,
    dtype,
    units: dict,
    bar,
) -> dict:
    """Order one partition, write its units into ``units``, its held-out file and its
    units' held-out files; return the partition's manifest entry."""
    docs = order_documents(pieces, cfg.order_by)
    ranges, left_docs, left_tokens = split_units(
        docs.lengths[docs.order], cfg.unit_tokens, keep_remainder=cfg.remainder == "keep"
    )
    unit_names = []
    for ui, (a, b) in enumerate(ranges):
        unit = f"{name}-{ui:04d}"
        units[unit] = _stage2_unit(cfg, unit_done_dir, dtype, docs, key, ui, unit, a, b)
        bar.update(units[unit]["tokens"])
        unit_names.append(unit)
    for ds in docs.shards:
        ds.close()
    heldout = _stage2_heldout(cfg.out, name, pieces)
    n_docs, n_tokens = len(docs.lengths), int(docs.lengths.sum())
    del docs  # its per-document arrays, before the unit held-out step builds its own
    unit_heldout, heldout_left = write_unit_heldout(
        cfg.out, pieces, cfg.order_by, cfg.text_key, ranges, n_docs, unit_names
    )
    for unit, rec in unit_heldout.items():
        units[unit]["heldout"] = rec
    return {
        "name": name,
        "documents": n_docs,
        "tokens": n_tokens,
        "contaminated": sum(prec["contaminated"] for _, prec in pieces),
        "heldout": heldout,
        "heldout_missing": missing_reason(pieces, cfg.heldout_fraction, cfg.heldout_min_docs),
        "units": unit_names,
        "leftover_documents": int(left_docs),
        "leftover_tokens": int(left_tokens),
        "heldout_leftover_documents": heldout_left,
    }


def _stage2(cfg: PreprocessConfig, plan: dict, tmp: str, dtype) -> tuple[dict, dict]:
    """Cut every partition of ``plan`` into units and gather its held-out lines:
    (partitions, units)."""
    out = cfg.out
    os.makedirs(os.path.join(out, "units"), exist_ok=True)
    unit_done_dir = os.path.join(tmp, "units")
    os.makedirs(unit_done_dir, exist_ok=True)
    names_used: set[str] = set()
    partitions: dict[str, dict] = {}
    units: dict[str, dict] = {}
    bar = progress(desc="units", unit="tok")
    for key, pieces in plan.items():
        name = _unique_name(key, names_used)
        partitions[key] = _stage2_partition(
            cfg, key, name, pieces, unit_done_dir, dtype, units, bar
        )
    bar.close()
    return partitions, units


def _existing_manifest(cfg: PreprocessConfig, manifest_path: str, h: str) -> Manifest | None:
    """The finished manifest if it was made with these settings; refuse other settings
    unless ``overwrite``."""
    if os.path.exists(manifest_path):
        old = Manifest.load(manifest_path)
        if old.data.get("config_hash") == h and not cfg.overwrite:
            logger.info("%s: already complete with these settings; nothing to do", manifest_path)
            log_heldout(old.partitions, cfg.heldout_fraction, cfg.heldout_min_docs)
            return old
        if not cfg.overwrite:
            raise ConfigError(
                f"{cfg.out}: holds a manifest made with other settings"
                f"{_changed_settings(old.data.get('config'), cfg)}; "
                "pass --overwrite to replace it or choose another --out"
            )
    return None


def _changed_settings(old: dict | None, cfg: PreprocessConfig) -> str:
    """`` (heldout_min_docs: unset -> 1)``: the output settings that differ from ``old``
    (an earlier manifest's config), or "" when it records none."""
    if not isinstance(old, dict):
        return ""
    new = cfg.to_dict()
    diff = [
        f"{k}: {old.get(k, 'unset')} -> {new[k]}"
        for k in new
        if k not in _NON_OUTPUT_FIELDS and old.get(k, _UNSET) != new[k]
    ]
    return f" ({'; '.join(diff)})" if diff else ""


def _check_unfinished(cfg: PreprocessConfig, out: str, h: str) -> None:
    """Refuse an unfinished run with other settings in ``out`` unless ``overwrite``."""
    old_h = state_hash(out)
    if old_h is not None and old_h != h and not cfg.overwrite:
        raise ConfigError(
            f"{cfg.out}: holds an unfinished run with other settings; "
            "pass --overwrite to discard it"
        )


def _start_tmp(build: str, tmp: str, h: str) -> None:
    """Discard an unfinished run with other settings in ``build`` (only one with the same
    settings is resumed) and record this run's settings hash."""
    if state_hash(build) not in (None, h):
        shutil.rmtree(tmp)
    os.makedirs(tmp, exist_ok=True)
    atomic_write_json(os.path.join(tmp, "state.json"), {"config_hash": h})


def _build_decontam(
    cfg: PreprocessConfig, eval_files: list[str], tmp: str
) -> tuple[dict | None, str | None]:
    """Build and save the evaluation Bloom filter: (stats, filter path)."""
    if not eval_files:
        return None, None
    from megablocks_ablate.data.decontam import Decontaminator
    from megablocks_ablate.data.jsonl import BadLineCounter

    # Rebuilt on every (re)run: cheap next to tokenization, and never stale if the
    # evaluation files changed between an interrupted run and its resumption.
    bloom_path = os.path.join(tmp, "eval.bloom")
    logger.info("building decontamination filter from %d evaluation file(s)", len(eval_files))
    eval_bad = BadLineCounter()
    dec = Decontaminator.from_eval_files(
        eval_files,
        text_key=cfg.text_key,
        min_words=cfg.decontam_min_words,
        error_rate=cfg.bloom_error_rate,
        on_bad_line=cfg.on_bad_line,
        bad_lines=eval_bad,
    )
    dec.bloom.save(bloom_path)
    decontam_stats = {
        "min_words": cfg.decontam_min_words,
        **dec.stats(),
        "eval_bad_lines": dict(eval_bad.counts),
    }
    return decontam_stats, bloom_path


def _worker_settings(
    cfg: PreprocessConfig, tokenizer, dtype: np.dtype, bloom_path: str | None
) -> WorkerSettings:
    """What every tokenization worker needs, picklable."""
    return WorkerSettings(
        tokenizer=cfg.tokenizer,
        eod_token=cfg.eod_token,
        dtype=dtype.name,
        text_key=cfg.text_key,
        partition_by=list(cfg.partition_by),
        order_by=cfg.order_by,
        heldout_fraction=cfg.heldout_fraction,
        heldout_salt=cfg.heldout_salt,
        heldout_min_docs=cfg.heldout_min_docs,
        on_bad_line=cfg.on_bad_line,
        bloom_path=bloom_path,
        decontam_min_words=cfg.decontam_min_words,
        fingerprint=tokenizer.fingerprint,
    )


def _totals(records: list[dict], partitions: dict, units: dict) -> dict:
    """The manifest's document and token totals over all files, partitions and units."""
    bad: dict[str, int] = {}
    for rec in records:
        for reason, n in rec["bad_lines"].items():
            bad[reason] = bad.get(reason, 0) + n
    return {
        "lines_read": sum(r["documents_read"] for r in records),
        "documents_read": sum(r["documents_read"] for r in records) - sum(bad.values()),
        "documents_train": sum(p["documents"] for p in partitions.values()),
        "documents_heldout": sum(
            p["heldout"]["documents"] for p in partitions.values() if p["heldout"]
        ),
        "tokens_heldout": sum(p["heldout"]["tokens"] for p in partitions.values() if p["heldout"]),
        "documents_contaminated": sum(p["contaminated"] for p in partitions.values()),
        "bad_lines": bad,
        "tokens_train": sum(p["tokens"] for p in partitions.values()),
        "tokens_in_units": sum(u["tokens"] for u in units.values()),
        "tokens_leftover": sum(p["leftover_tokens"] for p in partitions.values()),
    }


def _manifest_data(
    cfg: PreprocessConfig,
    h: str,
    tokenizer,
    dtype: np.dtype,
    files: list[str],
    eval_files: list[str],
    decontam_stats: dict | None,
    totals: dict,
    timing: tuple[float, float, float],
    partitions: dict,
    units: dict,
) -> dict:
    """The manifest's contents; ``timing`` = (start, end of tokenizing, end of units)."""
    t0, t1, t2 = timing
    return {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg.to_dict(),
        "config_hash": h,
        # paths relative to the manifest when given relative (it travels with them)
        "tokenizer": dict(tokenizer.describe(), path=record_in_manifest(tokenizer.path, cfg.out)),
        "dtype": dtype.name,
        "inputs": [
            {"path": record_in_manifest(p, cfg.out), "bytes": os.path.getsize(p)} for p in files
        ],
        "eval_sets": [
            {"path": record_in_manifest(p, cfg.out), "bytes": os.path.getsize(p)}
            for p in eval_files
        ],
        "decontamination": decontam_stats,
        "totals": totals,
        "heldout": {
            "fraction": cfg.heldout_fraction,
            "min_documents": cfg.heldout_min_docs,
            "salt": cfg.heldout_salt,
            "partitions_without": {
                k: p["heldout_missing"] for k, p in partitions.items() if p["heldout_missing"]
            },
        },
        "timing_s": {"tokenize": round(t1 - t0, 3), "units": round(t2 - t1, 3)},
        "partitions": partitions,
        "units": units,
    }


def _check_out_dir(out: str) -> None:
    """Refuse, touching nothing, an ``out`` that is a file, lies under a file, cannot be
    created or written, or holds something other than a preprocess output."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"out: {out} is an existing file, not a directory; choose another --out")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(
            f"out: cannot create directory {out} ({existing} is a file); choose another --out"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = f"directory {out}" if existing == os.path.abspath(out) else f"{existing}"
        raise ConfigError(f"out: {what} is not writable; choose another --out")
    # a previous preprocess output is ours to resume or replace; a user's directory is not
    check_output_dir(out, "preprocess", reuse=True)


def _check_inputs(cfg: PreprocessConfig) -> tuple[list[str], list[str]]:
    """The input and evaluation files (refusing a pattern that matches none), none of
    them, nor the tokenizer, inside ``out``."""
    files = expand_inputs(cfg.input)
    eval_files = expand_inputs(cfg.eval) if cfg.eval else []
    named = [("--input", f) for f in files] + [("--eval", f) for f in eval_files]
    check_inputs_outside(cfg.out, [*named, ("--tokenizer", cfg.tokenizer)])
    return files, eval_files


def _make_out_dir(out: str) -> None:
    """Create ``out`` (checked by :func:`_check_out_dir`) and claim it."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"out: cannot create directory {out} ({e.strerror}); choose another --out"
        ) from None
    claim_output_dir(out, "preprocess", reuse=True)


def _build(cfg: PreprocessConfig, build: str, h: str, files, eval_files, tokenizer) -> Manifest:
    """Write the output into ``build``: ``cfg.out`` itself or a staging directory beside
    it (the manifest records ``cfg``, so both give the same bytes)."""
    from megablocks_ablate.data.indexed import best_dtype

    tmp = os.path.join(build, TMP_DIR)
    _start_tmp(build, tmp, h)
    bcfg = dataclasses.replace(cfg, out=build)
    dtype = np.dtype(best_dtype(tokenizer.vocab_size))
    decontam_stats, bloom_path = _build_decontam(cfg, eval_files, tmp)
    settings = _worker_settings(cfg, tokenizer, dtype, bloom_path)
    t0 = time.time()
    records = run_stage1(bcfg, files, tmp, settings, dtype)
    plan = _partition_plan(records, tmp)
    top_up(plan, records, tmp, cfg.heldout_fraction, cfg.heldout_min_docs)
    check_result(cfg, files, records, plan, tmp)
    t1 = time.time()
    partitions, units = _stage2(bcfg, plan, tmp, dtype)
    t2 = time.time()
    totals = _totals(records, partitions, units)
    data = _manifest_data(
        cfg,
        h,
        tokenizer,
        dtype,
        files,
        eval_files,
        decontam_stats,
        totals,
        (t0, t1, t2),
        partitions,
        units,
    )
    manifest = Manifest(data=data, root=os.path.abspath(build))
    manifest.save()
    shutil.rmtree(tmp, ignore_errors=True)
    for sub_dir in ("", "units", "heldout", UNIT_HELDOUT_DIR):
        # half-written files of an earlier killed run
        sweep_stale_temporaries(os.path.join(build, sub_dir))
    return manifest


def _replaces(cfg: PreprocessConfig, manifest_path: str, h: str) -> bool:
    """Whether this run replaces a previous output (built aside, then swapped in): with
    ``overwrite``, a complete output or an unfinished run with other settings."""
    return cfg.overwrite and (os.path.exists(manifest_path) or state_hash(cfg.out) not in (None, h))


def run_preprocess(cfg: PreprocessConfig) -> Manifest:
    """Run (or resume) preprocessing; returns the written manifest.

    Every input, option and the output directory are checked before anything is
    written or deleted; with ``overwrite`` a previous output is replaced only once the
    new one is complete (:mod:`.preprocess_replace`)."""
    from megablocks_ablate.data.tokenizer import load_tokenizer

    cfg.check_required()
    out = cfg.out
    recover_swap(out, "preprocess")  # a replace killed between its renames: undo it
    _check_out_dir(out)
    manifest_path = os.path.join(out, MANIFEST_NAME)
    h = cfg.output_hash()
    old = _existing_manifest(cfg, manifest_path, h)
    if old is not None:
        return old
    _check_unfinished(cfg, out, h)
    files, eval_files = _check_inputs(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer, eod_token=cfg.eod_token)
    check_partition_fields(cfg, files)
    replace = _replaces(cfg, manifest_path, h)
    if replace:
        check_replace(out)
    # -- everything is checked: from here on, write
    if not replace:
        _make_out_dir(out)
        manifest = _build(cfg, out, h, files, eval_files, tokenizer)
        remove_side_dirs(out, "staging", "preprocess")  # dead writers' staging dirs
    else:
        staging = prepare_staging(out, h)
        try:
            manifest = _build(cfg, staging, h, files, eval_files, tokenizer)
        except MBAError:
            shutil.rmtree(staging, ignore_errors=True)  # a refusal leaves no staging dir
            raise
        replace_output(staging, out)
        manifest = Manifest(data=manifest.data, root=os.path.abspath(out))
    _log_done(manifest_path, manifest)
    return manifest


def _log_done(manifest_path: str, manifest: Manifest) -> None:
    totals, partitions = manifest.data["totals"], manifest.partitions
    logger.info(
        f"wrote {manifest_path}: {len(partitions)} partitions, {len(manifest.units)} units, "
        f"{totals['tokens_in_units']:,} tokens in units, "
        f"{totals['documents_contaminated']} contaminated and "
        f"{sum(totals['bad_lines'].values())} bad lines dropped"
    )
    cfg = manifest.data["config"]
    log_heldout(partitions, cfg["heldout_fraction"], cfg["heldout_min_docs"])
