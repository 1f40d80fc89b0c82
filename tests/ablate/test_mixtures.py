"""Mixtures, proxy weight vectors, in-domain proxies and the cost model (ablate/mixtures.py)."""

from __future__ import annotations

import math

import pytest

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.mixtures import ID_DOMAIN, Mixture, Score

UNEVEN = {"bio": ["bio-0", "bio-1", "bio-2"], "cs": ["cs-0"]}


def test_mixture_identity_ignores_order():
    a = Mixture.of({"cs": ["cs-0"], "bio": ["bio-2", "bio-0", "bio-1"]})
    b = Mixture.of(UNEVEN)
    assert a == b and a.id == b.id and len(a.id) == 16
    assert a.names == ("bio", "cs") and a.k == 2 and a.label == "bio+cs"
    assert a.units == ("bio-0", "bio-1", "bio-2", "cs-0")
    assert Mixture.from_json(a.to_json()) == a
    # regrouping the same units changes the mixture (its macro weights differ)
    assert Mixture.of({"all": ["bio-0", "bio-1", "bio-2", "cs-0"]}).id != a.id
    with pytest.raises(ValueError):
        Mixture.of({})
    with pytest.raises(ValueError):
        Mixture.of({"x": []})


def test_macro_micro_merged_weights():
    m = Mixture.of(UNEVEN)
    macro = mx.proxy_weights(m, "macro")
    assert macro == pytest.approx({"bio-0": 1 / 6, "bio-1": 1 / 6, "bio-2": 1 / 6, "cs-0": 0.5})
    micro = mx.proxy_weights(m, "micro")
    assert micro == pytest.approx({u: 0.25 for u in m.units})
    assert mx.proxy_weights(m, "merged") == micro
    with pytest.raises(ValueError, match="not a merge"):
        mx.proxy_weights(m, "mean_ind")
    with pytest.raises(ValueError, match="unknown proxy"):
        mx.proxy_weights(m, "soup")


def test_merge_plan_shares_identical_merges():
    plan = mx.merge_plan(Mixture.of(UNEVEN), mx.PROXIES)
    assert sorted(sorted(p) for _, p in plan) == [["macro"], ["merged", "micro"]]
    even = Mixture.of({"a": ["a-0"], "b": ["b-0"]})  # one unit per partition: one merge
    ((w, proxies),) = mx.merge_plan(even, ["merged", "macro", "micro", "mean_ind"])
    assert proxies == ["merged", "macro", "micro"] and w == {"a-0": 0.5, "b-0": 0.5}


def test_k_subsets_and_random_subsets():
    names = ["a", "b", "c", "d", "e"]
    assert len(mx.k_subsets(names, 2)) == 10 and mx.k_subsets(names, 5) == [tuple(names)]
    r1 = mx.random_subsets(names, 3, 4, seed=7)
    assert r1 == mx.random_subsets(names, 3, 4, seed=7)
    assert len(set(r1)) == 4 and all(len(c) == 3 for c in r1)
    assert mx.random_subsets(names, 3, 4, seed=8) != r1
    assert len(mx.random_subsets(names, 3, 100, seed=0)) == 10  # all when n >= C(5, 3)
    # a space too large to enumerate (C(128, 5) ~ 2.5e8) is sampled by rejection
    big = [f"p{i:03d}" for i in range(128)]
    r = mx.random_subsets(big, 5, 50, seed=1)
    assert len(set(r)) == 50 and r == mx.random_subsets(big, 5, 50, seed=1)
    with pytest.raises(ValueError, match="k=6"):
        mx.k_subsets(names, 6)


def test_leave_one_out_and_add_one():
    assert mx.leave_one_out(["a", "b", "c"]) == [
        ("a", "b", "c"),
        ("b", "c"),
        ("a", "c"),
        ("a", "b"),
    ]
    assert mx.add_one(["a"], ["a", "b", "c"]) == [("a",), ("a", "b"), ("a", "c")]


def test_pool_is_the_union_score():
    a, b = Score(nll_sum=100.0, tokens=50, bytes=200), Score(nll_sum=60.0, tokens=10, bytes=40)
    p = mx.pool([a, b])
    assert p.tokens == 60 and p.bytes == 240
    assert p.perplexity == pytest.approx(math.exp(160 / 60))
    assert p.bits_per_byte == pytest.approx(160 / math.log(2) / 240)


