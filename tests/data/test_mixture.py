"""MixtureDataset: greedy blending over units, upsampling weights, DP sharding, exact resume."""

from __future__ import annotations

import numpy as np
import pytest

from megablocks_ablate.data.indexed import IndexedDatasetWriter
from megablocks_ablate.data.mixture import (
    MixtureDataset,
    partition_balanced_weights,
    token_weighted,
)
from megablocks_ablate.data.packed import PackedDataset
from megablocks_ablate.errors import DataFormatError

SEQ = 8


def write_unit(prefix, n_docs, rng, offset):
    """A unit whose tokens lie in [offset, offset + 100), so samples reveal their unit."""
    with IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for n in rng.integers(2, 20, size=n_docs):
            w.add_document(rng.integers(offset, offset + 100, size=n).astype(np.uint16))
    return str(prefix)


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    d = tmp_path_factory.mktemp("units")
    rng = np.random.default_rng(0)
    return {
        name: write_unit(d / name, n, rng, 100 * (k + 1))
        for k, (name, n) in enumerate([("bio-0", 30), ("bio-1", 25), ("cs-0", 6)])
    }


def unit_of(sample):
    return int(sample[0]) // 100 - 1


def test_partition_balanced_weights_known_values():
    w = partition_balanced_weights({"A": ["a1", "a2"], "B": ["b1"]})
    assert w == {"a1": 0.25, "a2": 0.25, "b1": 0.5}
    w = partition_balanced_weights({"A": ["a1", "a2", "a3", "a4"], "B": ["b1", "b2"], "C": ["c"]})
    assert w["a1"] == pytest.approx(1 / 12) and w["b2"] == pytest.approx(1 / 6)
    assert w["c"] == pytest.approx(1 / 3) and sum(w.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="more than one partition"):
        partition_balanced_weights({"A": ["x"], "B": ["x"]})
    with pytest.raises(ValueError, match="no units"):
        partition_balanced_weights({"A": []})


def test_token_weighted():
    assert token_weighted({"a": 300, "b": 100}) == {"a": 0.75, "b": 0.25}
    with pytest.raises(ValueError, match="zero tokens"):
        token_weighted({"a": 0})
    with pytest.raises(ValueError, match="negative"):
        token_weighted({"a": -1, "b": 2})


def test_blend_draws_each_unit_sample_once_and_upsamples(units):
    weights = partition_balanced_weights({"bio": ["bio-0", "bio-1"], "cs": ["cs-0"]})
    mix = MixtureDataset(units, weights, size=300, seq_len=SEQ, seed=4)
    assert len(mix) == 300
    np.testing.assert_array_equal(mix.counts, [75, 75, 150])
    cs = mix.components[2]
    assert cs.num_epochs > 1  # 6 small documents, upsampled to half the mixture
    taken = {k: [] for k in range(3)}
    for i in range(len(mix)):
        d, s = int(mix.dataset_index[i]), int(mix.dataset_sample_index[i])
        x = mix[i]
        assert unit_of(x) == d and x.shape == (SEQ + 1,)
        np.testing.assert_array_equal(x, mix.components[d][s])
        taken[d].append(s)
    for d in range(3):  # every sample of every unit's packed dataset exactly once, in order
        assert taken[d] == list(range(len(mix.components[d])))
    # Every prefix holds each unit's share to within one sample.
    w = mix.weights
    counts = np.cumsum(np.eye(3, dtype=np.int64)[mix.dataset_index], axis=0)
    assert np.all(np.abs(counts - np.outer(np.arange(1, 301), w)) <= 1 + 1e-9)


def test_zero_weight_unit_is_not_opened(units):
    mix = MixtureDataset(list(units.values()), [1, 0, 1], size=40, seq_len=SEQ)
    assert mix.names == ["bio-0", "bio-1", "cs-0"]
    assert mix.components[1] is None and mix.counts[1] == 0
    assert {unit_of(mix[i]) for i in range(40)} == {0, 2}


def test_single_unit_mixture_equals_packed_dataset(units):
    mix = MixtureDataset([units["bio-0"]], seq_len=SEQ, seed=2)
    packed = PackedDataset(units["bio-0"], SEQ, seed=2)
    assert len(mix) == len(packed)  # default size: one epoch
    for i in range(len(mix)):
        np.testing.assert_array_equal(mix[i], packed[i])


