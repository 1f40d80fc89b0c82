"""Count-weighted bootstrap of a mean of per-domain coefficients (ablate/bootstrap.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate import bootstrap as bs


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_weighted_coefficient_equals_the_expanded_resample(method):
    rng = np.random.default_rng(4)
    x = np.round(rng.normal(size=10), 1)  # rounding makes ties
    y = x + np.round(rng.normal(size=10), 1)
    counts = bs.resample_counts(10, 50, seed=2)
    got = bs.weighted_corr(method, x, y, counts)
    for b in range(50):
        idx = np.repeat(np.arange(10), counts[b].astype(int))
        want = an.CORRELATIONS[method](x[idx], y[idx])
        assert got[b] == pytest.approx(want, nan_ok=True, abs=1e-12)


def test_resample_counts_draw_n_each():
    c = bs.resample_counts(7, 20, seed=0)
    assert c.shape == (20, 7) and (c.sum(axis=1) == 7).all()


def test_mean_interval_brackets_the_mean_and_is_seeded():
    rng = np.random.default_rng(0)
    mixtures = [f"m{i}" for i in range(12)]
    columns = []
    for noise in (0.1, 0.3, 0.6):
        s = rng.normal(size=12)
        columns.append((mixtures, s + noise * rng.normal(size=12), s))
    mean = np.mean([an.pearson(p, s) for _, p, s in columns])
    lo, hi = bs.mean_interval(columns, "pearson", n_boot=400, seed=1)
    assert lo < mean < hi and hi - lo < 0.5
    assert bs.mean_interval(columns, "pearson", n_boot=400, seed=1) == (lo, hi)
    assert all(math.isnan(v) for v in bs.mean_interval([], "pearson"))


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_bootstrap_ci_is_the_percentile_of_the_expanded_cluster_resamples(method):
    """bootstrap_ci draws whole clusters (a mixture's points stay together): its interval
    equals the percentiles of the coefficient over the same resamples, expanded."""
    rng = np.random.default_rng(7)
    clusters = np.repeat([f"m{i}" for i in range(8)], 3)
    x = rng.normal(size=24)
    y = x + rng.normal(scale=0.5, size=24)
    got = an.bootstrap_ci(x, y, method, clusters=list(clusters), n_boot=200, seed=3)
    uniq, inverse = np.unique(clusters, return_inverse=True)
    counts = bs.resample_counts(len(uniq), 200, 3)
    stats = []
    for row in counts:
        idx = np.concatenate(
            [np.flatnonzero(inverse == c).repeat(int(k)) for c, k in enumerate(row)]
        )
        stats.append(an.CORRELATIONS[method](x[idx], y[idx]))
    lo, hi = np.quantile(stats, [0.025, 0.975])
    assert (got.lo, got.hi) == (pytest.approx(lo), pytest.approx(hi))
    assert got.r == pytest.approx(an.CORRELATIONS[method](x, y)) and got.mixtures == 8
