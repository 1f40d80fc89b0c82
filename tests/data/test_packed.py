"""PackedDataset: samples equal slices of the brute-force token stream; caching; errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megablocks_ablate.data import sample_index as si
from megablocks_ablate.data.indexed import IndexedDataset, IndexedDatasetWriter
from megablocks_ablate.data.packed import PackedDataset
from megablocks_ablate.errors import DataFormatError

EOD = 0


def write_unit(prefix, lengths, rng):
    """Documents of the given lengths, random tokens ending in EOD; returns them."""
    docs = []
    with IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for n in lengths:
            doc = np.append(rng.integers(1, 1000, size=n - 1), EOD).astype(np.uint16)
            w.add_document(doc)
            docs.append(doc.astype(np.int64))
    return docs


def reference_stream(docs, seed, num_epochs):
    """The documented contract: each epoch a RandomState(seed) permutation, in order."""
    rng = np.random.RandomState(seed)
    order = np.concatenate([rng.permutation(len(docs)) for _ in range(num_epochs)])
    return np.concatenate([docs[d] for d in order])


@pytest.fixture
def unit(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, size=40)
    lengths[:5] = 1  # documents that are a lone EOD token
    prefix = tmp_path / "cs-0"
    return str(prefix), write_unit(prefix, lengths, rng)


@pytest.mark.parametrize("seq_len", [1, 4, 16, 100])
@pytest.mark.parametrize("epochs_wanted", [None, 1, 3.5])
def test_samples_are_slices_of_the_stream(unit, seq_len, epochs_wanted):
    prefix, docs = unit
    tokens = sum(d.size for d in docs)
    num_samples = None if epochs_wanted is None else int(epochs_wanted * (tokens - 1) // seq_len)
    ds = PackedDataset(prefix, seq_len, num_samples=num_samples, seed=11)
    expected_n = (tokens - 1) // seq_len if num_samples is None else num_samples
    assert len(ds) == expected_n and ds.tokens_per_epoch == tokens
    assert ds.num_epochs == -(-(expected_n * seq_len + 1) // tokens)
    stream = reference_stream(docs, 11, ds.num_epochs)
    seen = set()
    for i in range(len(ds)):
        s = int(ds.shuffle_index[i])
        seen.add(s)
        x = ds[i]
        assert x.dtype == np.int64 and x.shape == (seq_len + 1,)
        np.testing.assert_array_equal(x, stream[s * seq_len : s * seq_len + seq_len + 1])
    assert seen == set(range(len(ds)))  # the shuffle is a permutation
    np.testing.assert_array_equal(ds[-1], ds[len(ds) - 1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_consecutive_samples_share_one_boundary_token(unit):
    prefix, _ = unit
    ds = PackedDataset(prefix, 8, seed=1)
    for s in range(len(ds) - 1):
        assert ds.unshuffled(s)[-1] == ds.unshuffled(s + 1)[0]


def test_open_dataset_and_suffix_accepted(unit):
    prefix, _ = unit
    a = PackedDataset(prefix + ".idx", 8, seed=5)
    b = PackedDataset(IndexedDataset(prefix), 8, seed=5)
    np.testing.assert_array_equal(a[3], b[3])


def test_cache_beside_data_and_hit_builds_nothing(unit, monkeypatch, tmp_path):
    prefix, _ = unit
    first = PackedDataset(prefix, 16, num_samples=50, seed=3)
    cached = [f for f in os.listdir(os.path.dirname(prefix)) if ".packed-" in f]
    assert len(cached) == 3 and all(f.startswith("cs-0.packed-") for f in cached)

    def no_build(*a, **k):
        raise AssertionError("cache hit must not build")

    monkeypatch.setattr(si, "_build_indices", no_build)
    second = PackedDataset(prefix, 16, num_samples=50, seed=3)
    assert second.num_epochs == first.num_epochs
    for i in range(len(first)):
        np.testing.assert_array_equal(first[i], second[i])

    monkeypatch.undo()
    elsewhere = tmp_path / "cache"
    PackedDataset(prefix, 16, num_samples=50, seed=3, cache_dir=str(elsewhere))
    assert len(os.listdir(elsewhere)) == 3


def test_bad_inputs(tmp_path, unit):
    prefix, docs = unit
    with pytest.raises(ValueError, match="seq_len"):
        PackedDataset(prefix, 0)
    with pytest.raises(ValueError, match="num_samples must be positive"):
        PackedDataset(prefix, 4, num_samples=0)
    tokens = sum(d.size for d in docs)
    with pytest.raises(DataFormatError, match="fewer than one sample"):
        PackedDataset(prefix, tokens)
    # Too small for one epoch, but fine when repeated on request.
    assert PackedDataset(prefix, tokens, num_samples=2).num_epochs == 3
    empty = tmp_path / "empty"
    with IndexedDatasetWriter(str(empty), np.uint16):
        pass
    with pytest.raises(DataFormatError, match="empty"):
        PackedDataset(str(empty), 4)
    with pytest.raises(DataFormatError, match="not found"):
        PackedDataset(str(tmp_path / "missing"), 4)
