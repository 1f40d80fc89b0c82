"""Preprocess, between the stages: a minimum held-out set for every partition.

The hash rule (:func:`~.partition.is_heldout`) holds out the documents whose salted text
hash falls below ``heldout_fraction``. In a partition of a few hundred documents that
share rounds to zero often enough, and the partition is left without a held-out set:
no in-domain evaluation in a study. So after stage 1, a partition holding fewer than
``heldout_min_docs`` held-out documents is **topped up**: its training documents of
smallest hash (ties: earlier in the input) move to its held-out set until it holds the
minimum. The choice continues the hash rule's own order, so it depends only on the
documents and the salt (not on input order within a file, batch size or workers).

* **Training data first.** A partition keeps at least one training document: when the
  top-up would take its last one (a one-document partition, for the default minimum of
  1), nothing moves. A partition then left without a held-out set gets a reason,
  :func:`missing_reason`, recorded in the manifest and logged.
* **Candidates.** Stage 1 reserves, per input file and partition, the
  ``heldout_min_docs`` training documents of smallest hash with their raw lines
  (:mod:`.preprocess_stage1`); a partition's smallest overall are among them.
* **Moving a document** rewrites the stage-1 piece holding it under new names: the
  shard without it, the keys with the held-out slots renumbered, the held-out lines
  with its line merged in at its input position (so the per-unit held-out sets place it
  like any held-out document), the reserve without it; the file's ``done.json`` is
  replaced last. An interrupted run redoes the step; a finished one is not repeated
  (the partition then holds its minimum). Only partitions below the minimum are
  touched, typically small ones: a few small shard copies.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from megablocks_ablate.data.preprocess_stage1 import file_dir
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.utils.atomic import atomic_open, atomic_write_json

logger = logging.getLogger(__name__)

Pieces = list[tuple[str, dict]]  # (stage-1 file dir, the file's record of the partition)


def _keys(d: str, prec: dict) -> dict[str, np.ndarray]:
    with np.load(os.path.join(d, prec["shard"] + ".keys.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _lines(path: str, expected: int) -> list[bytes]:
    """The lines of a stage-1 held-out or reserve file, without their newlines."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")[:-1]
    if len(lines) != expected:
        raise DataFormatError(
            f"{path}: {len(lines)} lines, {expected} recorded; rerun preprocess with --overwrite"
        )
    return lines


def _choose(pieces: Pieces, need: int) -> dict[int, list[int]]:
    """The ``need`` reserved training documents of smallest (hash, file, position):
    piece index -> positions in that piece's reserve."""
    cands = []
    for pi, (d, prec) in enumerate(pieces):
        if prec["reserve"]:
            z = _keys(d, prec)
            for r, (h, j) in enumerate(
                zip(z["reserve_hash"].tolist(), z["reserve_index"].tolist())
            ):
                cands.append((h, pi, j, r))
    if len(cands) < need:  # stage 1 keeps heldout_min_docs per file: never fewer
        raise DataFormatError(
            f"{pieces[0][0]}: {len(cands)} held-out minimum candidates for {need} documents; "
            "rerun preprocess with --overwrite"
        )
    chosen: dict[int, list[int]] = {}
    for _, pi, _, r in sorted(cands)[:need]:
        chosen.setdefault(pi, []).append(r)
    return chosen


def _rewrite_piece(d: str, prec: dict, take: list[int]) -> dict:
    """Move reserve entries ``take`` of one stage-1 piece to its held-out set; write the
    new files and return the piece's new record (the caller replaces ``done.json``)."""
    from megablocks_ablate.data.indexed import IndexedDataset, IndexedDatasetWriter

    z = _keys(d, prec)
    reserve = _lines(os.path.join(d, prec["reserve"]), len(z["reserve_index"]))
    by_index = {int(z["reserve_index"][r]): reserve[r] for r in take}
    moved = np.array(sorted(by_index), dtype=np.int64)
    new = prec["shard"] + "m"
    with IndexedDataset(os.path.join(d, prec["shard"])) as ds:
        moved_tokens = int(np.asarray(ds.sequence_lengths, dtype=np.int64)[moved].sum())
        keep = np.ones(len(ds), dtype=bool)
        keep[moved] = False
        with IndexedDatasetWriter(os.path.join(d, new), ds.dtype) as w:
            for i in np.flatnonzero(keep).tolist():
                w.add_document(ds[i])
    # held-out lines and moved documents in input order: a held-out line of slot s comes
    # before training document s, so a moved document t sorts after the lines of slot t
    held = (
        _lines(os.path.join(d, prec["heldout"]), prec["heldout_documents"])
        if prec["heldout"]
        else []
    )
    if len(z["heldout_slot"]) != len(held):
        raise DataFormatError(
            f"{os.path.join(d, prec['shard'])}.keys.npz: {len(z['heldout_slot'])} held-out "
            f"slots for {len(held)} held-out lines; rerun preprocess with --overwrite"
        )
    pos = np.concatenate([z["heldout_slot"], moved])
    kind = np.concatenate([np.zeros(len(held), np.int64), np.ones(len(moved), np.int64)])
    order = np.lexsort((np.arange(len(pos)), kind, pos))
    slots = (pos - np.searchsorted(moved, pos, side="left"))[order]
    merged = held + [by_index[t] for t in moved.tolist()]
    with atomic_open(os.path.join(d, new + ".heldout.jsonl"), "wb") as f:
        f.writelines(merged[i] + b"\n" for i in order.tolist())
    taken = set(take)
    rest = [r for r in range(len(reserve)) if r not in taken]
    rest_index = z["reserve_index"][rest]
    if rest:
        with atomic_open(os.path.join(d, new + ".reserve.jsonl"), "wb") as f:
            f.writelines(reserve[r] + b"\n" for r in rest)
    with atomic_open(os.path.join(d, new + ".keys.npz"), "wb") as f:
        np.savez(
            f,
            cls=z["cls"][keep],
            num=z["num"][keep],
            codes=z["codes"][keep],
            heldout_slot=slots.astype(np.int64),
            reserve_hash=z["reserve_hash"][rest],
            reserve_index=rest_index - np.searchsorted(moved, rest_index, side="left"),
        )
    return {
        **prec,
        "shard": new,
        "train_documents": prec["train_documents"] - len(moved),
        "heldout_documents": prec["heldout_documents"] + len(moved),
        "heldout_tokens": prec["heldout_tokens"] + moved_tokens,
        "heldout": new + ".heldout.jsonl",
        "reserve": new + ".reserve.jsonl" if rest else None,
        "heldout_added": prec.get("heldout_added", 0) + len(moved),
    }


