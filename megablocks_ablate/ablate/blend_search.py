"""Searching the simplex of partition blends for the one a merged proxy scores best.

A **blend** maps partition names to proportions (``>= 0``, summing to 1). Scoring one
costs a model merge plus an evaluation, so the number of objective calls is the budget,
and the objective has no gradient we can use. Two tools, both pure numpy:

* :class:`SimplexSearch`, a deterministic pattern (compass) search. From the best blend
  so far it tries moving mass ``d = min(step, x_i - min_share)`` from every partition i
  to every other partition j. Such a transfer keeps the sum at 1 and the floor
  ``min_share`` by construction, so no projection is needed. Each round takes the best
  improving move; when none improves, the step is halved, the classic convergence rule
  for pattern search. Candidates are rounded and cached, so a blend is never paid for
  twice, and the candidate order is fixed, so a rerun retraces the same path.
* :func:`fit_regression`, a RegMix-style response surface. RegMix (Liu et al., 2024)
  trains many small models on random mixtures and regresses their loss on the mixture
  weights, then takes the top-k average of the blends the fit predicts best. Here the
  points are merged models instead, e.g. the path a :class:`SimplexSearch` walked. The
  model is ``log(objective) ~ intercept + linear + pairwise products``: a quadratic
  surface, fitted in log space because perplexities are positive and multiplicative.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from megablocks_ablate.ablate.mixtures import round_blend  # owned there: ids hash rounded shares

logger = logging.getLogger(__name__)

Objective = Callable[[dict[str, float]], float]
# a transfer smaller than this is float noise, not a move
_MIN_MOVE = 1e-12


@dataclass(frozen=True)
class BlendPoint:
    """One scored blend. ``step`` is the search round that scored it (0 = the start)."""

    blend: dict[str, float]
    objective: float
    step: int
    kind: str  # "start" | "move" | "regression"


@dataclass
class SearchResult:
    best: BlendPoint
    path: list[BlendPoint]  # every evaluated point, in order; cache hits are not repeated
    calls: int
    converged: bool
    stop_reason: str
    accepted: list[BlendPoint] = field(default_factory=list)  # the start, then each move taken

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": asdict(self.best),
            "path": [asdict(p) for p in self.path],
            "accepted": [asdict(p) for p in self.accepted],
            "calls": self.calls,
            "converged": self.converged,
            "stop_reason": self.stop_reason,
        }


def _check_partitions(partitions: Sequence[str]) -> tuple[str, ...]:
    names = tuple(partitions)
    if len(names) < 2:
        raise ValueError(f"need at least 2 partitions, got {len(names)}")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate partitions: {dupes}")
    return names


def _check_keys(blend: Mapping[str, float], names: Sequence[str], what: str) -> None:
    missing, extra = set(names) - set(blend), set(blend) - set(names)
    if missing or extra:
        raise ValueError(
            f"{what} keys must equal the partitions: missing {sorted(missing)}, extra {sorted(extra)}"
        )


class SimplexSearch:
    """Pattern search for the blend minimising ``objective`` in at most ``budget`` calls."""

    def __init__(
        self,
        partitions: Sequence[str],
        objective: Objective,
        *,
        budget: int = 40,
        start: Mapping[str, float] | None = None,
        step: float = 0.2,
        min_step: float = 0.02,
        min_share: float = 0.0,
        on_point: Callable[[BlendPoint], None] | None = None,
    ) -> None:
        self.partitions = _check_partitions(partitions)
        n = len(self.partitions)
        if budget < 1:
            raise ValueError(f"budget must be >= 1 objective call, got {budget}")
        if not 0.0 < min_step <= step <= 1.0:
            raise ValueError(
                f"need 0 < min_step <= step <= 1, got min_step={min_step}, step={step}"
            )
        if not 0.0 <= min_share < 1.0 / n:
            raise ValueError(f"min_share must be in [0, 1/{n}), got {min_share}")
        if start is None:
            start = {p: 1.0 / n for p in self.partitions}
        _check_keys(start, self.partitions, "start")
        if any(not math.isfinite(v) or v < 0 for v in start.values()):
            raise ValueError(f"start proportions must be finite and >= 0: {dict(start)}")
        if abs(sum(start.values()) - 1.0) > 1e-6:
            raise ValueError(f"start proportions must sum to 1, got {sum(start.values())}")
        self.start = self._round({p: start[p] for p in self.partitions})
        if min(self.start.values()) < min_share - 1e-9:
            raise ValueError(f"start is below min_share={min_share}: {self.start}")
        self.objective, self.budget, self.on_point = objective, budget, on_point
        self.step, self.min_step, self.min_share = step, min_step, min_share

    def _round(self, blend: Mapping[str, float]) -> dict[str, float]:
        rounded = round_blend(blend)
        return {p: rounded[p] for p in self.partitions}  # fixed key order for cache keys

    def _candidates(self, x: dict[str, float], step: float) -> list[dict[str, float]]:
        """All transfers i -> j from ``x``, in sorted (i, j) index order."""
        out = []
        for i, j in itertools.permutations(range(len(self.partitions)), 2):
            src, dst = self.partitions[i], self.partitions[j]
            d = min(step, x[src] - self.min_share)
            if d > _MIN_MOVE:
                y = dict(x)
                y[src] -= d
                y[dst] += d
                out.append(self._round(y))
        return out

    def run(self) -> SearchResult:
        cache: dict[tuple[float, ...], float] = {}
        path: list[BlendPoint] = []

        def evaluate(blend: dict[str, float], step: int, kind: str) -> BlendPoint:
            value = float(self.objective(dict(blend)))
            if not math.isfinite(value):
                # a wrong number would steer the search and end up in a report
                raise ValueError(f"objective returned {value} for blend {blend}")
            point = BlendPoint(blend, value, step, kind)
            cache[tuple(blend.values())] = value
            path.append(point)
            logger.debug("blend search call %d: %s -> %g", len(path), blend, value)
            if self.on_point is not None:
                self.on_point(point)
            return point

        best = evaluate(self.start, 0, "start")
        accepted, step, rnd = [best], self.step, 0
        while True:
            if step < self.min_step:
                converged, reason = True, f"converged: step {step:g} < min_step {self.min_step:g}"
                break
            rnd += 1
            round_best, out_of_budget = best, False
            for cand in self._candidates(best.blend, step):
                key = tuple(cand.values())
                if key in cache:  # already paid for; it cannot beat best, which is the minimum
                    continue
                if len(path) >= self.budget:
                    out_of_budget = True
                    break
                point = evaluate(cand, rnd, "move")
                if point.objective < round_best.objective:
                    round_best = point
            if round_best is not best:
                best = round_best
                accepted.append(best)
            elif not out_of_budget:
                step /= 2.0
            if out_of_budget:
                converged, reason = False, f"budget of {self.budget} objective calls spent"
                break
        logger.info(
            "blend search stopped after %d calls (%s): best %g", len(path), reason, best.objective
        )
        return SearchResult(best, path, len(path), converged, reason, accepted)


def _features(props: np.ndarray) -> np.ndarray:
    """Rows of [1, p_0..p_{n-2}, p_i*p_j (i<j)] for proportion rows ``props`` (m, n).

    The last partition's linear term is dropped: with sum(p) = 1 it equals the intercept
    minus the others. Squares are left out for the same reason, since
    p_i^2 = p_i - sum_{j != i} p_i p_j. What is left is a full quadratic basis on the
    simplex (as many terms as Scheffé's quadratic mixture model), identifiable without ridge.
    """
    m, n = props.shape
    pairs = [props[:, i] * props[:, j] for i, j in itertools.combinations(range(n), 2)]
    return np.column_stack([np.ones(m), props[:, : n - 1], *pairs])


@dataclass
class BlendRegression:
    partitions: tuple[str, ...]
    coef: np.ndarray  # on _features' columns, predicting log(objective)
    r2: float  # in-sample, on log(objective)
    n_points: int
    underdetermined: bool  # fewer points than coefficients: only the ridge pins the fit
    ridge: float = 0.0

    @property
    def feature_names(self) -> list[str]:
        lin = list(self.partitions[:-1])
        pairs = [f"{a}*{b}" for a, b in itertools.combinations(self.partitions, 2)]
        return ["intercept", *lin, *pairs]

    def _predict_log(self, props: np.ndarray) -> np.ndarray:
        return np.asarray(_features(props) @ self.coef)

    def predict(self, blend: Mapping[str, float]) -> float:
        """Predicted objective (not its log) for ``blend``."""
        _check_keys(blend, self.partitions, "blend")
        row = np.array([[float(blend[p]) for p in self.partitions]])
        return float(np.exp(self._predict_log(row)[0]))

    def optimum(
        self, n_samples: int = 100_000, seed: int = 0, top: int = 100, min_share: float = 0.0
    ) -> dict[str, float]:
        """RegMix's top-k average: the mean of the ``top`` best of random flat-Dirichlet blends.

        Averaging the top blends rather than taking the argmin damps the fit's noise,
        and the average of blends at or above ``min_share`` stays at or above it.
        """
        n = len(self.partitions)
        if n_samples < 1 or top < 1:
            raise ValueError(f"need n_samples >= 1 and top >= 1, got {n_samples}, {top}")
        if not 0.0 <= min_share < 1.0 / n:
            raise ValueError(f"min_share must be in [0, 1/{n}), got {min_share}")
        samples = np.random.default_rng(seed).dirichlet(np.ones(n), size=n_samples)
        samples = samples[(samples >= min_share).all(axis=1)]
        if len(samples) == 0:
            raise ValueError(f"no sampled blend has every share >= {min_share}; sample more")
        # in chunks: the pairwise features grow as n^2 per sample
        preds = np.concatenate(
            [self._predict_log(samples[k : k + 8192]) for k in range(0, len(samples), 8192)]
        )
        best = samples[np.argsort(preds, kind="stable")[:top]].mean(axis=0)
        return round_blend(dict(zip(self.partitions, best.tolist())))

    def to_dict(self) -> dict[str, Any]:
        return {
            "partitions": list(self.partitions),
            "features": self.feature_names,
            "coef": self.coef.tolist(),
            "r2": self.r2,
            "n_points": self.n_points,
            "underdetermined": self.underdetermined,
            "ridge": self.ridge,
        }


def _as_pairs(
    points: Sequence[BlendPoint] | Sequence[tuple[Mapping[str, float], float]],
) -> list[tuple[Mapping[str, float], float]]:
    return [(p.blend, p.objective) if isinstance(p, BlendPoint) else (p[0], p[1]) for p in points]


def fit_regression(
    points: Sequence[BlendPoint] | Sequence[tuple[Mapping[str, float], float]],
    partitions: Sequence[str],
    ridge: float = 1e-3,
) -> BlendRegression:
    """Ridge fit of log(objective) on a quadratic in the proportions (see :func:`_features`).

    The intercept is not penalised, so the ridge shrinks the shape of the surface, not
    its level. With fewer points than coefficients (``underdetermined``) a positive ridge
    still makes the solution unique, though it then says more about the prior than the data.
    """
    names = _check_partitions(partitions)
    pairs = _as_pairs(points)
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 scored points, got {len(pairs)}")
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be finite and >= 0, got {ridge}")
    for blend, value in pairs:
        _check_keys(blend, names, "point")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"objective must be finite and > 0 to take its log: {value} at {dict(blend)}"
            )
    props = np.array([[float(b[p]) for p in names] for b, _ in pairs])
    y = np.log(np.array([v for _, v in pairs], dtype=float))
    x = _features(props)
    n_feat = x.shape[1]
    underdetermined = len(pairs) < n_feat
    if underdetermined and ridge == 0:
        logger.warning(
            "%d points for %d coefficients and no ridge: minimum-norm fit", len(pairs), n_feat
        )
    # ridge as extra rows sqrt(ridge) * I (intercept row zero): lstsq is stabler than normal equations
    penalty = math.sqrt(ridge) * np.eye(n_feat)
    penalty[0, 0] = 0.0
    coef = np.linalg.lstsq(
        np.vstack([x, penalty]), np.concatenate([y, np.zeros(n_feat)]), rcond=None
    )[0]
    ss_res = float(np.sum((y - x @ coef) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    # a constant objective is explained exactly by the intercept
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res < 1e-20 else 0.0)
    return BlendRegression(names, coef, r2, len(pairs), underdetermined, ridge)


def geometric_mean_objective(
    per_domain_ppl: Mapping[str, float], domains: Sequence[str] | None = None
) -> float:
    """exp(mean(log ppl)) over ``domains`` (all if None): no domain's scale dominates."""
    chosen = list(per_domain_ppl) if domains is None else list(domains)
    if not chosen:
        raise ValueError("no domains to average")
    logs = []
    for d in chosen:
        if d not in per_domain_ppl:
            raise ValueError(f"no perplexity for domain {d!r}; have {sorted(per_domain_ppl)}")
        v = float(per_domain_ppl[d])
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"perplexity of domain {d!r} must be finite and > 0, got {v}")
        logs.append(math.log(v))
    return math.exp(sum(logs) / len(logs))


def weighted_loss_objective(
    per_domain_loss: Mapping[str, float], weights: Mapping[str, float]
) -> float:
    """sum_d w_d * loss_d / sum_d w_d."""
    unknown = sorted(set(weights) - set(per_domain_loss))
    if unknown:
        raise ValueError(f"weights name domains with no loss: {unknown}")
    negative = {d: w for d, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if negative:
        raise ValueError(f"weights must be finite and >= 0: {negative}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("weights are all zero")
    used = {d: float(per_domain_loss[d]) for d, w in weights.items() if w > 0}
    bad = {d: v for d, v in used.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"non-finite losses for weighted domains: {bad}")
    return sum(weights[d] * v for d, v in used.items()) / total
