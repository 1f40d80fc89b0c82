"""Scoring windows over documents, and length-bucketed batches of windows.

**What is predicted.** A document with tokens ``t_0 .. t_{n-1}`` is read as the
sequence ``s = [EOD, t_0, .., t_{n-1}]``: the EOD id stands for "a new document starts
here", which is exactly the context a document's first token had during training
(packed samples separate documents by EOD). Every one of the ``n`` text tokens is
predicted (label ``j`` is ``t_j``, its input is ``s[j]``); the document's own closing
EOD is not. So the predicted tokens cover the whole text, and bits per byte divides by
all of the text's UTF-8 bytes.

**Windows.** A document longer than the model's ``max_len`` is scored in windows.
Window ``w`` scores labels ``[a, b)`` and sees inputs ``[c, b)`` with
``c = max(0, b - max_len)``, i.e. as much context as fits:

* the first window scores ``[0, min(n, max_len))``;
* each next one scores the next ``stride`` labels, ``[b_prev, min(b_prev + stride, n))``.

``stride = max_len`` (the default) gives non-overlapping windows: the document is cut
into chunks of ``max_len`` labels, each scored with the context since its chunk began,
except that the last, shorter chunk is given a full ``max_len`` of context (which costs
nothing extra; lm-eval's rolling log-likelihood does the same). A smaller stride gives
sliding windows: every token after the first window sees at least ``max_len - stride``
tokens of context, at the cost of about ``max_len / stride`` times more compute.

**Batches.** Windows of one domain are sorted by length (longest first, ties in
document order) and packed greedily into batches of at most ``batch_tokens`` padded
tokens, so padding is small. The plan depends only on the data and these settings, never
on the number of ranks: batch ``i`` goes to rank ``i % world``, and every batch is
computed identically whatever the world size (see :mod:`.perplexity`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megablocks_ablate.errors import ConfigError

IGNORE_INDEX = -100


def document_windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(c, a, b)`` per window of a document of ``n`` tokens (see the module docstring)."""
    if n <= 0:
        return []
    b = min(n, max_len)
    out = [(0, 0, b)]
    while b < n:
        a, b = b, min(b + stride, n)
        out.append((max(0, b - max_len), a, b))
    return out


@dataclass
class Windows:
    """Every window of one domain: document index and ``(c, a, b)`` label offsets."""

    doc: np.ndarray  # int64 [W]
    c: np.ndarray
    a: np.ndarray
    b: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.b - self.c

    @property
    def scored(self) -> np.ndarray:
        return self.b - self.a