def test_packed_components_are_checked(units):
    small = PackedDataset(units["cs-0"], SEQ, num_samples=3)
    big = PackedDataset(units["bio-0"], SEQ, num_samples=50)
    mix = MixtureDataset({"cs": small, "bio": big}, [1, 9], size=30)
    assert mix.seq_len == SEQ and mix.components[0] is small
    with pytest.raises(ValueError, match="holds 3 samples"):
        MixtureDataset({"cs": small, "bio": big}, [1, 1], size=30)
    with pytest.raises(ValueError, match="seq_len"):
        MixtureDataset({"cs": small}, [1], size=3, seq_len=SEQ + 1)


def all_rows(mix, global_batch, **kw):
    return [b for b in mix.batches(global_batch, **kw)]


def test_dp_shards_union_to_the_global_batch(units):
    mix = MixtureDataset(units, [1, 1, 1], size=100, seq_len=SEQ)
    whole = all_rows(mix, 12)
    assert len(whole) == 100 // 12  # the final partial global batch is dropped
    shards = [all_rows(mix, 12, dp_rank=r, dp_world=3, consumed_samples=0) for r in range(3)]
    for step, batch in enumerate(whole):
        parts = [shards[r][step] for r in range(3)]
        assert all(p.shape == (4, SEQ + 1) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), batch)  # rank r: rows 4r..4r+3
        np.testing.assert_array_equal(batch, np.stack([mix[step * 12 + k] for k in range(12)]))
    micro = all_rows(mix, 12, dp_rank=1, dp_world=3, consumed_samples=0, micro_batch=2)
    np.testing.assert_array_equal(np.concatenate(micro[:2]), shards[1][0])


def test_resume_yields_the_uninterrupted_tail(units):
    mix = MixtureDataset(units, [2, 1, 1], size=90, seq_len=SEQ, seed=7)
    full = all_rows(mix, 6, dp_rank=1, dp_world=2)
    assert mix.consumed_samples == 90

    run = MixtureDataset(units, [2, 1, 1], size=90, seq_len=SEQ, seed=7)
    it = run.batches(6, dp_rank=1, dp_world=2)
    for _ in range(4):
        next(it)
    state = run.state_dict()
    assert state["consumed_samples"] == 24

    resumed = MixtureDataset(units, [2, 1, 1], size=90, seq_len=SEQ, seed=7)
    resumed.load_state_dict(state)
    tail = all_rows(resumed, 6, dp_rank=1, dp_world=2)
    assert len(tail) == len(full) - 4
    for a, b in zip(tail, full[4:]):
        np.testing.assert_array_equal(a, b)
    explicit = all_rows(resumed, 6, dp_rank=1, dp_world=2, consumed_samples=24)
    np.testing.assert_array_equal(explicit[0], full[4])

    other = MixtureDataset(units, [1, 1, 1], size=90, seq_len=SEQ, seed=7)
    with pytest.raises(DataFormatError, match="mixture"):
        other.load_state_dict(state)
    with pytest.raises(DataFormatError, match="out of range"):
        resumed.load_state_dict({"consumed_samples": 91})


def test_bad_inputs(units, tmp_path):
    with pytest.raises(ValueError, match="non-negative"):
        MixtureDataset(units, {"bio-0": 1, "bio-1": -1, "cs-0": 1}, size=10, seq_len=SEQ)
    with pytest.raises(ValueError, match="all zero"):
        MixtureDataset(units, [0, 0, 0], size=10, seq_len=SEQ)
    with pytest.raises(ValueError, match="missing \\['cs-0'\\], unknown \\['x'\\]"):
        MixtureDataset(units, {"bio-0": 1, "bio-1": 1, "x": 1}, size=10, seq_len=SEQ)
    with pytest.raises(ValueError, match="2 weights for 3"):
        MixtureDataset(units, [1, 1], size=10, seq_len=SEQ)
    with pytest.raises(ValueError, match="seq_len"):
        MixtureDataset(units, size=10, seq_len=0)
    with pytest.raises(ValueError, match="at least one component"):
        MixtureDataset({}, size=10, seq_len=SEQ)
    with pytest.raises(ValueError, match="size must be positive"):
        MixtureDataset(units, size=0, seq_len=SEQ)
    empty = tmp_path / "empty"
    with IndexedDatasetWriter(str(empty), np.uint16):
        pass
    with pytest.raises(DataFormatError, match="empty"):
        MixtureDataset([str(empty)], size=5, seq_len=SEQ)
    mix = MixtureDataset(units, size=30, seq_len=SEQ)
    with pytest.raises(ValueError, match="not divisible"):
        next(mix.batches(10, dp_world=3))
    with pytest.raises(ValueError, match="dp_rank"):
        next(mix.batches(10, dp_rank=2, dp_world=2))
    with pytest.raises(ValueError, match="micro_batch"):
        next(mix.batches(10, micro_batch=3))
