"""Preprocess stage 1: input files -> per-file, per-partition shards, order keys and held-out lines.

For each input file (in input order) the main process reads batches of raw lines, the
workers (:mod:`.preprocess_worker`) parse, hold out, decontaminate and tokenize them,
and :class:`_FileStage` writes, per partition met in that file, under
``.preprocess-tmp/files/NNNNN/``:

* ``p<i>.bin/.idx``: the training documents, in input order;
* ``p<i>.keys.npz``: their ``--order-by`` keys (``cls``, ``num``, string ``codes`` into
  the record's ``strings``) and, per held-out document, ``heldout_slot``: how many of
  this partition's training documents of the file precede it in the input (stage 2
  places held-out documents into the unit order with it, :mod:`.preprocess_heldout`);
* ``p<i>.heldout.jsonl``: the held-out lines, verbatim, in input order;
* with a held-out minimum, the file's ``heldout_min_docs`` training documents of the
  partition of smallest held-out hash, the candidates :mod:`.preprocess_minimum` tops a
  partition up from: ``reserve_hash`` and ``reserve_index`` (into the shard) in the
  keys file, their lines verbatim in ``p<i>.reserve.jsonl``, smallest hash first;
* ``done.json``: the file's record, written last (its completion marker); per
  partition it counts training documents, held-out documents and held-out tokens.

A record of an older stage 1 (no ``format`` or another one) is not reused: its file is
tokenized again, so a resumed run never mixes shards that lack ``heldout_slot``.
Used by :mod:`.preprocess`.
"""

from __future__ import annotations

import bisect
import heapq
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from megablocks_ablate.data.jsonl import iter_raw_lines
from megablocks_ablate.data.preprocess_worker import (
    BatchResult,
    WorkerSettings,
    init_worker,
    process_batch,
)
from megablocks_ablate.utils.atomic import atomic_open, atomic_write_json
from megablocks_ablate.utils.progress import progress

if TYPE_CHECKING:
    from megablocks_ablate.data.preprocess import PreprocessConfig

# Version of the per-file record; 2 added ``heldout_slot`` to the keys file, 3 the
# training and held-out token counts and the held-out minimum's reserve.
STAGE1_FORMAT = 3


class _Growable:
    """An append-only numpy buffer (doubling), so per-document metadata stays compact."""

    def __init__(self, dtype, capacity: int = 1024):
        self._buf = np.empty(capacity, dtype=dtype)
        self._n = 0

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=self._buf.dtype)
        need = self._n + len(values)
        if need > len(self._buf):
            new = np.empty(max(need, 2 * len(self._buf)), dtype=self._buf.dtype)
            new[: self._n] = self._buf[: self._n]
            self._buf = new
        self._buf[self._n : need] = values
        self._n = need

    def array(self) -> np.ndarray:
        return self._buf[: self._n]

    def __len__(self) -> int:
        return self._n


