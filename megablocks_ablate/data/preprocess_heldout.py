"""Preprocess stage 2, per-unit held-out sets: a partition's held-out documents -> its units.

When the base units of a partition are themselves the partitions of a study (paper
§5.1: topical-temporal slices cut by ``--order-by``), each unit's in-domain evaluation
is its own held-out data. The held-out documents of the partition (the very set of
``heldout/<partition>.jsonl``, nothing extra is held out) are distributed over its
units by the order the training documents were cut by:

* **The order.** Held-out and training documents share one order: by ``--order-by``
  key (numbers, then strings, then missing, :func:`~.partition.order_value`), ties in
  input order (input file, then line); without ``--order-by``, input order alone, which
  is what stage 2 cuts units by (:func:`~.preprocess_order.order_documents`). A
  held-out document's input position comes from stage 1's ``heldout_slot`` (how many
  of the partition's training documents of its file precede it), so a held-out
  document tied on its key with training documents sits among them exactly where it
  stood in the input.
* **Stretches.** A held-out document belongs to the unit holding the first training
  document after it in that order, so unit ``u``'s stretch runs from just after unit
  ``u-1``'s last training document through its own last one (unit 0's from the start
  of the order). A held-out document after every training document belongs to the
  last unit, unless that stretch is a dropped remainder (``remainder: drop``): then the
  remainder's stretch (after the last unit's last document) belongs to no unit, and
  those documents are only in the partition's file (counted in the partition's
  ``heldout_leftover_documents``). With ``unit_tokens: null`` the one unit gets the
  whole set, byte for byte the partition's file.
* **Files.** ``heldout/units/<unit>.jsonl`` (a subdirectory, because a partition may
  itself be named like another partition's unit, ``a-0000``), the lines verbatim in
  the partition file's order; a unit without held-out documents gets no file.
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import numpy as np

from megablocks_ablate.data.jsonl import parse_line
from megablocks_ablate.data.partition import order_value
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.utils.atomic import atomic_open

UNIT_HELDOUT_DIR = "heldout/units"


class HeldoutLines(NamedTuple):
    """A partition's held-out lines, in the partition file's order."""

    paths: list[str]  # per piece with held-out lines: its stage-1 held-out file
    piece: np.ndarray  # int32, index into ``paths`` per document
    offset: np.ndarray  # int64 byte offset of the line in its file
    size: np.ndarray  # int64 bytes of the line, newline included
    position: np.ndarray  # int64 partition-wide input slot (training documents before it)


def _piece_offsets(pieces: list[tuple[str, dict]]) -> list[int]:
    """Per piece: how many of the partition's training documents earlier pieces hold."""
    out, total = [], 0
    for d, prec in pieces:
        out.append(total)
        with np.load(os.path.join(d, prec["shard"] + ".keys.npz"), allow_pickle=False) as z:
            total += len(z["cls"])
    return out


def _read_lines(
    pieces: list[tuple[str, dict]], order_by: str | None, text_key: str
) -> tuple[HeldoutLines, list[tuple[int, float, str]]]:
    """Index the held-out lines of ``pieces``; with ``order_by``, also their order keys."""
    starts = _piece_offsets(pieces)
    paths, piece, offset, size, position, keys = [], [], [], [], [], []
    for (d, prec), start in zip(pieces, starts):
        if not prec["heldout"]:
            continue
        with np.load(os.path.join(d, prec["shard"] + ".keys.npz"), allow_pickle=False) as z:
            slots = z["heldout_slot"]
        path = os.path.join(d, prec["heldout"])
        paths.append(path)
        at, count = 0, 0
        with open(path, "rb") as f:
            for line in f:
                count += 1
                piece.append(len(paths) - 1)
                offset.append(at)
                size.append(len(line))
                at += len(line)
                if order_by:
                    rec, reason = parse_line(line.rstrip(b"\n"), text_key)
                    if rec is None:  # stage 1 parsed it: the temp file was damaged
                        raise DataFormatError(f"{path}:{count}: {reason} in a held-out line")
                    keys.append(order_value(rec, order_by))
        if len(slots) != prec["heldout_documents"] or count != len(slots):
            raise DataFormatError(
                f"{path}: {count} lines but {len(slots)} held-out slots recorded; "
                "rerun preprocess with --overwrite"
            )
        position.extend((start + slots).tolist())
    lines = HeldoutLines(
        paths,
        np.asarray(piece, dtype=np.int32),
        np.asarray(offset, dtype=np.int64),
        np.asarray(size, dtype=np.int64),
        np.asarray(position, dtype=np.int64),
    )
    return lines, keys


