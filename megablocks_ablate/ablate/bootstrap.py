"""Bootstrap intervals for a mean of per-domain coefficients (the report's ``OOD mean``).

The per-domain coefficients of one proxy share their mixtures, so one resample of
mixtures (drawn with replacement) must feed every domain's coefficient at once, and
the interval is the spread of the mean across resamples. A resample is a vector of
draw counts over the mixtures; a coefficient over a resample is then a count-weighted
coefficient: Pearson from weighted moments, Spearman as the Pearson of average ranks
where a mixture drawn c times fills c tied positions. All resamples are computed at
once in NumPy, so a report's intervals cost milliseconds, not a loop of thousands of
coefficients per cell.

    lo, hi = mean_interval(columns, mixtures, "pearson", n_boot=1000, seed=0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Relative spread below which an input counts as constant: perplexities derived from
# the same score by different float paths (e.g. ``ind_id`` of every mixture holding a
# one-unit partition) differ in the last bits, and a coefficient of that jitter is noise.
CONSTANT_RTOL = 1e-9

# A coefficient from fewer points is not shown (3 points give |r| near 1 by chance
# far too often to be read as agreement): the cell reads "–" with its n.
MIN_POINTS = 4

# one domain's points: (mixture ids, proxy values, seq values)
Column = tuple[Sequence[str], np.ndarray, np.ndarray]


def resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` draw counts: each row one bootstrap resample of ``n`` items."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _constant(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per row: whether the drawn values of ``x`` are constant (as analysis.is_constant)."""
    drawn = w > 0
    hi = np.where(drawn, x, -np.inf).max(axis=1)
    lo = np.where(drawn, x, np.inf).min(axis=1)
    scale = np.maximum(np.where(drawn, np.abs(x), 0.0).max(axis=1), np.finfo(np.float64).tiny)
    return (hi - lo) <= CONSTANT_RTOL * scale


def weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson's r of each row of counts ``w`` ``[B, n]`` over the points ``x``, ``y``
    (``[n]`` or ``[B, n]``); NaN for a row whose drawn x or y is constant."""
    x = np.broadcast_to(x, w.shape)
    y = np.broadcast_to(y, w.shape)
    tot = w.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # a row drawing none: NaN
        dx = x - (w * x).sum(axis=1, keepdims=True) / tot
        dy = y - (w * y).sum(axis=1, keepdims=True) / tot
        sxy, sxx, syy = ((w * a * b).sum(axis=1) for a, b in ((dx, dy), (dx, dx), (dy, dy)))
        r = np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0)
    r[_constant(x, w) | _constant(y, w)] = np.nan
    return r


def weighted_ranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``[B, n]``: each point's average rank (1-based) in the sample where point i is
    drawn ``w[b, i]`` times; equal values share their average rank."""
    uniq, inverse = np.unique(x, return_inverse=True)
    onehot = np.zeros((len(x), len(uniq)))
    onehot[np.arange(len(x)), inverse.reshape(-1)] = 1.0
    group = w @ onehot  # [B, U]: draws per distinct value
    below = np.cumsum(group, axis=1) - group
    return (below + (group + 1.0) / 2.0)[:, inverse.reshape(-1)]


def weighted_corr(method: str, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    if method == "pearson":
        return weighted_pearson(x, y, w)
    if method == "spearman":
        r = weighted_pearson(weighted_ranks(x, w), weighted_ranks(y, w), w)
        r[_constant(x[None, :], w) | _constant(y[None, :], w)] = np.nan
        return r
    raise ValueError(f"unknown correlation method {method!r} (pearson, spearman)")


def mean_interval(
    columns: Sequence[Column],
    method: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of the mean of the columns' coefficients, resampling the
    mixtures the columns share. A column's coefficient on a resample that draws fewer
    than :data:`MIN_POINTS` distinct mixtures of it is undefined and left
    out of that resample's mean; (NaN, NaN) when fewer than half of the resamples
    give a mean, or with no column."""
    mixtures = sorted({m for ids, _, _ in columns for m in ids})
    if not columns or len(mixtures) < 3 or n_boot <= 0:
        return math.nan, math.nan
    index = {m: i for i, m in enumerate(mixtures)}
    counts = resample_counts(len(mixtures), n_boot, seed)
    rs = np.full((n_boot, len(columns)), np.nan)
    for j, (ids, p, s) in enumerate(columns):
        w = counts[:, [index[m] for m in ids]]
        r = weighted_corr(method, np.asarray(p, float), np.asarray(s, float), w)
        r[(w > 0).sum(axis=1) < MIN_POINTS] = np.nan
        rs[:, j] = r
    defined = ~np.isnan(rs)
    ok = defined.any(axis=1)
    if ok.sum() < n_boot / 2:
        return math.nan, math.nan
    means = np.where(defined, rs, 0.0)[ok].sum(axis=1) / defined[ok].sum(axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(lo), float(hi)