class _FileStage:
    """Stage-1 output for one input file: a shard and order keys per partition."""

    def __init__(self, directory: str, dtype: np.dtype, reserve: int = 0):
        from megablocks_ablate.data.indexed import IndexedDatasetWriter

        self._writer_cls = IndexedDatasetWriter
        self.dir = directory
        self.dtype = dtype
        self.reserve = reserve  # candidates kept per partition for the held-out minimum
        os.makedirs(directory, exist_ok=True)
        self.parts: dict[str, dict] = {}
        self.stats: dict[str, Any] = {
            "documents_read": 0,
            "bad_lines": {},
            "fields_present": {},
            "order_present": 0,
        }

    def _part(self, key: str) -> dict:
        p = self.parts.get(key)
        if p is None:
            i = len(self.parts)
            p = self.parts[key] = {
                "index": i,
                "writer": self._writer_cls(os.path.join(self.dir, f"p{i}"), self.dtype),
                "cls": _Growable(np.int8),
                "num": _Growable(np.float64),
                "strings": [],
                "string_codes": _Growable(np.int32),
                "string_ids": {},
                "heldout": None,
                "heldout_docs": 0,
                "heldout_tokens": 0,
                "heldout_slot": _Growable(np.int64),
                "reserve": [],  # (hash, index in the shard, raw line), smallest first
                "contaminated": 0,
            }
        return p

    def add(self, res: BatchResult, lines: list[tuple[int, bytes]]) -> int:
        """Write one batch's documents and held-out lines; return its training tokens.
        ``lines`` are the batch's raw lines (the reserve's come from them)."""
        assert res.lengths is not None and res.tokens is not None  # set by process_batch
        self.stats["documents_read"] += res.n_read
        self.stats["order_present"] += res.order_present
        for counts, new in (
            (self.stats["bad_lines"], res.bad_lines),
            (self.stats["fields_present"], res.fields_present),
        ):
            for k, n in new.items():
                counts[k] = counts.get(k, 0) + n
        for key, n in res.contaminated.items():
            self._part(key)["contaminated"] += n
        offsets = np.concatenate([[0], np.cumsum(res.lengths)])
        by_part: dict[str, list[int]] = {}
        for j, key in enumerate(res.train_partition):
            by_part.setdefault(key, []).append(j)
        self._add_heldout(res, by_part)  # before this batch's training documents count
        self._add_reserve(res, by_part, lines)  # also before they count
        cls = np.asarray(res.order_class, dtype=np.int8)
        num = np.asarray(res.order_number, dtype=np.float64)
        for key, idx in by_part.items():
            p = self._part(key)
            write = p["writer"].add_document
            for j in idx:
                write(res.tokens[offsets[j] : offsets[j + 1]])
            p["cls"].extend(cls[idx])
            p["num"].extend(num[idx])
            codes = []
            for j in idx:
                code = -1
                if res.order_class[j] == 1:
                    s = res.order_string[j]
                    code = p["string_ids"].setdefault(s, len(p["strings"]))
                    if code == len(p["strings"]):
                        p["strings"].append(s)
                codes.append(code)
            p["string_codes"].extend(codes)
        return int(offsets[-1])

    def _add_heldout(self, res: BatchResult, by_part: dict[str, list[int]]) -> None:
        """Append the batch's held-out lines, each with its slot: the partition's training
        documents of this file before it (earlier batches' plus this batch's, found by
        bisecting the batch-wide slot into the partition's batch positions)."""
        for (key, raw), slot in zip(res.heldout, res.heldout_slot):
            p = self._part(key)
            if p["heldout"] is None:
                p["heldout"] = open(os.path.join(self.dir, f"p{p['index']}.heldout.jsonl"), "wb")
            p["heldout"].write(raw + b"\n")
            p["heldout_docs"] += 1
            before = bisect.bisect_left(by_part.get(key, ()), slot)
            p["heldout_slot"].extend([len(p["cls"]) + before])
        for (key, _), n in zip(res.heldout, res.heldout_tokens):
            self._part(key)["heldout_tokens"] += n

    def _add_reserve(
        self, res: BatchResult, by_part: dict[str, list[int]], lines: list[tuple[int, bytes]]
    ) -> None:
        """Merge the batch's held-out minimum candidates into each partition's reserve,
        keeping the ``reserve`` of smallest (hash, index in the shard)."""
        new: dict[str, list] = {}
        for key, h, j, line in res.reserve:
            at = len(self._part(key)["cls"]) + bisect.bisect_left(by_part[key], j)
            new.setdefault(key, []).append((h, at, lines[line][1]))
        for key, cands in new.items():
            p = self.parts[key]
            p["reserve"] = heapq.nsmallest(self.reserve, p["reserve"] + cands)

    def finish(self, source: str) -> dict:
        """Finalize shards and write the file's record (its completion marker)."""
        record = {"format": STAGE1_FORMAT, "source": source, **self.stats, "partitions": {}}
        for key, p in self.parts.items():
            i = p["index"]
            p["writer"].finalize()
            if p["heldout"] is not None:
                p["heldout"].close()
            reserve = None
            if p["reserve"]:
                reserve = f"p{i}.reserve.jsonl"
                with atomic_open(os.path.join(self.dir, reserve), "wb") as f:
                    f.writelines(raw + b"\n" for _, _, raw in p["reserve"])
            meta = os.path.join(self.dir, f"p{i}.keys.npz")
            with atomic_open(meta, "wb") as f:
                np.savez(
                    f,
                    cls=p["cls"].array(),
                    num=p["num"].array(),
                    codes=p["string_codes"].array(),
                    heldout_slot=p["heldout_slot"].array(),
                    reserve_hash=np.array([h for h, _, _ in p["reserve"]], dtype=np.uint64),
                    reserve_index=np.array([j for _, j, _ in p["reserve"]], dtype=np.int64),
                )
            record["partitions"][key] = {
                "shard": f"p{i}",
                "strings": p["strings"],
                "contaminated": p["contaminated"],
                "train_documents": len(p["cls"]),
                "heldout_documents": p["heldout_docs"],
                "heldout_tokens": p["heldout_tokens"],
                "heldout": f"p{i}.heldout.jsonl" if p["heldout"] is not None else None,
                "reserve": reserve,
            }
        atomic_write_json(os.path.join(self.dir, "done.json"), record)
        return record

    def abort(self) -> None:
        for p in self.parts.values():
            p["writer"].abort()
            if p["heldout"] is not None:
                p["heldout"].close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _batches(path: str, batch_size: int) -> Iterator[tuple[str, list]]:
    lines = []
    for item in iter_raw_lines(path):
        lines.append(item)
        if len(lines) >= batch_size:
            yield path, lines
            lines = []
    if lines:
        yield path, lines