def test_mean_ind_and_ind_id_known_values():
    m = Mixture.of(UNEVEN)
    domain_units = {"bio": ["bio-0", "bio-1", "bio-2"], "cs": ["cs-0"], "math": ["math-0"]}
    ind = {
        "bio-0": {"bio": 10.0, "cs": 40.0, "wiki": 30.0},
        "bio-1": {"bio": 12.0, "cs": 44.0, "wiki": 33.0},
        "bio-2": {"bio": 14.0, "cs": 48.0, "wiki": 36.0},
        "cs-0": {"bio": 50.0, "cs": 20.0, "wiki": 40.0},
    }
    # mean over partitions of the partition's mean unit perplexity
    assert mx.mean_ind(m, "wiki", ind) == pytest.approx((33.0 + 40.0) / 2)
    assert mx.mean_ind(m, "bio", ind) == pytest.approx((12.0 + 50.0) / 2)
    # in domain: the component trained on that partition only
    assert mx.ind_id(m, "bio", ind, domain_units) == pytest.approx(12.0)
    assert mx.ind_id(m, "cs", ind, domain_units) == pytest.approx(20.0)
    # the mixture's own held-out sets: each component on its own set, averaged
    assert mx.ind_id(m, ID_DOMAIN, ind, domain_units) == pytest.approx((12.0 + 20.0) / 2)
    # out of domain (not a training partition's held-out set): undefined
    assert mx.ind_id(m, "wiki", ind, domain_units) is None
    assert mx.ind_id(m, "math", ind, domain_units) is None
    assert mx.in_domain_sets(m, domain_units) == ["bio", "cs"]


def test_cost_counts_units_once_and_seq_per_mixture():
    parts = {p: [f"{p}-0"] for p in "abcd"}
    mixtures = mx.make_mixtures(mx.k_subsets(list(parts), 2), parts)  # 6 pairs
    cost = mx.study_cost(mixtures, mixtures[:2], unit_tokens=1000)
    assert cost.units_trained == 4 and cost.modular_tokens == 4000
    assert cost.naive_tokens == 6 * 2 * 1000 and cost.seq_validation_tokens == 2 * 2 * 1000
    assert cost.savings == pytest.approx(3.0)
    assert mx.seq_tokens(Mixture.of(UNEVEN), 1000) == 4000  # one unit budget per unit


# ----------------------------------------------------------------- proportion mixtures


def test_proportion_mixture_identity_weights_and_round_trip():
    parts = {"bio": ["bio-0", "bio-1"], "cs": ["cs-0"], "math": ["math-0"]}
    m = mx.weighted_mixture({"cs": 3, "bio": 6, "math": 1}, parts)
    assert m.weighted and m.proportions == {"bio": 0.6, "cs": 0.3, "math": 0.1}
    assert m.label == "bio:0.60+cs:0.30+math:0.10"
    assert Mixture.from_json(m.to_json()) == m and Mixture.from_json(m.to_json()).id == m.id
    # order and scale do not change the id; other shares do; equal shares ARE the
    # equal-share mixture (same id as before proportions existed)
    assert mx.weighted_mixture({"math": 0.1, "bio": 0.6, "cs": 0.3}, parts).id == m.id
    assert mx.weighted_mixture({"math": 0.2, "bio": 0.5, "cs": 0.3}, parts).id != m.id
    equal = mx.weighted_mixture({"bio": 1, "cs": 1, "math": 1}, parts)
    assert equal == Mixture.of(parts) and not equal.weighted
    assert Mixture.of({"cs": ["cs-0"]}).id == Mixture.of({"cs": ["cs-0"]}, None).id
    # a zero share drops the partition
    assert mx.weighted_mixture({"bio": 0.5, "cs": 0.5, "math": 0}, parts).names == ("bio", "cs")
    # every merge proxy: p_g / |g| per unit; seq budget is the equal-share mixture's
    w = {"bio-0": 0.3, "bio-1": 0.3, "cs-0": 0.3, "math-0": 0.1}
    for proxy in mx.MERGE_PROXIES:
        assert mx.proxy_weights(m, proxy) == pytest.approx(w)
    assert len(mx.merge_plan(m, mx.MERGE_PROXIES)) == 1
    pm = {"bio": "partition:bio", "cs": "cs-0", "math": "math-0"}
    assert mx.proxy_weights(m, "merged", pm) == pytest.approx(
        {"partition:bio": 0.6, "cs-0": 0.3, "math-0": 0.1}
    )
    assert mx.seq_tokens(m, 100) == mx.seq_tokens(Mixture.of(parts), 100) == 400


