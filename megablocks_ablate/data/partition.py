"""Partitions and base units: the pure logic of splitting a corpus (paper §2.2, §3).

* A document's **partition** is the value of one or more metadata fields
  (``--partition-by fos`` or ``fos,year``). A list value means the document is tagged
  with several values; the first is used (the paper: "we use the first FoS listed").
  Missing or empty values become ``"NA"`` (the paper treats untagged documents as
  their own field of study).
* A partition is split into **base units** of equal token count: documents are taken
  in order of a secondary key (``--order-by year``; document order when absent) and a
  unit is closed as soon as it holds at least ``unit_tokens`` tokens, so every unit
  exceeds the target by less than one document. The tail that cannot fill a unit is
  dropped by default (``remainder: keep`` makes it a final, smaller unit marked
  ``partial``); units then have equal size, as the method requires.
* The **held-out** split is by a salted hash of the document text, so it does not
  depend on input order, worker count or the other documents. (A partition whose
  share rounds below ``heldout_min_docs`` is topped up with its training documents of
  smallest hash after tokenization, :mod:`.preprocess_minimum`.)
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import numpy as np

NA = "NA"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _scalar(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, dict):
        return None
    return value


def has_value(record: dict, field: str) -> bool:
    """Whether ``record`` tags ``field`` with a value (one :func:`partition_key` does not
    turn into ``"NA"``)."""
    v = _scalar(record.get(field))
    return not (v is None or v == "")


def partition_key(record: dict, fields: list[str]) -> str:
    """The partition a record belongs to, as a readable string ("NA" when untagged)."""
    if not fields:
        return "all"
    parts = []
    for f in fields:
        parts.append(str(_scalar(record.get(f))) if has_value(record, f) else NA)
    return "+".join(parts)


def safe_name(key: str) -> str:
    """A filesystem-safe, readable name for a partition key (used in unit names)."""
    name = _UNSAFE.sub("_", key).strip("._") or "_"
    return name[:80]


def order_value(record: dict, field: str | None) -> tuple[int, float, str]:
    """Sort key of a document within its partition: numbers, then strings, then missing."""
    if not field:
        return (0, 0.0, "")
    v = _scalar(record.get(field))
    if v is None or v == "":
        return (2, 0.0, "")
    if isinstance(v, bool):
        return (0, float(v), "")
    if isinstance(v, (int, float)) and math.isfinite(v):
        return (0, float(v), "")
    s = str(v)
    try:
        f = float(s)
        if math.isfinite(f):
            return (0, f, "")
    except ValueError:
        pass
    return (1, 0.0, s)


def heldout_hash(text: str, salt: int = 0) -> int:
    """The salted 64-bit hash of a document's text that decides held-out membership:
    documents are held out in increasing order of it (:func:`is_heldout`; a partition's
    held-out minimum takes its training documents of smallest hash)."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(salt).encode()).digest()
    return int.from_bytes(h, "little")


def hash_below(h: int, fraction: float) -> bool:
    """Whether hash ``h`` (:func:`heldout_hash`) falls in the held-out ``fraction``."""
    return h / 2.0**64 < fraction


def is_heldout(text: str, fraction: float, salt: int = 0) -> bool:
    """Deterministic held-out membership from a salted hash of the document text."""
    if fraction <= 0.0:
        return False
    return hash_below(heldout_hash(text, salt), fraction)


def split_units(
    lengths: np.ndarray, unit_tokens: int | None, keep_remainder: bool = False
) -> tuple[list[tuple[int, int]], int, int]:
    """Cut an ordered sequence of document lengths into base units.

    Returns ``(ranges, leftover_docs, leftover_tokens)`` where ranges are half-open
    ``(start, stop)`` positions into ``lengths``. Each unit closes at the first
    document that brings it to >= ``unit_tokens`` tokens. ``unit_tokens=None`` makes
    the whole partition one unit.
    """
    n = len(lengths)
    if n == 0:
        return [], 0, 0
    if unit_tokens is None:
        return [(0, n)], 0, 0
    if unit_tokens <= 0:
        raise ValueError(f"unit_tokens must be positive, got {unit_tokens}")
    cum = np.cumsum(lengths, dtype=np.int64)
    ranges = []
    start, base = 0, 0
    while start < n:
        # first position whose cumulative count reaches base + unit_tokens
        stop = int(np.searchsorted(cum, base + unit_tokens, side="left")) + 1
        if stop > n:
            break
        ranges.append((start, stop))
        base = int(cum[stop - 1])
        start = stop
    leftover_docs = n - start
    leftover_tokens = int(cum[-1]) - base
    if keep_remainder and leftover_docs:
        ranges.append((start, n))
        leftover_docs, leftover_tokens = 0, 0
    return ranges, leftover_docs, leftover_tokens
