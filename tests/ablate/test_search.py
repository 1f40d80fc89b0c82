"""Greedy / beam search over mixtures and export as a training blend (ablate/search.py)."""

from __future__ import annotations

import itertools

import pytest
from study_fixtures import PARTITIONS, fill_store

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate.mixtures import Mixture
from megablocks_ablate.ablate.search import (
    beam_search,
    greedy_search,
    megatron_data_path,
    table_scorer,
    training_blend,
)

# Pairwise synergy: b and c are individually poor but excellent together, so greedy
# (which starts from the best single partition, a) misses the best pair, beam does not.
SINGLE = {"a": 1.0, "b": 5.0, "c": 5.0, "d": 3.0}
PAIR_BONUS = {frozenset("bc"): -12.0}


def score(names):
    calls.append(names)
    base = sum(SINGLE[p] for p in names)
    return base + sum(v for k, v in PAIR_BONUS.items() if k <= set(names))


calls: list = []


def test_beam_beats_greedy_and_caches():
    calls.clear()
    g = greedy_search(list(SINGLE), 2, score)
    assert g.best == ("a", "d") and g.score == 4.0
    calls.clear()
    b = beam_search(list(SINGLE), 2, score, beam_width=3)
    assert len(calls) == len(set(calls)) == b.evaluations  # each mixture scored once
    assert b.evaluations == 4 + 6 and len(b.beams) == 2  # 4 singles, then every pair
    exhaustive = min(itertools.combinations(sorted(SINGLE), 2), key=score)
    assert b.best == exhaustive == ("b", "c") and b.score == -2.0


def test_start_and_bad_arguments():
    r = greedy_search(list(SINGLE), 3, score, start=["b"])
    assert "b" in r.best and len(r.best) == 3
    with pytest.raises(ValueError, match="k=5"):
        beam_search(list(SINGLE), 5, score)
    with pytest.raises(ValueError, match="unknown partition 'z'"):
        beam_search(list(SINGLE), 2, score, start=["z"])


def test_table_scorer_finds_the_table_optimum(tmp_path):
    store, mixtures = fill_store(str(tmp_path / "s.sqlite"))
    t = an.build_table(store)
    scorer = table_scorer(t, "merged", PARTITIONS, missing="inf")
    # only pairs are scored: singles are inf, a beam of all 6 singles makes it exhaustive
    best = beam_search(list(PARTITIONS), 2, scorer, beam_width=6)
    assert Mixture.of({p: PARTITIONS[p] for p in best.best}).id == an.recommend(t, "merged")[0]
    with pytest.raises(LookupError, match="no merged score"):
        table_scorer(t, "merged", PARTITIONS)(("a", "b", "c"))
    store.close()


def test_export_blend_and_megatron_data_path():
    m = Mixture.of({"bio": ["bio-0", "bio-1"], "cs": ["cs-0"]})
    blend = training_blend(m, "data/")
    assert blend == {"manifest": "data/", "weights": {"bio-0": 0.25, "bio-1": 0.25, "cs-0": 0.5}}
    from megablocks_ablate.train.config import DataConfig

    DataConfig.from_dict(blend)  # a valid data section of our train config
    paths = {u: f"/d/units/{u}" for u in m.units}
    s = megatron_data_path(m, paths)
    assert s == "0.25 /d/units/bio-0 0.25 /d/units/bio-1 0.5 /d/units/cs-0"
    with pytest.raises(KeyError, match="cs-0"):
        megatron_data_path(m, {"bio-0": "x", "bio-1": "y"})
