"""Preprocess stage 2, ordering: one partition's stage-1 shards -> its documents in unit order.

Documents are sorted by their ``--order-by`` key (numbers before strings before missing,
see :func:`~.partition.order_value`), ties kept in input order; without ``--order-by``
they stay in input order. Used by :mod:`.preprocess`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class OrderedDocs(NamedTuple):
    """A partition's documents: where each lives, its length, and the unit order."""

    shards: list  # the open stage-1 IndexedDatasets (close them when done)
    shard_of: np.ndarray  # shard id per document (input order)
    seq_of: np.ndarray  # index within its shard per document
    lengths: np.ndarray  # tokens per document
    order: np.ndarray  # document positions in unit order
    label: Callable[[int], object]  # label(pos): document ``pos``'s ``order_by`` value


def order_documents(pieces: list[tuple[str, dict]], order_by: str | None) -> OrderedDocs:
    """Load shards of one partition; return (shards, shard id per doc, seq id, lengths,
    order, label) where ``label(pos)`` is document ``pos``'s ``order_by`` value."""
    from megablocks_ablate.data.indexed import IndexedDataset

    shards, shard_of, seq_of, cls, num, srank, lengths = [], [], [], [], [], [], []
    all_strings = sorted({s for _, prec in pieces for s in prec["strings"]})
    rank_of = {s: r for r, s in enumerate(all_strings)}
    for sid, (d, prec) in enumerate(pieces):
        ds = IndexedDataset(os.path.join(d, prec["shard"]))
        shards.append(ds)
        n = len(ds)
        shard_of.append(np.full(n, sid, dtype=np.int32))
        seq_of.append(np.arange(n, dtype=np.int64))
        lengths.append(np.asarray(ds.sequence_lengths, dtype=np.int64))
        with np.load(os.path.join(d, prec["shard"] + ".keys.npz"), allow_pickle=False) as z:
            cls.append(z["cls"])
            num.append(z["num"])
            table = np.array([rank_of[s] for s in prec["strings"]] + [-1], dtype=np.int64)
            srank.append(table[z["codes"]])  # code -1 indexes the trailing -1
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.empty(0, dt)
    shard_of, seq_of = cat(shard_of, np.int32), cat(seq_of, np.int64)
    lengths = cat(lengths, np.int64)
    cls, num, srank = cat(cls, np.int8), cat(num, np.float64), cat(srank, np.int64)
    if order_by:
        order = np.lexsort((np.arange(len(lengths)), srank, num, cls))
    else:
        order = np.arange(len(lengths))

    def label(pos: int) -> object:
        if not order_by:
            return None
        c, v = int(cls[pos]), float(num[pos])
        if c == 0:
            return int(v) if v.is_integer() else v
        return all_strings[int(srank[pos])] if c == 1 else None

    return OrderedDocs(shards, shard_of, seq_of, lengths, order, label)
