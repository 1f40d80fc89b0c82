"""merge/stretch.py: the shortening of a merge, its mean over pairs of models, and the
relative stretch, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megablocks_ablate.merge import stretch as st


def _t(*v):
    return {"w": torch.tensor(v, dtype=torch.float32)}


SEED = _t(0.0, 0.0)


def _average(seed, deltas, weights):
    return {k: seed[k] + sum(w * d[k] for d, w in zip(deltas, weights)) for k in seed}


def test_shortening_is_the_mean_move_over_the_merged_move():
    x, y = _t(1.0, 0.0), _t(0.0, 1.0)
    w = [0.5, 0.5]
    # right angles, unit length: the average (0.5, 0.5) has length 1/sqrt 2
    assert st.shortening(SEED, [x, y], _average(SEED, [x, y], w), w)["w"] == pytest.approx(
        math.sqrt(2)
    )
    assert st.shortening(SEED, [x, x], _average(SEED, [x, x], w), w)["w"] == pytest.approx(1.0)
    # opposite moves cancel to nothing: no direction to stretch, ratio 1
    assert st.shortening(SEED, [x, _t(-1.0, 0.0)], SEED, w)["w"] == 1.0
    # unequal weights and lengths: (0.25 x 2 + 0.75 x 1) / |(0.5, 0.75)|
    a, b = _t(2.0, 0.0), _t(0.0, 1.0)
    got = st.shortening(SEED, [a, b], _average(SEED, [a, b], [0.25, 0.75]), [0.25, 0.75])["w"]
    assert got == pytest.approx(1.25 / math.hypot(0.5, 0.75))


def test_reference_is_the_mean_over_every_pair_and_a_fixed_sample_of_many():
    deltas = {"a": _t(1.0, 0.0), "b": _t(0.0, 1.0), "c": _t(1.0, 0.0)}
    seen = []

    def merge(pair):
        seen.append(tuple(pair))
        return _average(SEED, [deltas[u] for u in pair], [0.5, 0.5])

    ref = st.reference_shortening(SEED, deltas, merge)["w"]
    assert sorted(seen) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert ref == pytest.approx((math.sqrt(2) + 1.0 + math.sqrt(2)) / 3)
    many = [f"u{i:02d}" for i in range(30)]  # 435 pairs
    pairs = st.reference_groups(many, 2)
    assert len(pairs) == st.MAX_GROUPS == len(set(pairs))
    assert pairs == st.reference_groups(list(reversed(many)), 2)  # the same sample each time
    assert all(a < b for a, b in pairs)
    assert len(st.reference_groups(many[:5], 2)) == 10
    triples = st.reference_groups([f"u{i:02d}" for i in range(64)], 3)  # 41,664 triples
    assert len(triples) == st.MAX_GROUPS == len(set(triples))
    assert all(len(set(t)) == 3 and list(t) == sorted(t) for t in triples)
    with pytest.raises(ValueError, match="at least two"):
        st.reference_shortening(SEED, {"a": deltas["a"]}, merge)
    with pytest.raises(ValueError, match="at least two"):
        st.reference_shortening(SEED, deltas, merge, size=4)  # no group of 4 of 3 models


def test_a_mixture_of_three_is_judged_against_triples():
    # three moves at right angles, equal weights: (1/3, 1/3, 1/3), length 1/sqrt 3
    deltas = {
        "a": _t(1.0, 0.0, 0.0),
        "b": _t(0.0, 1.0, 0.0),
        "c": _t(0.0, 0.0, 1.0),
        "d": _t(1.0, 0.0, 0.0),
    }
    seed = _t(0.0, 0.0, 0.0)
    merged = []

    def merge(group):
        merged.append(tuple(group))
        return _average(seed, [deltas[u] for u in group], [1 / len(group)] * len(group))

    ref = st.reference_shortening(seed, deltas, merge, size=3)["w"]
    assert sorted(merged) == [("a", "b", "c"), ("a", "b", "d"), ("a", "c", "d"), ("b", "c", "d")]
    # abc, bcd: 1 / (1/sqrt 3); abd, acd: 1 / |(2/3, 1/3, 0)| = 3 / sqrt 5
    assert ref == pytest.approx((2 * math.sqrt(3) + 2 * 3 / math.sqrt(5)) / 4)


def test_stretch_moves_each_tensor_by_its_shortening_relative_to_the_reference():
    x, y = _t(1.0, 0.0), _t(0.0, 1.0)
    w = [0.5, 0.5]
    merged = _average(SEED, [x, y], w)
    ref = {"w": 1.2}
    full = st.stretch_merge(SEED, [x, y], w, merged, ref, 1.0)["w"]
    assert torch.allclose(full, merged["w"] * math.sqrt(2) / 1.2)
    quarter = st.stretch_merge(SEED, [x, y], w, merged, ref, 0.25)["w"]
    assert torch.allclose(quarter, merged["w"] * (math.sqrt(2) / 1.2) ** 0.25)
    # from a seed that is not zero: the displacement is stretched, not the weights
    seed = _t(3.0, -1.0)
    moved = _average(seed, [x, y], w)
    out = st.stretch_merge(seed, [x, y], w, moved, ref, 1.0)["w"]
    assert torch.allclose(out, seed["w"] + (moved["w"] - seed["w"]) * math.sqrt(2) / 1.2)
    # gamma 0, or a mixture of one model: the merge as it is
    assert torch.equal(st.stretch_merge(SEED, [x, y], w, merged, ref, 0.0)["w"], merged["w"])
    assert torch.equal(st.stretch_merge(SEED, [x], [1.0], _t(1.0, 0.0), ref, 1.0)["w"], x["w"])
    with pytest.raises(ValueError, match="gamma"):
        st.stretch_merge(SEED, [x, y], w, merged, ref, -0.5)