def _ordered_map(pool, fn, tasks, max_pending: int):
    """Like pool.imap but with at most ``max_pending`` tasks in flight (bounded memory)."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def file_dir(tmp: str, i: int) -> str:
    """The stage-1 directory of input file ``i``."""
    return os.path.join(tmp, "files", f"{i:05d}")


def _finished_records(files: list[str], tmp: str) -> tuple[list[dict | None], list[int]]:
    """Records of input files an earlier run finished (None elsewhere), and the rest's indices."""
    records: list[dict | None] = []
    todo = []
    for i, path in enumerate(files):
        marker = os.path.join(file_dir(tmp, i), "done.json")
        if os.path.exists(marker):
            with open(marker, encoding="utf-8") as f:
                rec = json.load(f)
            if rec.get("source") == os.path.abspath(path) and rec.get("format") == STAGE1_FORMAT:
                records.append(rec)
                continue
        records.append(None)
        todo.append(i)
    return records, todo


def _start_workers(cfg: PreprocessConfig, settings: WorkerSettings):
    """A spawn pool of ``cfg.workers`` workers, or None after setting up this process as one."""
    if cfg.workers > 1:
        import multiprocessing as mp

        return mp.get_context("spawn").Pool(
            cfg.workers, initializer=init_worker, initargs=(settings,)
        )
    init_worker(settings, ignore_sigint=False)
    return None


class _Throughput:
    """Counts documents on the tokenize progress bar, with tokens per second as postfix."""

    def __init__(self, bar):
        self.bar = bar
        self.tokens = 0
        self.t0 = time.time()

    def add(self, documents: int, tokens: int) -> None:
        """Count one batch of ``documents`` documents holding ``tokens`` tokens."""
        self.tokens += tokens
        self.bar.update(documents)
        self.bar.set_postfix(
            tok_per_s=f"{self.tokens / max(time.time() - self.t0, 1e-9):.3g}", refresh=False
        )


def _tokenize_file(
    cfg: PreprocessConfig, pool, path: str, d: str, dtype: np.dtype, meter: _Throughput
) -> dict:
    """Tokenize one input file into stage directory ``d``; return its record."""
    shutil.rmtree(d, ignore_errors=True)  # a partial earlier attempt
    stage = _FileStage(d, dtype, cfg.heldout_min_docs if cfg.heldout_fraction > 0 else 0)
    sent: deque = deque()  # the batches in flight, in order: their raw lines

    def tasks() -> Iterator[tuple[str, list]]:
        for task in _batches(path, cfg.batch_size):
            sent.append(task)
            yield task

    try:
        results = (
            _ordered_map(pool, process_batch, tasks(), 2 * cfg.workers + 2)
            if pool is not None
            else map(process_batch, tasks())
        )
        for res in results:
            meter.add(res.n_read, stage.add(res, sent.popleft()[1]))
        return stage.finish(os.path.abspath(path))
    except BaseException:
        stage.abort()
        raise


def run_stage1(
    cfg: PreprocessConfig, files: list[str], tmp: str, settings: WorkerSettings, dtype: np.dtype
) -> list[dict]:
    """Tokenize every input file not yet done; return the per-file records in order."""
    records, todo = _finished_records(files, tmp)
    if not todo:
        return records  # type: ignore[return-value]

    pool = _start_workers(cfg, settings)
    bar = progress(desc="tokenize", unit="doc")
    meter = _Throughput(bar)
    try:
        for i in todo:
            records[i] = _tokenize_file(cfg, pool, files[i], file_dir(tmp, i), dtype, meter)
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool = None
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return records  # type: ignore[return-value]
