"""Correlations, derived proxies, rankings, agreement and influence (ablate/analysis.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from study_fixtures import DOMAINS, ROLE_EXTRA, fill_roles_store, fill_store, ppl

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate import roles as rl
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


def test_float_jitter_is_a_constant_input():
    """One perplexity reached by different float paths (ind_id of every mixture with a
    one-unit partition, on its held-out set) differs in the last bits: no coefficient."""
    jitter = [123.456, 123.456 * (1 + 1e-15), 123.456 * (1 - 2e-15), 123.456]
    y = [100.0, 110.0, 90.0, 105.0]
    assert math.isnan(an.pearson(jitter, y)) and math.isnan(an.pearson(y, jitter))
    assert math.isnan(an.spearman(jitter, y)) and math.isnan(an.spearman(y, jitter))
    # a real spread of one part in a million is kept
    small = [1.0, 1.0 + 1e-6, 1.0 + 2e-6, 1.0 + 3e-6]
    assert an.pearson(small, [1, 2, 3, 4]) == pytest.approx(1.0)
    assert an.spearman(small, [1, 2, 3, 4]) == pytest.approx(1.0)


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


# ----------------------------------------------------------------------------- roles

DOMAINS_2L = ["q", "p", "s", "r"] + ROLE_EXTRA  # fill_roles_store's, in study order


def _corr(points, keep):
    x = [p[3] for p in points if keep(p)]
    y = [p[4] for p in points if keep(p)]
    return np.corrcoef(x, y)[0, 1], len(x)


@pytest.fixture()
def two_lines(tmp_path):
    store, mixtures, points = fill_roles_store(str(tmp_path / "r.sqlite"))
    yield an.build_table(store), mixtures, points
    store.close()


def test_roles_follow_domain_units(two_lines):
    t, mixtures, points = two_lines
    for mid, d, role, _, _ in points:
        assert t.role(mid, d) == role
    pq = next(m for m in mixtures if m.names == ("p", "q"))
    assert t.role(pq.id, "p") == an.ROLE_ID and t.role(pq.id, "r") == an.ROLE_OOD
    assert t.role(pq.id, "x") == an.ROLE_OOD  # extra sets belong to no partition
    assert t.role(pq.id, ID_DOMAIN) == t.role(pq.id, "P1") == an.ROLE_ID
    ids, _, _ = t.paired("merged", "p", an.ROLE_OOD)  # the pairs without p
    assert sorted(t.mixtures[i].names for i in ids) == [("q", "r"), ("q", "s"), ("r", "s")]


def test_two_lines_ood_id_and_all_domain_coefficients(two_lines):
    t, _, points = two_lines
    rt = rl.role_table(t, "pearson", n_boot=20)
    ood, n_ood = _corr(points, lambda p: p[2] == "ood")
    idp, n_id = _corr(points, lambda p: p[2] == "id")
    every, n_all = _corr(points, lambda p: True)
    # 6 pairs x 6 domains; each pair trains on 2 of the 4 held-out sets
    assert (n_ood, n_id, n_all) == (24, 12, 36)
    assert rt.figure("merged", "ood", "pooled").r == pytest.approx(ood, abs=1e-12)
    assert rt.figure("merged", "ood", "pooled").n == 24
    assert rt.figure("merged", "id", "pooled").r == pytest.approx(idp, abs=1e-12)
    assert rt.figure("merged", "all", "pooled").r == pytest.approx(every, abs=1e-12)
    # each regime lies on its own line; pooling both reads lower than either
    assert ood > 0.99 and idp > 0.99 and every < min(ood, idp) - 0.01
    per_domain = {d: _corr(points, lambda p, d=d: p[1] == d and p[2] == "ood") for d in DOMAINS_2L}
    for d, (r, n) in per_domain.items():
        cell = rt.row(d).cells["merged"]
        assert cell.n == n
        if n < an.MIN_POINTS:  # the 3 pairs without a partition: no coefficient
            assert math.isnan(cell.r) and cell.fmt() == f"– n={n}"
        else:
            assert cell.r == pytest.approx(r, abs=1e-12)
    defined = [r for r, n in per_domain.values() if n >= an.MIN_POINTS]
    assert len(defined) == len(ROLE_EXTRA) == rt.figure("merged", "ood", "mean").n
    assert rt.figure("merged", "ood", "mean").r == pytest.approx(np.mean(defined))
    # layout: ID rows first, then domains (OOD), per-role summaries, role-blind last
    assert [r.key for r in rt.rows] == ["P1", "P2", ID_DOMAIN] + DOMAINS_2L + [
        rl.OOD_MEAN_ROW,
        rl.OOD_POOLED_ROW,
        rl.ID_POOLED_ROW,
        rl.ALL_MEAN_ROW,
        rl.ALL_POOLED_ROW,
    ]
    assert rt.id_label == "ID (P1+P2)" and rt.row(ID_DOMAIN).label == "ID (P1+P2)"
    assert rt.proxies == ["ind_id", "mean_ind", "merged", "macro", "micro"]
    # the role-blind rows are the old correlation_table's
    old = an.correlation_table(t, "pearson", n_boot=20)
    assert rt.row(rl.ALL_POOLED_ROW).cells["macro"] == old.cells[an.POOLED_ROW]["macro"]
    assert rt.per_domain["all"]["p"]["macro"] == old.cells["p"]["macro"]


def test_p_rows_follow_the_study_order(two_lines, tmp_path):
    t, mixtures, _ = two_lines
    pq = next(m for m in mixtures if m.names == ("p", "q"))
    # meta order q, p, s, r: P1 of {p, q} is q's held-out set, P2 p's
    assert t.id_rows == ["P1", "P2"] and t.fixed == []
    assert t.get("merged", "P1")[pq.id] == pytest.approx(t.get("merged", "q")[pq.id])
    assert t.get("seq", "P2")[pq.id] == pytest.approx(t.get("seq", "p")[pq.id])
    # without the order in the meta: sorted names
    store, mixtures, _ = fill_roles_store(str(tmp_path / "n.sqlite"), with_order=False)
    t2 = an.build_table(store)
    store.close()
    assert t2.partition_order == ["p", "q", "r", "s"]
    assert t2.get("merged", "P1")[pq.id] == pytest.approx(t2.get("merged", "p")[pq.id])


def test_fixed_partition_comes_first(tmp_path):
    # z is last in the study's order but in every validation mixture: it is P1
    store, mixtures, points = fill_roles_store(
        str(tmp_path / "f.sqlite"), order=("a", "b", "c", "d", "z"), fixed="z"
    )
    t = an.build_table(store)
    store.close()
    assert t.fixed == ["z"]
    for m in mixtures:
        other = next(g for g in m.names if g != "z")
        assert t.get("merged", "P1")[m.id] == pytest.approx(t.get("merged", "z")[m.id])
        assert t.get("merged", "P2")[m.id] == pytest.approx(t.get("merged", other)[m.id])
    rt = rl.role_table(t, "pearson", n_boot=0)
    # z's held-out set is in-domain for every mixture: no OOD coefficient
    assert math.isnan(rt.row("z").cells["merged"].r) and rt.row("z").cells["merged"].n == 0
    assert rt.row("P1").cells["merged"].r == pytest.approx(
        _corr(points, lambda p: p[1] == "z")[0], abs=1e-12
    )
    assert an.fixed_partitions([]) == []


def test_headline_proxy():
    one = {p: Mixture.of({p: [p + "0"]}) for p in "ab"}
    t = an.ResultTable({}, {m.id: m for m in one.values()}, ["x"], ["merged", "macro"])
    assert rl.headline_proxy(t)[0] == "merged"
    two = Mixture.of({"a": ["a0", "a1"], "b": ["b0"]})
    t.mixtures[two.id] = two
    proxy, why = rl.headline_proxy(t)
    assert proxy == "macro" and "more than one unit" in why
    t.proxies = ["merged"]
    assert rl.headline_proxy(t)[0] == "merged"
    t.proxies = ["merged", "macro", "fisher"]  # asked for: it heads the report
    proxy, why = rl.headline_proxy(t)
    assert proxy == "fisher" and "Fisher" in why


def test_median_true_rank_over_ood_domains_and_id_rows():
    mix = {n: Mixture.of({n: [n + "0"]}) for n in "abcd"}
    ids = {n: mix[n].id for n in mix}
    seq = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}  # seq rank = a, b, c, d on every domain

    def by(vals):
        return {ids[n]: v for n, v in zip("abcd", vals)}

    t = an.ResultTable(
        values={
            "seq": {d: by(seq.values()) for d in ("u", "v", "w", ID_DOMAIN)},
            "merged": {
                "u": by([1, 3, 2, 4]),  # picks a, but u is a's held-out set...
                "v": by([5, 6, 1, 7]),  # picks c: rank 3
                "w": by([9, 1, 5, 6]),  # picks b: rank 2
                ID_DOMAIN: by([9, 8, 7, 1]),  # picks d: rank 4
            },
        },
        mixtures={m.id: m for m in mix.values()},
        domains=["u", "v", "w"],
        proxies=["merged"],
        domain_units={"u": ["a0"]},
    )
    # ...so out of domain it picks c among b, c, d: seq rank 2 of those
    assert an.best_true_rank(t, "merged", "u", an.ROLE_OOD) == 2
    assert an.best_true_rank(t, "merged", "u") == 1  # role-blind: a, seq's best
    assert an.best_true_rank(t, "merged", "v", an.ROLE_OOD) == 3  # v is OOD for all
    ood = rl.rank_summary(t, "merged", an.ROLE_OOD)  # ranks 2, 3, 2 (the paper: "median 2, max 5")
    assert (ood.median, ood.max, ood.n) == (2.0, 3, 3)
    idr = rl.rank_summary(t, "merged", an.ROLE_ID)
    assert (idr.median, idr.max, idr.n) == (4.0, 4, 1) and idr.fmt() == "median 4, max 4 (1)"
    assert rl.rank_summary(t, "seq", an.ROLE_OOD).max == 1


def test_mean_ind_and_ind_id_from_partition_models(tmp_path):
    store, mixtures, _ = fill_roles_store(
        str(tmp_path / "pm.sqlite"), units={"r": 2}, partition_models=("r",)
    )
    t = an.build_table(store)
    pr = next(m for m in mixtures if m.names == ("p", "r"))
    # the partition model replaces the mean of r's two unit models
    part = ppl(store, "r-part", "ind", "x")
    assert t.get("mean_ind", "x")[pr.id] == pytest.approx(
        (ppl(store, "p-0000", "ind", "x") + part) / 2
    )
    assert t.get("ind_id", "r")[pr.id] == pytest.approx(ppl(store, "r-part", "ind", "r"))
    own = (ppl(store, "p-0000", "ind", "p") + ppl(store, "r-part", "ind", "r")) / 2
    assert t.get("ind_id", ID_DOMAIN)[pr.id] == pytest.approx(own)
    # P rows (study order q, p, s, r): P1 of {p, r} is p, P2 is r
    assert t.get("ind_id", "P2")[pr.id] == pytest.approx(ppl(store, "r-part", "ind", "r"))
    assert t.get("ind_id", "P1")[pr.id] == pytest.approx(ppl(store, "p-0000", "ind", "p"))
    assert t.get("mean_ind", "P1")[pr.id] == pytest.approx(
        (ppl(store, "p-0000", "ind", "p") + ppl(store, "r-part", "ind", "p")) / 2
    )
    # without the meta: the units' mean, as before
    meta = store.get_meta("study")
    del meta["partition_models"]
    store.set_meta("study", meta)
    t2 = an.build_table(store)
    units = (ppl(store, "r-0000", "ind", "x") + ppl(store, "r-0001", "ind", "x")) / 2
    assert t2.get("mean_ind", "x")[pr.id] == pytest.approx(
        (ppl(store, "p-0000", "ind", "x") + units) / 2
    )
    store.close()
