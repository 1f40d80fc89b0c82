"""Packed-sample and blending index builders: brute-force references, C++ == NumPy, cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megablocks_ablate import _ext
from megablocks_ablate.data import sample_index as si
from megablocks_ablate.errors import DataFormatError


def brute_force_sample_index(sizes, document_index, seq_len, num_samples):
    """Walk the concatenated stream token by token; row i = where token i*seq_len lives."""
    where = []  # (position in document_index, offset) of every stream token
    for pos, doc in enumerate(document_index):
        where.extend((pos, off) for off in range(int(sizes[doc])))
    return np.array([where[i * seq_len] for i in range(num_samples + 1)], dtype=np.int64)


def random_case(rng, max_docs=40, max_len=25):
    n = int(rng.integers(1, max_docs))
    sizes = rng.integers(0, max_len, size=n).astype(np.int32)
    sizes[rng.random(n) < 0.2] = 1  # documents of a single (EOD) token
    if sizes.sum() < 2:
        sizes[0] = 2
    return sizes


def require_cpp():
    if _ext.cpp is None:
        if os.environ.get("MBA_DISABLE_CPP") == "1":
            pytest.skip("C++ extension disabled by MBA_DISABLE_CPP=1")
        pytest.fail("megablocks_ablate._C is not built: run setup.py build_ext --inplace")
    return _ext.cpp


# -- NumPy builder against the brute force ----------------------------------------------


@pytest.mark.parametrize("case_seed", range(8))
def test_numpy_sample_index_matches_brute_force(case_seed):
    rng = np.random.default_rng(case_seed)
    sizes = random_case(rng)
    tpe = int(sizes.sum())
    for seq_len in (1, 2, 3, 7, 64):
        for num_epochs in (1, 3):
            doc_idx = si.build_document_index(sizes.size, num_epochs, np.random.RandomState(0))
            full = si.samples_per_epoch(num_epochs * tpe, seq_len)
            if full == 0:
                continue
            got = si.build_sample_index_numpy(sizes, doc_idx, seq_len, num_epochs, tpe)
            assert got.shape == (full + 1, 2) and got.dtype == np.int64
            np.testing.assert_array_equal(
                got, brute_force_sample_index(sizes, doc_idx, seq_len, full)
            )
            part = max(full // 2, 1)
            got = si.build_sample_index_numpy(sizes, doc_idx, seq_len, num_epochs, tpe, part)
            np.testing.assert_array_equal(
                got, brute_force_sample_index(sizes, doc_idx, seq_len, part)
            )


def test_known_small_index():
    # Docs of 3, 1 and 4 tokens, in order: stream positions 0..7; seq_len 3 -> tokens 0, 3, 6.
    sizes = np.array([3, 1, 4], np.int32)
    got = si.build_sample_index_numpy(sizes, np.array([0, 1, 2], np.int32), 3, 1, 8)
    np.testing.assert_array_equal(got, [[0, 0], [1, 0], [2, 2]])
    # A zero-length document is skipped: token 3 lives in doc 2, not in the empty doc 1.
    sizes = np.array([3, 0, 4], np.int32)
    got = si.build_sample_index_numpy(sizes, np.array([0, 1, 2], np.int32), 3, 1, 7)
    np.testing.assert_array_equal(got, [[0, 0], [2, 0], [2, 3]])


def test_document_index_epochs_are_separate_permutations():
    rng = np.random.RandomState(7)
    d = si.build_document_index(10, 3, rng)
    assert d.dtype == np.int32 and d.shape == (30,)
    ref = np.random.RandomState(7)
    for e in range(3):
        np.testing.assert_array_equal(d[e * 10 : (e + 1) * 10], ref.permutation(10))
        assert sorted(d[e * 10 : (e + 1) * 10]) == list(range(10))


def test_epoch_and_sample_counts():
    assert si.samples_per_epoch(101, 10) == 10
    assert si.samples_per_epoch(100, 10) == 9
    assert si.samples_per_epoch(1, 10) == 0
    assert si.num_epochs_for(10, 101, 10) == 1
    assert si.num_epochs_for(11, 101, 10) == 2
    assert si.num_epochs_for(30, 101, 10) == 3  # 301 tokens needed, 303 in 3 epochs


def test_packed_indices_exactly_num_samples_and_cover_full_epochs():
    sizes = np.array([5, 3, 8, 1, 6], np.int32)  # 23 tokens
    p = si.build_packed_indices(sizes, seq_len=4, num_samples=12, seed=3)
    assert p.num_epochs == 3  # 12 * 4 + 1 = 49 tokens > 2 * 23
    assert p.sample_index.shape == (13, 2)
    assert sorted(p.shuffle_index.tolist()) == list(range(12))
    # The first two epochs are fully inside the 49 tokens used: every document twice.
    used = p.document_index[: int(p.sample_index[-1, 0]) + 1]
    assert all(np.count_nonzero(used == d) >= 2 for d in range(5))
    again = si.build_packed_indices(sizes, 4, 12, seed=3)
    np.testing.assert_array_equal(again.shuffle_index, p.shuffle_index)
    other = si.build_packed_indices(sizes, 4, 12, seed=4)
    assert not np.array_equal(other.document_index, p.document_index)


def test_insufficient_tokens_and_bad_arguments():
    sizes = np.array([3, 3], np.int32)
    doc_idx = np.array([0, 1], np.int32)
    with pytest.raises(ValueError, match="need 13 tokens"):
        si.build_sample_index_numpy(sizes, doc_idx, 4, 1, 6, num_samples=3)
    with pytest.raises(ValueError, match="outside"):
        si.build_sample_index_numpy(sizes, np.array([0, 2], np.int32), 2, 1, 6)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="seq_len must be a positive integer"):
            si.build_packed_indices(sizes, bad, 1, 0)
    with pytest.raises(ValueError, match="empty dataset"):
        si.build_packed_indices(np.zeros(0, np.int32), 4, 1, 0)
    with pytest.raises(ValueError, match="empty dataset"):
        si.build_packed_indices(np.zeros(3, np.int32), 4, 1, 0)
    with pytest.raises(ValueError, match="num_samples must be positive"):
        si.build_packed_indices(sizes, 2, 0, 0)


# -- blending ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights", [[0.5, 0.3, 0.2], [1, 1, 1, 1, 1, 1, 1], [0.9, 0.1], [3, 0, 1], [1.0]]
)
def test_blend_prefix_shares_within_one_sample(weights):
    size = 500
    d_idx, s_idx = si.build_blending_indices_numpy(si.normalize_weights(weights), size)
    w = si.normalize_weights(weights)
    assert d_idx.dtype == np.int16 and s_idx.dtype == np.int64
    onehot = np.eye(len(w), dtype=np.int64)[d_idx]
    counts = np.cumsum(onehot, axis=0)  # counts[i, d]: picks of d among positions 0..i
    targets = np.outer(np.arange(1, size + 1), w)
    assert np.all(np.abs(counts - targets) <= 1.0 + 1e-9)
    for d in range(len(w)):  # each component's samples are taken in order 0, 1, 2, ...
        np.testing.assert_array_equal(s_idx[d_idx == d], np.arange(np.count_nonzero(d_idx == d)))
        if w[d] == 0:
            assert not np.any(d_idx == d)


def test_blend_known_sequence():
    d_idx, s_idx = si.build_blending_indices_numpy(np.array([0.5, 0.25, 0.25]), 8)
    np.testing.assert_array_equal(d_idx, [0, 1, 2, 0, 0, 1, 2, 0])
    np.testing.assert_array_equal(s_idx, [0, 0, 0, 1, 2, 1, 1, 3])


@pytest.mark.parametrize(
    "bad, match",
    [
        ([0.5, -0.1], "non-negative"),
        ([0, 0], "all zero"),
        ([], "at least one"),
        ([np.nan, 1], "finite"),
    ],
)
def test_bad_weights(bad, match):
    with pytest.raises(ValueError, match=match):
        si.build_blending_indices(bad, 10)


# -- C++ == NumPy ----------------------------------------------------------------------------


@pytest.mark.parametrize("case_seed", range(6))
def test_cpp_sample_index_equals_numpy(case_seed):
    cpp = require_cpp()
    rng = np.random.default_rng(100 + case_seed)
    sizes = random_case(rng, max_docs=300, max_len=60)
    tpe = int(sizes.sum())
    for seq_len in (1, 5, 33):
        for num_epochs in (1, 4):
            doc_idx = si.build_document_index(sizes.size, num_epochs, np.random.RandomState(1))
            for n in (-1, si.samples_per_epoch(tpe, seq_len)):
                if n == 0:
                    continue
                a = si.build_sample_index_numpy(sizes, doc_idx, seq_len, num_epochs, tpe, n)
                b = cpp.build_sample_index(sizes, doc_idx, seq_len, num_epochs, tpe, n)
                assert b.dtype == a.dtype
                np.testing.assert_array_equal(a, b)


def test_cpp_sample_index_errors():
    cpp = require_cpp()
    sizes = np.array([3, 3], np.int32)
    with pytest.raises(ValueError, match="need 13 tokens"):
        cpp.build_sample_index(sizes, np.array([0, 1], np.int32), 4, 1, 6, 3)
    with pytest.raises(IndexError, match="outside"):
        cpp.build_sample_index(sizes, np.array([0, 5], np.int32), 2, 1, 6, -1)
    with pytest.raises(ValueError, match="seq_len"):
        cpp.build_sample_index(sizes, np.array([0, 1], np.int32), 0, 1, 6, -1)


@pytest.mark.parametrize("case_seed", range(6))
def test_cpp_blending_equals_numpy(case_seed):
    cpp = require_cpp()
    rng = np.random.default_rng(case_seed)
    n = int(rng.integers(1, 12))
    w = rng.random(n) * (rng.random(n) > 0.2)
    if w.sum() == 0:
        w[0] = 1.0
    w = si.normalize_weights(w)
    a = si.build_blending_indices_numpy(w, 2000)
    b = cpp.build_blending_indices(w, 2000)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    # Exact ties (equal weights) resolve to the first component in both.
    a = si.build_blending_indices_numpy(si.normalize_weights([1, 1, 1]), 30)
    b = cpp.build_blending_indices(si.normalize_weights([1, 1, 1]), 30)
    np.testing.assert_array_equal(a[0], b[0])


def test_dispatch_gives_identical_packed_indices(monkeypatch):
    require_cpp()
    rng = np.random.default_rng(5)
    sizes = random_case(rng, max_docs=200, max_len=40)
    out = {}
    for backend in ("numpy", "cpp"):
        monkeypatch.setenv("MBA_SAMPLE_INDEX", backend)
        assert si.backend() == backend
        out[backend] = (
            si.build_packed_indices(sizes, 16, 300, seed=9),
            si.build_blending_indices([0.2, 0.5, 0.3], 777),
        )
    a, b = out["numpy"], out["cpp"]
    for kind in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(a[0], kind), getattr(b[0], kind))
    np.testing.assert_array_equal(a[1][0], b[1][0])
    np.testing.assert_array_equal(a[1][1], b[1][1])
    monkeypatch.setenv("MBA_SAMPLE_INDEX", "fortran")
    with pytest.raises(ValueError, match="MBA_SAMPLE_INDEX"):
        si.backend()


# -- cache -----------------------------------------------------------------------------------


def test_cache_hit_builds_nothing(tmp_path, monkeypatch):
    sizes = np.array([7, 2, 9, 4, 1, 12], np.int32)
    first = si.load_or_build(sizes, 5, 20, seed=2, name="u0", cache_dir=str(tmp_path))
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 3 and all(f.startswith("u0.packed-") and f.endswith(".npy") for f in files)

    def no_build(*a, **k):
        raise AssertionError("cache hit must not build")

    monkeypatch.setattr(si, "_build_indices", no_build)
    second = si.load_or_build(sizes, 5, 20, seed=2, name="u0", cache_dir=str(tmp_path))
    assert isinstance(second.sample_index, np.memmap)
    assert second.num_epochs == first.num_epochs
    for kind in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(first, kind), getattr(second, kind))
    # Any change of the inputs is a different key, hence a build.
    for kwargs in ({"seed": 3}, {"seq_len": 6}, {"num_samples": 21}):
        args = {"sizes": sizes, "seq_len": 5, "num_samples": 20, "seed": 2, **kwargs}
        with pytest.raises(AssertionError, match="must not build"):
            si.load_or_build(name="u0", cache_dir=str(tmp_path), **args)
    with pytest.raises(AssertionError, match="must not build"):
        si.load_or_build(sizes[::-1].copy(), 5, 20, seed=2, name="u0", cache_dir=str(tmp_path))


def test_corrupt_cache_is_reported(tmp_path):
    sizes = np.array([7, 2, 9, 4], np.int32)
    si.load_or_build(sizes, 5, 3, seed=2, name="u0", cache_dir=str(tmp_path))
    sample = next(p for p in os.listdir(tmp_path) if p.endswith("sample_index.npy"))
    np.save(tmp_path / sample, np.zeros((2, 2), np.int64))
    with pytest.raises(DataFormatError, match="sample_index.npy.*rebuild"):
        si.load_or_build(sizes, 5, 3, seed=2, name="u0", cache_dir=str(tmp_path))
