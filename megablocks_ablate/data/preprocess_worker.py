"""The per-batch work of preprocess, run in worker processes (or inline for 1 worker).

A batch is a list of raw JSONL lines from one input file. The worker parses them,
assigns partitions, decides held-out membership, drops contaminated documents and
tokenizes the rest (EOD appended), returning compact arrays. The main process writes
results in input order, so outputs do not depend on the number of workers.

With a held-out minimum (``heldout_min_docs``) a batch also names, per partition, its
``heldout_min_docs`` training documents of smallest held-out hash: the candidates a
partition whose held-out share rounded below the minimum is topped up from
(:mod:`.preprocess_minimum`). Held-out documents are tokenized too, only to count
their tokens for the manifest.
"""

from __future__ import annotations

import heapq
import signal
from dataclasses import dataclass, field

import numpy as np

from megablocks_ablate.data.jsonl import bad_line_error, parse_line
from megablocks_ablate.data.partition import (
    has_value,
    hash_below,
    heldout_hash,
    order_value,
    partition_key,
)


@dataclass
class BatchResult:
    """What one batch produced. Per training document: partition, order key, length."""

    n_read: int = 0
    train_partition: list[str] = field(default_factory=list)
    order_class: list[int] = field(default_factory=list)  # 0 number, 1 string, 2 missing
    order_number: list[float] = field(default_factory=list)
    order_string: list[str] = field(default_factory=list)
    lengths: np.ndarray | None = None  # int64 [n_train], EOD included
    tokens: np.ndarray | None = None  # concatenated, index dtype
    heldout: list[tuple[str, bytes]] = field(default_factory=list)  # (partition, raw line)
    # per held-out document: how many of the batch's training documents (any partition)
    # precede it, so stage 2 can place it in the training order (per-unit held-out sets)
    heldout_slot: list[int] = field(default_factory=list)
    heldout_tokens: list[int] = field(default_factory=list)  # per held-out document, EOD incl.
    # per partition, its training documents of smallest held-out hash (at most
    # ``heldout_min_docs``): (partition, hash, index among the batch's training
    # documents, index of the line in the batch)
    reserve: list[tuple[str, int, int, int]] = field(default_factory=list)
    contaminated: dict[str, int] = field(default_factory=dict)
    bad_lines: dict[str, int] = field(default_factory=dict)
    # per --partition-by field: documents that have a value for it (the rest go to "NA")
    fields_present: dict[str, int] = field(default_factory=dict)
    # documents with a value for --order-by (none at all: a misspelt field)
    order_present: int = 0


@dataclass
class WorkerSettings:
    """Everything a worker needs; plain data so it pickles to spawned processes."""

    tokenizer: str
    eod_token: str | None
    dtype: str
    text_key: str
    partition_by: list[str]
    order_by: str | None
    heldout_fraction: float
    heldout_salt: int
    on_bad_line: str
    bloom_path: str | None
    decontam_min_words: int
    fingerprint: str = ""  # the tokenizer the main process loaded; workers must match
    heldout_min_docs: int = 0  # candidates kept per partition for the held-out minimum


_STATE: dict = {}


def init_worker(settings: WorkerSettings, ignore_sigint: bool = True) -> None:
    """Load the tokenizer and the (memory-mapped) Bloom filter once per process."""
    if ignore_sigint:  # Ctrl-C is handled by the main process, which stops the pool
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    from megablocks_ablate.data.tokenizer import load_tokenizer

    _STATE["settings"] = settings
    tok = load_tokenizer(settings.tokenizer, eod_token=settings.eod_token)
    if settings.fingerprint and tok.fingerprint != settings.fingerprint:
        from megablocks_ablate.errors import TokenizerError

        raise TokenizerError(
            f"{settings.tokenizer}: changed while preprocessing "
            "(fingerprint differs from the one recorded at start)"
        )
    _STATE["tokenizer"] = tok
    _STATE["decontam"] = None
    if settings.bloom_path:
        from megablocks_ablate.data.decontam import BloomFilter, Decontaminator

        bloom = BloomFilter.load(settings.bloom_path, mmap=True)
        _STATE["decontam"] = Decontaminator(bloom, min_words=settings.decontam_min_words)


def _reserve(candidates: dict[str, list[tuple[int, int, int]]], keep: int) -> list:
    """Per partition, its ``keep`` candidates (hash, training index, line index) of
    smallest hash (ties: earlier document first)."""
    return [
        (part, h, j, line)
        for part, cands in candidates.items()
        for h, j, line in heapq.nsmallest(keep, cands)
    ]


def process_batch(task: tuple[str, list[tuple[int, bytes]]]) -> BatchResult:
    path, lines = task
    s: WorkerSettings = _STATE["settings"]
    tok = _STATE["tokenizer"]
    decontam = _STATE["decontam"]
    res = BatchResult(n_read=len(lines))
    texts: list[str] = []
    held_texts: list[str] = []
    hashing = s.heldout_fraction > 0.0
    keep = s.heldout_min_docs if hashing else 0
    candidates: dict[str, list[tuple[int, int, int]]] = {}
    for i, (line_no, raw) in enumerate(lines):
        rec, reason = parse_line(raw, s.text_key)
        if reason is not None:
            if s.on_bad_line == "error":
                raise bad_line_error(path, line_no, reason, s.text_key)
            res.bad_lines[reason] = res.bad_lines.get(reason, 0) + 1
            continue
        assert rec is not None  # parse_line gives a reason when it gives no record
        text = rec[s.text_key]
        part = partition_key(rec, s.partition_by)
        for f in s.partition_by:
            if has_value(rec, f):
                res.fields_present[f] = res.fields_present.get(f, 0) + 1
        h = heldout_hash(text, s.heldout_salt) if hashing else 0
        if hashing and hash_below(h, s.heldout_fraction):
            res.heldout.append((part, raw))
            res.heldout_slot.append(len(res.train_partition))
            held_texts.append(text)
            continue
        if decontam is not None and decontam.is_contaminated(text):
            res.contaminated[part] = res.contaminated.get(part, 0) + 1
            continue
        if keep:
            candidates.setdefault(part, []).append((h, len(res.train_partition), i))
        if s.order_by and has_value(rec, s.order_by):
            res.order_present += 1
        cls, num, string = order_value(rec, s.order_by)
        res.train_partition.append(part)
        res.order_class.append(cls)
        res.order_number.append(num)
        res.order_string.append(string)
        texts.append(text)
    res.reserve = _reserve(candidates, keep)
    ids = tok.encode_batch(texts + held_texts) if texts or held_texts else []
    res.heldout_tokens = [len(x) + 1 for x in ids[len(texts) :]]
    ids = ids[: len(texts)]
    eod = tok.eod_id
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=np.dtype(s.dtype))
    pos = 0
    for x, n in zip(ids, lengths.tolist()):
        flat[pos : pos + n - 1] = x
        flat[pos + n - 1] = eod
        pos += n
    res.lengths = lengths
    res.tokens = flat
    return res