def test_proportion_mixture_shares_are_checked_and_rounded():
    parts = {"a": ["a-0"], "b": ["b-0"], "c": ["c-0"]}
    s = mx.normalise_shares({"a": 1, "b": 1, "c": 1}, ["a", "b", "c"])
    assert math.fsum(s.values()) == pytest.approx(1.0, abs=1e-12)
    assert all(len(repr(v).split(".")[-1]) <= 6 for v in s.values())
    with pytest.raises(ValueError, match=r"unknown: \['z'\]"):
        mx.normalise_shares({"a": 1, "z": 1}, list(parts))
    with pytest.raises(KeyError):
        mx.weighted_mixture({"a": 1, "z": 1}, parts)
    with pytest.raises(ValueError, match="finite and >= 0"):
        mx.normalise_shares({"a": -1, "b": 2}, ["a", "b"])
    with pytest.raises(ValueError, match="all zero"):
        mx.normalise_shares({"a": 0, "b": 0}, ["a", "b"])
    with pytest.raises(ValueError, match="missing"):
        mx.normalise_shares({"a": 1}, ["a", "b"])


def test_mean_ind_and_ind_id_weight_partitions_by_share():
    parts = {"a": ["a-0"], "b": ["b-0"]}
    m = mx.weighted_mixture({"a": 0.75, "b": 0.25}, parts)
    ind = {"a-0": {"x": 10.0, "a": 4.0, "b": 30.0}, "b-0": {"x": 20.0, "a": 40.0, "b": 8.0}}
    assert mx.mean_ind(m, "x", ind) == pytest.approx(0.75 * 10 + 0.25 * 20)
    du = {"a": ["a-0"], "b": ["b-0"]}
    assert mx.ind_id(m, ID_DOMAIN, ind, du) == pytest.approx(0.75 * 4 + 0.25 * 8)
    assert mx.ind_id(m, "a", ind, du) == 4.0


def test_dirichlet_shares_are_seeded_and_on_the_simplex():
    names = ["a", "b", "c", "d"]
    draws = mx.dirichlet_shares(names, 5, 1.0, seed=7)
    assert draws == mx.dirichlet_shares(names, 5, 1.0, seed=7)
    assert draws != mx.dirichlet_shares(names, 5, 1.0, seed=8)
    for d in draws:
        assert set(d) == set(names) and math.fsum(d.values()) == pytest.approx(1.0)
        assert all(v >= 0 for v in d.values())
    sub = mx.dirichlet_shares(names, 6, 0.5, seed=1, k=2)
    assert all(len(d) == 2 and set(d) <= set(names) for d in sub)
    with pytest.raises(ValueError, match="alpha"):
        mx.dirichlet_shares(names, 2, 0.0, seed=0)
    with pytest.raises(ValueError, match="k must be >= 2"):
        mx.dirichlet_shares(names, 2, 1.0, seed=0, k=1)


def test_component_view_keeps_a_blend_s_shares():
    from megablocks_ablate.ablate.analysis import component_view

    parts = {"a": ["a-0", "a-1"], "b": ["b-0"]}
    m = mx.weighted_mixture({"a": 0.8, "b": 0.2}, parts)
    view, du = component_view(m, {"a": "partition:a"}, {"a": ["a-0", "a-1"], "b": ["b-0"]})
    assert view.proportions == {"a": 0.8, "b": 0.2} and view.units == ("partition:a", "b-0")
    ind = {"partition:a": {"x": 10.0}, "b-0": {"x": 20.0}}
    assert mx.mean_ind(view, "x", ind) == pytest.approx(12.0)
