"""The relative stretch of a merge: undo part of the shortening that averaging causes.

Averaging unit models whose displacements from the seed point different ways shortens
the merge: two unit-length moves at right angles average to a move of length 0.71,
while a seq model trained on both partitions moves about as far as either unit model.
So a mixture of dissimilar partitions (prose with code) lands nearer the seed, and
reads more like the seed, than one of similar partitions, and its proxy perplexity on
a domain the seed knows well is too good. ``docs/fidelity.md`` measures this on the
built-in stdlib corpus (the merge's picks on code domains favoured the prose partition).

Per tensor ``k`` of a mixture ``m``, the *shortening* is

    r_k(m) = (sum_u w_u |d_u,k|) / |D_k(m)|

the weighted mean length of the merged units' displacements ``d_u`` over the length of
the merged displacement ``D(m)`` (1 for one unit or parallel moves, larger the more the
moves cancel). The stretched merge moves ``D_k(m) x (r_k(m) / rbar_k) ** gamma`` from the
seed, where ``rbar_k`` is the mean shortening over every equal-weight group of the
study's models of the mixture's own size (pairs for a mixture of two models, triples
for three: :func:`reference_shortening`): the overall distance from the seed of the
mixtures of each size is kept, only how far one mixture goes relative to another of
its size changes. ``gamma`` 0 is the merge itself; 1 the full correction. A mixture of one model is that model, unstretched.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence

import torch

Tensors = Mapping[str, torch.Tensor]

MAX_GROUPS = 256
"""At most this many groups of models form a reference (a fixed sample beyond it)."""


def shortening(
    seed: Tensors, deltas: Sequence[Tensors], merged: Tensors, weights: Sequence[float]
) -> dict[str, float]:
    """Per tensor of ``merged``: ``sum_u w_u |d_u| / |merged - seed|`` (1 where the
    merged displacement is zero)."""
    out = {}
    for k, v in merged.items():
        length = float((v.float() - seed[k].float()).norm())
        target = sum(w * float(d[k].float().norm()) for d, w in zip(deltas, weights))
        out[k] = target / length if length > 0 else 1.0
    return out


def reference_groups(models: Sequence[str], size: int) -> list[tuple[str, ...]]:
    """Every group of ``size`` of ``models`` (sorted), or a fixed sample of
    :data:`MAX_GROUPS` of them."""
    ordered = sorted(models)
    if math.comb(len(ordered), size) <= MAX_GROUPS:
        return list(itertools.combinations(ordered, size))
    rng = random.Random(0)
    seen: set[tuple[str, ...]] = set()
    while len(seen) < MAX_GROUPS:
        seen.add(tuple(sorted(rng.sample(ordered, size))))
    return sorted(seen)


def reference_shortening(
    seed: Tensors,
    deltas: Mapping[str, Tensors],
    merge: Callable[[Sequence[str]], Tensors],
    size: int = 2,
) -> dict[str, float]:
    """``rbar`` for mixtures of ``size`` models: :func:`shortening` averaged over
    :func:`reference_groups` of the models in ``deltas``, each group merged by
    ``merge(group)`` with equal weights."""
    groups = reference_groups(list(deltas), size)
    if size < 2 or not groups:
        raise ValueError(
            f"reference_shortening: needs groups of at least two of the {len(deltas)} "
            f"models, got size {size}"
        )
    total: dict[str, float] = {}
    for group in groups:
        members = [deltas[u] for u in group]
        r = shortening(seed, members, merge(group), [1.0 / size] * size)
        for k, v in r.items():
            total[k] = total.get(k, 0.0) + v
    return {k: v / len(groups) for k, v in total.items()}


def stretch_merge(
    seed: Tensors,
    deltas: Sequence[Tensors],
    weights: Sequence[float],
    merged: Tensors,
    reference: Mapping[str, float],
    gamma: float,
) -> dict[str, torch.Tensor]:
    """``merged`` with each tensor's displacement times ``(r_k / reference_k) ** gamma``
    (:func:`shortening`); unchanged for one model or ``gamma`` 0."""
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"stretch_merge: gamma must be a finite number >= 0, got {gamma}")
    if gamma == 0 or len(deltas) < 2:
        return dict(merged)
    ratio = shortening(seed, deltas, merged, weights)
    out = {}
    for k, v in merged.items():
        factor = (ratio[k] / reference[k]) ** gamma
        out[k] = (seed[k].float() + factor * (v.float() - seed[k].float())).to(v.dtype)
    return out