def _dense_rank(
    pieces: list[tuple[str, dict]], keys: list[tuple[int, float, str]]
) -> tuple[np.ndarray, int]:
    """One integer per document, training documents (input order) then held-out lines,
    ordered like their (class, number, string) keys: numbers by value, then strings by
    value, then missing; equal keys get equal ranks. Also the number of training ones."""
    names = sorted(
        {s for _, prec in pieces for s in prec["strings"]} | {s for c, _, s in keys if c == 1}
    )
    rank_of = {s: r for r, s in enumerate(names)}
    cls, num, srank = [], [], []
    for d, prec in pieces:
        with np.load(os.path.join(d, prec["shard"] + ".keys.npz"), allow_pickle=False) as z:
            cls.append(z["cls"])
            num.append(z["num"])
            table = np.array([rank_of[s] for s in prec["strings"]] + [-1], dtype=np.int64)
            srank.append(table[z["codes"]])  # code -1 indexes the trailing -1
    n_train = sum(len(c) for c in cls)
    cls.append(np.array([c for c, _, _ in keys], dtype=np.int8))
    num.append(np.array([v for _, v, _ in keys], dtype=np.float64))
    srank.append(np.array([rank_of[s] if c == 1 else -1 for c, _, s in keys], dtype=np.int64))
    c, v, r = np.concatenate(cls), np.concatenate(num), np.concatenate(srank)
    values = np.unique(v[c == 0])
    k = np.full(len(c), len(values) + len(names), dtype=np.int64)  # missing: last
    k[c == 0] = np.searchsorted(values, v[c == 0])
    k[c == 1] = len(values) + r[c == 1]
    return k, n_train


def training_before(
    pieces: list[tuple[str, dict]], order_by: str | None, text_key: str
) -> tuple[HeldoutLines, np.ndarray]:
    """The partition's held-out lines and, per line, how many training documents precede
    it in unit order (a position 0..n_train in the training order)."""
    lines, keys = _read_lines(pieces, order_by, text_key)
    if not order_by or not len(lines.position):
        return lines, lines.position  # input order: the slot is the position
    k, n = _dense_rank(pieces, keys)
    # One int64 per document: (rank, input slot). A held-out line shares its slot with the
    # training document right after it in the input and sorts before it (searchsorted
    # "left" counts only smaller keys), matching the ties-in-input-order rule.
    if (int(k.max()) + 1) * (n + 1) >= 2**63:
        raise DataFormatError(f"partition too large to place held-out documents ({n} documents)")
    train_key = np.sort(k[:n] * (n + 1) + np.arange(n, dtype=np.int64))
    held_key = k[n:] * (n + 1) + lines.position
    return lines, np.searchsorted(train_key, held_key, side="left").astype(np.int64)


def unit_of(before: np.ndarray, ranges: list[tuple[int, int]], n_train: int) -> np.ndarray:
    """Per held-out line, its unit index (into ``ranges``) or -1 (dropped remainder, or
    no units); ``before`` from :func:`training_before`, ranges from ``split_units``."""
    if not ranges or not n_train:
        return np.full(len(before), -1, dtype=np.int64)
    pos = np.minimum(before, n_train - 1)  # after every training document: the last one's
    starts = np.array([a for a, _ in ranges], dtype=np.int64)
    stops = np.array([b for _, b in ranges], dtype=np.int64)
    u = np.searchsorted(starts, pos, side="right") - 1  # ranges start at 0: u >= 0
    return np.where(pos < stops[u], u, -1)


def _write_unit_file(dest: str, lines: HeldoutLines, members: np.ndarray) -> str:
    """Copy lines ``members`` (ascending, so piece by piece) into ``dest``; its sha256."""
    h = hashlib.sha256()
    pieces = lines.piece[members]
    runs = np.split(members, np.flatnonzero(np.diff(pieces)) + 1)  # one run per piece
    with atomic_open(dest, "wb") as f:
        for run in runs:
            with open(lines.paths[int(lines.piece[run[0]])], "rb") as src:
                for at, size in zip(lines.offset[run].tolist(), lines.size[run].tolist()):
                    src.seek(at)
                    chunk = src.read(size)
                    f.write(chunk)
                    h.update(chunk)
    return h.hexdigest()


def write_unit_heldout(
    out: str,
    pieces: list[tuple[str, dict]],
    order_by: str | None,
    text_key: str,
    ranges: list[tuple[int, int]],
    n_train: int,
    unit_names: list[str],
) -> tuple[dict[str, dict | None], int]:
    """Write every unit's held-out file; return (unit -> manifest record or None, the
    number of held-out documents that belong to no unit)."""
    if not sum(prec["heldout_documents"] for _, prec in pieces):
        return dict.fromkeys(unit_names), 0
    lines, before = training_before(pieces, order_by, text_key)
    units = unit_of(before, ranges, n_train)
    records: dict[str, dict | None] = {}
    for ui, name in enumerate(unit_names):
        members = np.flatnonzero(units == ui)
        if not len(members):
            records[name] = None
            continue
        rel = f"{UNIT_HELDOUT_DIR}/{name}.jsonl"
        digest = _write_unit_file(os.path.join(out, rel), lines, members)
        records[name] = {"path": rel, "documents": len(members), "sha256": digest}
    return records, int((units < 0).sum())
