"""Correlations, derived proxies, rankings, agreement and influence (ablate/analysis.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from study_fixtures import DOMAINS, fill_store, ppl

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate.mixtures import ID_DOMAIN, Mixture


def test_pearson_spearman_known_values():
    x, y = [1, 2, 3, 4, 5], [2, 4, 5, 4, 5]
    # r = 6 / sqrt(10 * 6): hand-computed
    assert an.pearson(x, y) == pytest.approx(6 / math.sqrt(60))
    assert an.pearson(x, [-v for v in x]) == pytest.approx(-1.0)
    assert math.isnan(an.pearson([1, 2, 3], [7, 7, 7])) and math.isnan(an.pearson([1], [2]))
    # average ranks for ties
    assert list(an.rankdata([10, 20, 20, 5])) == [2.0, 3.5, 3.5, 1.0]
    # ranks [1,2,3,4,5] vs [1,2.5,4.5,2.5,4.5]: r = 7 / sqrt(10 * 9)
    assert an.spearman(x, y) == pytest.approx(7 / math.sqrt(90))
    assert an.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 6, 30).astype(float)  # many ties
        y = x + rng.normal(0, 2, 30)
        assert an.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert an.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_bootstrap_is_seeded_and_brackets_r():
    rng = np.random.default_rng(1)
    x = rng.normal(size=20)
    y = x + rng.normal(0, 0.5, 20)
    a = an.bootstrap_ci(x, y, "pearson", n_boot=300, seed=5)
    assert a == an.bootstrap_ci(x, y, "pearson", n_boot=300, seed=5)
    assert a.lo < a.r < a.hi and a.n == 20 and a.mixtures == 20
    assert an.bootstrap_ci(x, y, "pearson", n_boot=300, seed=6) != a
    # clustered: the 20 points are 5 mixtures x 4 domains -> 5 clusters resampled
    c = an.bootstrap_ci(x, y, "spearman", clusters=np.repeat(np.arange(5), 4), n_boot=200)
    assert c.mixtures == 5 and c.lo <= c.r <= c.hi


@pytest.fixture()
def table(tmp_path):
    store, mixtures = fill_store(str(tmp_path / "s.sqlite"))
    yield an.build_table(store), store, mixtures
    store.close()


def test_build_table_derives_proxies_from_the_store(table):
    t, store, mixtures = table
    assert t.domains == DOMAINS and t.proxies == ["merged", "macro", "micro", "mean_ind", "ind_id"]
    assert ID_DOMAIN in t.all_domains and len(t.seq_mixtures) == 8
    m = next(m for m in mixtures if m.names == ("c", "e"))  # c has two units
    # stored values come back as perplexities
    assert t.get("macro", "wiki")[m.id] == pytest.approx(ppl(store, m.id, "macro", "wiki"))
    # mean_ind: mean over partitions of the partition's mean unit perplexity
    c = (ppl(store, "c-0000", "ind", "wiki") + ppl(store, "c-0001", "ind", "wiki")) / 2
    assert t.get("mean_ind", "wiki")[m.id] == pytest.approx(
        (c + ppl(store, "e-0000", "ind", "wiki")) / 2
    )
    # ind_id: only on the mixture's own held-out sets; undefined elsewhere
    assert t.get("ind_id", "e")[m.id] == pytest.approx(ppl(store, "e-0000", "ind", "e"))
    assert m.id not in t.get("ind_id", "wiki") and m.id not in t.get("ind_id", "a")
    # ID = the mixture's held-out sets pooled (equal tokens here: geometric mean)
    expect = math.sqrt(ppl(store, m.id, "merged", "c") * ppl(store, m.id, "merged", "e"))
    assert t.get("merged", ID_DOMAIN)[m.id] == pytest.approx(expect)


def test_correlation_table_layout_and_values(table):
    t, _, _ = table
    ct = an.correlation_table(t, "pearson", n_boot=50)
    assert ct.rows == DOMAINS + [ID_DOMAIN, an.MEAN_ROW, an.POOLED_ROW]
    ids, p, s = t.paired("merged", "wiki")
    assert len(ids) == 8
    assert ct.cells["wiki"]["merged"].r == pytest.approx(an.pearson(p, s))
    per_domain = [ct.cells[d]["merged"].r for d in DOMAINS]
    assert ct.cells[an.MEAN_ROW]["merged"].r == pytest.approx(np.mean(per_domain))
    pooled = ct.cells[an.POOLED_ROW]["merged"]
    assert pooled.n == 8 * len(DOMAINS) and pooled.mixtures == 8 and pooled.r > 0.95
    # ind_id is constant across mixtures on a partition's held-out set: undefined there
    assert math.isnan(ct.cells["a"]["ind_id"].r)


def test_rank_recommend_topk_and_true_rank(table):
    t, _, _ = table
    ranked = an.rank_mixtures(t, "merged", "a")
    assert len(ranked) == 15 and [v for _, v in ranked] == sorted(v for _, v in ranked)
    best, score = an.recommend(t, "merged", ["a"])
    assert best == ranked[0][0] and score == pytest.approx(ranked[0][1])
    two = an.recommend(t, "merged", ["a", "wiki"])
    expect = min(
        t.mixtures,
        key=lambda m: math.log(t.get("merged", "a")[m]) + math.log(t.get("merged", "wiki")[m]),
    )
    assert two[0] == expect
    assert an.top_k_agreement(t, "seq", "a", 3) == 1.0  # seq agrees with itself
    assert an.best_true_rank(t, "seq", "a") == 1
    assert 0.0 <= an.top_k_agreement(t, "mean_ind", "wiki", 3) <= 1.0
    assert math.isnan(an.top_k_agreement(t, "merged", "a", 99))


def test_partition_influence_from_add_one_pairs():
    mix = {n: Mixture.of({p: [p + "0"] for p in n}) for n in ["ab", "abc", "abd", "a", "b"]}
    vals = {"ab": 10.0, "abc": 7.0, "abd": 12.0, "a": 15.0, "b": 11.0}
    t = an.ResultTable(
        values={"merged": {"x": {mix[n].id: v for n, v in vals.items()}}},
        mixtures={m.id: m for m in mix.values()},
        domains=["x"],
        proxies=["merged"],
    )
    inf = an.partition_influence(t, "merged", "x")
    assert inf["c"] == pytest.approx(3.0) and inf["d"] == pytest.approx(-2.0)
    # b: a -> ab (15 -> 10); a: b -> ab (11 -> 10)
    assert inf["b"] == pytest.approx(5.0) and inf["a"] == pytest.approx(1.0)


def test_cost_rows():
    from megablocks_ablate.ablate.mixtures import study_cost

    parts = {p: [p + "0"] for p in "abcd"}
    mixes = [Mixture.of({p: parts[p] for p in n}) for n in ["ab", "cd", "ac"]]
    rows = dict(an.cost_rows(study_cost(mixes, mixes[:1], 100)))
    assert rows["unit-model training tokens (modular)"] == "400"
    assert rows["a seq model for every scored mixture (naive)"] == "600"
    assert rows["naive / modular"] == "1.5x"
