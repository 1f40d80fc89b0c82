"""Scoring windows and length-bucketed batches (megablocks_ablate/evaluate/windows.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.evaluate.windows import (
    IGNORE_INDEX,
    bucket_windows,
    document_windows,
    make_batch,
    plan_windows,
    validate_window_args,
)


def test_non_overlapping_windows_tile_the_document():
    # (c, a, b): inputs [c, b), scored labels [a, b); the last, partial window is
    # extended to the left to a full max_len of context (as lm-eval's rolling windows)
    assert document_windows(10, 4, 4) == [(0, 0, 4), (4, 4, 8), (6, 8, 10)]
    assert document_windows(12, 4, 4) == [(0, 0, 4), (4, 4, 8), (8, 8, 12)]
    assert document_windows(4, 4, 4) == [(0, 0, 4)]
    assert document_windows(3, 4, 4) == [(0, 0, 3)]
    assert document_windows(0, 4, 4) == []


def test_sliding_windows_score_new_tokens_with_full_context():
    # stride 2: after the first window every window scores 2 labels and sees 4 inputs
    assert document_windows(9, 4, 2) == [(0, 0, 4), (2, 4, 6), (4, 6, 8), (5, 8, 9)]
    # stride 1: every label after the first window has exactly max_len inputs
    w = document_windows(7, 4, 1)
    assert w == [(0, 0, 4), (1, 4, 5), (2, 5, 6), (3, 6, 7)]


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_every_label_scored_once(stride):
    lengths = np.array([1, 5, 8, 9, 30, 17])
    win = plan_windows(lengths, 8, stride)
    for d, n in enumerate(lengths):
        rows = np.flatnonzero(win.doc == d)
        scored = np.concatenate([np.arange(win.a[r], win.b[r]) for r in rows])
        np.testing.assert_array_equal(scored, np.arange(n))
        assert (win.b[rows] - win.c[rows]).max() <= 8
        assert ((win.a[rows] - win.c[rows]) >= 0).all()
    # vectorised path agrees with the per-document definition
    ref = [(d, *w) for d, n in enumerate(lengths) for w in document_windows(int(n), 8, stride)]
    got = list(zip(win.doc.tolist(), win.c.tolist(), win.a.tolist(), win.b.tolist()))
    assert got == ref


def test_stride_bounds():
    assert validate_window_args(8, None) == 8
    for bad in (0, 9):
        with pytest.raises(ConfigError, match="stride"):
            validate_window_args(8, bad)


def test_buckets_longest_first_within_budget():
    lengths = np.array([3, 8, 2, 8, 5, 1, 7])
    batches = bucket_windows(lengths, batch_tokens=16)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(7))
    assert lengths[flat].tolist() == sorted(lengths.tolist(), reverse=True)
    for b in batches:
        assert len(b) * lengths[b].max() <= 16
    assert [len(b) for b in batches] == [2, 2, 3]  # (8, 8), (7, 5), (3, 2, 1)
    assert [len(b) for b in bucket_windows(lengths, 16, max_rows=1)] == [1] * 7


def test_batch_rows_start_with_eod_and_mask_context():
    eod = 2
    tokens = np.arange(10, 22, dtype=np.int32)  # doc 0: 10..14 (5), doc 1: 15..21 (7)
    offsets = np.array([0, 5, 12])
    win = plan_windows(np.array([5, 7]), 4, 2)
    batch = make_batch("d", tokens, offsets, eod, win, np.arange(len(win.doc)))
    inputs, labels = batch.inputs_and_labels(torch.device("cpu"))
    rows = list(zip(win.doc.tolist(), win.c.tolist(), win.a.tolist(), win.b.tolist()))
    for r, (d, c, a, b) in enumerate(rows):
        s = [eod] + list(range(10 + offsets[d], 10 + offsets[d + 1]))
        assert inputs[r, : b - c].tolist() == s[c:b]
        expect = [IGNORE_INDEX] * (a - c) + s[a + 1 : b + 1]
        assert labels[r, : b - c].tolist() == expect
        assert (labels[r, b - c :] == IGNORE_INDEX).all()
    assert batch.scored_tokens == 12