def top_up(
    plan: dict[str, Pieces], records: list[dict], tmp: str, fraction: float, min_docs: int
) -> None:
    """Give every partition of ``plan`` (key -> its stage-1 pieces, whose records are
    those of ``records``) at least ``min_docs`` held-out documents where it can keep a
    training document; rewrites the pieces involved and updates ``records`` in place."""
    if fraction <= 0.0 or min_docs <= 0:
        return
    record_of = {file_dir(tmp, i): rec for i, rec in enumerate(records)}
    for key, pieces in plan.items():
        held = sum(prec["heldout_documents"] for _, prec in pieces)
        train = sum(prec["train_documents"] for _, prec in pieces)
        need = min_docs - held
        if need <= 0 or train - need < 1:
            continue
        for pi, take in _choose(pieces, need).items():
            d, prec = pieces[pi]
            new = _rewrite_piece(d, prec, take)
            prec.clear()
            prec.update(new)  # the plan's and the record's entry: one object
            record_of[d]["partitions"][key] = prec
            atomic_write_json(os.path.join(d, "done.json"), record_of[d])
        logger.debug(
            "partition %s: %d training document(s) held out to reach %d", key, need, min_docs
        )


def added(pieces: Pieces) -> int:
    """How many of the partition's held-out documents the minimum added."""
    return sum(prec.get("heldout_added", 0) for _, prec in pieces)


def missing_reason(pieces: Pieces, fraction: float, min_docs: int) -> str | None:
    """Why the partition has no held-out set (None: it has one)."""
    if sum(prec["heldout_documents"] for _, prec in pieces):
        return None
    if fraction <= 0.0:
        return "no held-out sets asked for (--heldout-fraction 0)"
    if min_docs <= 0:
        return (
            f"no document's hash fell below --heldout-fraction {fraction:g} and "
            "--heldout-min-docs is 0"
        )
    train = sum(prec["train_documents"] for _, prec in pieces)
    contaminated = sum(prec["contaminated"] for _, prec in pieces)
    more = f" ({contaminated} more dropped as contaminated)" if contaminated else ""
    return (
        f"{train} document{'s' if train != 1 else ''}{more}: too few to hold out "
        f"{min_docs} (--heldout-min-docs) and keep one to train on"
    )


def log_heldout(partitions: dict[str, dict], fraction: float, min_docs: int) -> None:
    """Say which partitions the minimum topped up, and which have no held-out set and why
    (a warning, unless none was asked for: ``fraction`` 0)."""
    if fraction <= 0.0:
        logger.info("no held-out sets (--heldout-fraction 0)")
        return
    topped = {
        k: p["heldout"]["minimum_added"]
        for k, p in partitions.items()
        if p["heldout"] and p["heldout"].get("minimum_added")
    }
    if topped:
        logger.info(
            "held-out minimum (--heldout-min-docs %d): %d partition(s) whose "
            "--heldout-fraction share fell short got their training documents of smallest "
            "hash: %s",
            min_docs,
            len(topped),
            ", ".join(f"{k} (+{n})" for k, n in topped.items()),
        )
    missing = {k: p["heldout_missing"] for k, p in partitions.items() if p.get("heldout_missing")}
    if missing:
        logger.warning(
            "%d of %d partition(s) have no held-out set, so no in-domain evaluation in a study: %s",
            len(missing),
            len(partitions),
            "; ".join(f"{k} ({why})" for k, why in missing.items()),
        )