def plan_windows(doc_lengths: np.ndarray, max_len: int, stride: int) -> Windows:
    """Windows of every document (vectorised for the common one-window documents)."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    short = lengths <= max_len
    rows = [
        np.flatnonzero(short),
        np.zeros(int(short.sum()), np.int64),
        np.zeros(int(short.sum()), np.int64),
        lengths[short],
    ]
    long_docs = np.flatnonzero(~short)
    if long_docs.size:
        extra = [
            (d, c, a, b)
            for d in long_docs.tolist()
            for c, a, b in document_windows(int(lengths[d]), max_len, stride)
        ]
        cols = np.asarray(extra, dtype=np.int64).T
        rows = [np.concatenate([r, col]) for r, col in zip(rows, cols)]
    order = np.lexsort((rows[2], rows[0]))  # document order, then position
    doc, a, b = rows[0][order], rows[2][order], rows[3][order]
    return Windows(doc=doc, c=np.maximum(0, b - max_len), a=a, b=b)


@dataclass
class Batch:
    """A batch of windows of one domain, as ``[B, T + 1]`` tokens on the CPU.

    Row ``r`` holds ``s[c : b + 1]`` padded with EOD; inputs are ``tokens[:, :-1]``,
    labels ``tokens[:, 1:]``, scored where ``start[r] <= pos < end[r]``.
    """

    domain: str
    tokens: torch.Tensor  # int32 [B, T + 1]
    start: torch.Tensor  # int64 [B]: first scored position (a - c)
    end: torch.Tensor  # int64 [B]: one past the last scored position (b - c)
    scored_tokens: int

    def inputs_and_labels(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens.to(device, non_blocking=True).long()
        inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
        pos = torch.arange(labels.shape[1], device=device)
        start, end = self.start.to(device), self.end.to(device)
        keep = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
        labels.masked_fill_(~keep, IGNORE_INDEX)
        return inputs, labels


def bucket_windows(
    lengths: np.ndarray, batch_tokens: int, max_rows: int | None = None
) -> list[np.ndarray]:
    """Window indices per batch: longest first, greedy, ``rows * longest <= batch_tokens``."""
    order = np.argsort(-lengths, kind="stable")
    batches, i, n = [], 0, len(order)
    while i < n:
        longest = int(lengths[order[i]])
        rows = max(1, batch_tokens // max(longest, 1))
        if max_rows:
            rows = min(rows, max_rows)
        batches.append(order[i : i + rows])
        i += rows
    return batches


def make_batch(
    domain: str,
    tokens: np.ndarray,
    offsets: np.ndarray,
    eod_id: int,
    win: Windows,
    rows: np.ndarray,
) -> Batch:
    """Materialise the windows ``rows`` of one domain (see :class:`Batch`)."""
    lengths = win.lengths[rows]
    width = int(lengths.max()) + 1
    out = np.full((len(rows), width), eod_id, dtype=np.int32)
    for r, w in enumerate(rows.tolist()):
        doc_start = int(offsets[win.doc[w]])
        c, b = int(win.c[w]), int(win.b[w])
        # s[j] = t[j - 1] for j >= 1 and s[0] = EOD: s[c : b + 1] = EOD? + t[max(c-1, 0) : b]
        lo = max(c - 1, 0)
        seg = tokens[doc_start + lo : doc_start + b]
        out[r, 1 if c == 0 else 0 : (1 if c == 0 else 0) + len(seg)] = seg
    start = (win.a[rows] - win.c[rows]).astype(np.int64)
    end = lengths.astype(np.int64)
    return Batch(
        domain=domain,
        tokens=torch.from_numpy(out),
        start=torch.from_numpy(start),
        end=torch.from_numpy(end),
        scored_tokens=int((end - start).sum()),
    )


@dataclass
class Plan:
    """The global batch list of a suite for one (max_len, stride, batch_tokens)."""

    domains: list[str]
    batch_domain: np.ndarray  # int64 [num_batches]: index into domains
    batch_rows: list[np.ndarray]
    windows: dict[str, Windows]
    scored_tokens: np.ndarray  # int64 [num_batches]

    @property
    def num_batches(self) -> int:
        return len(self.batch_rows)

    def owned(self, rank: int, world: int) -> range:
        return range(rank, self.num_batches, world)


BEYOND_FLAG = "--beyond-trained-context"  # the commands' opt-in to untrained positions


def resolve_window(
    requested: int | None,
    trained_len: int | None,
    max_seq_len: int,
    name: str,
    *,
    beyond: bool = False,
    flag: str = "max_len",
    beyond_flag: str = "beyond_trained_context=True",
) -> int:
    """The window length (``max_len``) to score ``name`` at: ``requested``, by default
    the length it was trained at (``trained_len``; its ``max_seq_len`` when unknown).

    A window longer than the trained length scores positions the model never trained on:
    refused (ConfigError naming both numbers and ``beyond_flag``) unless ``beyond``. One
    longer than ``max_seq_len`` is refused always. ``flag`` names the setting in messages
    (``--max-len`` for the commands)."""
    trained = max_seq_len if trained_len is None else min(trained_len, max_seq_len)
    window = trained if requested is None else requested
    if window < 1:
        raise ConfigError(f"{flag}: must be positive, got {window}")
    if window > max_seq_len:
        raise ConfigError(
            f"{flag} {window} exceeds the max_seq_len={max_seq_len} of {name} "
            "(the model has no positions beyond it)"
        )
    if window > trained and not beyond:
        raise ConfigError(
            f"{flag} {window} exceeds the {trained} tokens {name} was trained at; "
            f"pass {beyond_flag} to score untrained positions"
        )
    return window


def validate_window_args(max_len: int, stride: int | None) -> int:
    if max_len < 1:
        raise ConfigError(f"max_len: must be positive, got {max_len}")
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ConfigError(
            f"stride: must be between 1 and the model's max length {max_len}, got {stride}"
        )
    return stride


def make_plan(
    sets: dict, max_len: int, stride: int, batch_tokens: int, max_rows: int | None = None
) -> Plan:
    """Windows and batches of every domain of ``sets`` (``{domain: EvalSet}``)."""
    domains = list(sets)
    batch_domain, batch_rows, scored, windows = [], [], [], {}
    for d_index, domain in enumerate(domains):
        s = sets[domain]
        win = plan_windows(s.lengths(), max_len, stride)
        windows[domain] = win
        for rows in bucket_windows(win.lengths, max(batch_tokens, max_len), max_rows):
            batch_domain.append(d_index)
            batch_rows.append(rows)
            scored.append(int(win.scored[rows].sum()))
    return Plan(
        domains=domains,
        batch_domain=np.asarray(batch_domain, np.int64),
        batch_rows=batch_rows,
        windows=windows,
        scored_tokens=np.asarray(scored, np.int64),
    )
