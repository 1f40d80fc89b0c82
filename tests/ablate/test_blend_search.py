"""Pattern search and RegMix-style regression over partition blends (ablate/blend_search.py)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from megablocks_ablate.ablate.blend_search import (
    BlendPoint,
    SimplexSearch,
    fit_regression,
    geometric_mean_objective,
    round_blend,
    weighted_loss_objective,
)

pytestmark = pytest.mark.unit

PARTS = ["a", "b", "c"]
TARGET = {"a": 0.6, "b": 0.3, "c": 0.1}


class Counted:
    """Convex objective 1 + |p - TARGET|^2 that counts its calls and records its inputs."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def __call__(self, blend: dict[str, float]) -> float:
        self.seen.append(dict(blend))
        return 1.0 + sum((blend[k] - TARGET[k]) ** 2 for k in TARGET)


def _key(blend: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(blend.items()))


# ---------------------------------------------------------------- round_blend


def test_round_blend_sums_to_one_and_residual_goes_to_largest():
    out = round_blend({"a": 1.0, "b": 1.0, "c": 1.0})
    assert out == {"a": 0.333334, "b": 0.333333, "c": 0.333333}  # tie: first key absorbs
    assert round(sum(out.values()), 6) == 1.0
    out = round_blend({"a": 1.0, "b": 1.0, "c": 4.0}, decimals=2)
    assert out == {"a": 0.17, "b": 0.17, "c": 0.66}
    assert round(sum(out.values()), 2) == 1.0


def test_round_blend_clips_renormalises_and_keeps_zeros():
    assert round_blend({"a": -0.5, "b": 1.0, "c": 3.0}) == {"a": 0.0, "b": 0.25, "c": 0.75}
    assert round_blend({"a": 0.0, "b": 2.0}) == {"a": 0.0, "b": 1.0}


@pytest.mark.parametrize(
    "blend, match",
    [
        ({}, "empty"),
        ({"a": math.nan, "b": 1.0}, "non-finite"),
        ({"a": math.inf, "b": 1.0}, "non-finite"),
        ({"a": 0.0, "b": 0.0}, "no positive"),
        ({"a": -1.0, "b": -2.0}, "no positive"),
    ],
)
def test_round_blend_errors(blend, match):
    with pytest.raises(ValueError, match=match):
        round_blend(blend)


# ---------------------------------------------------------------- SimplexSearch


def test_search_finds_interior_minimum():
    f = Counted()
    res = SimplexSearch(PARTS, f, budget=60).run()
    for k, t in TARGET.items():
        assert abs(res.best.blend[k] - t) <= 0.03, (k, res.best.blend)
    assert res.converged and "converged" in res.stop_reason
    assert res.calls == len(f.seen) == len(res.path) <= 60
    # every call is a distinct blend: the cache never pays twice
    assert len({_key(b) for b in f.seen}) == len(f.seen)
    assert [p.blend for p in res.path] == f.seen
    # accepted moves strictly improve, and the best is the minimum of all evaluated
    objs = [p.objective for p in res.accepted]
    assert len(objs) >= 2 and all(b < a for a, b in itertools.pairwise(objs))
    assert res.best == res.accepted[-1]
    assert res.best.objective == min(p.objective for p in res.path)
    assert res.path[0].kind == "start" and res.path[0].step == 0
    assert res.path[0].blend == {"a": 0.333334, "b": 0.333333, "c": 0.333333}
    assert all(p.kind == "move" and p.step >= 1 for p in res.path[1:])
    for p in res.path:
        assert round(sum(p.blend.values()), 6) == 1.0


def test_search_is_deterministic_and_serialisable():
    a = SimplexSearch(PARTS, Counted(), budget=25).run()
    b = SimplexSearch(PARTS, Counted(), budget=25).run()
    assert a.path == b.path
    d = json.loads(json.dumps(a.to_dict()))
    assert d["calls"] == a.calls and d["best"]["blend"] == a.best.blend
    assert len(d["path"]) == len(a.path) and d["stop_reason"] == a.stop_reason


def test_first_round_takes_best_not_first_improvement():
    # from uniform with step 0.2, moves into "a" improve most; "c" -> "a" is the best of the round
    res = SimplexSearch(PARTS, Counted(), budget=7).run()
    assert len(res.path) == 7  # start + the 6 ordered pairs
    assert res.best.blend == {"a": 0.533334, "b": 0.333333, "c": 0.133333}


def test_budget_exhaustion():
    f = Counted()
    res = SimplexSearch(PARTS, f, budget=3).run()
    assert res.calls == 3 == len(f.seen) == len(res.path)
    assert not res.converged and "budget" in res.stop_reason


def test_budget_one_scores_only_the_start():
    res = SimplexSearch(PARTS, Counted(), budget=1, start=TARGET).run()
    assert res.calls == 1 and res.best.blend == TARGET and "budget" in res.stop_reason


def test_min_share_respected():
    f = Counted()
    res = SimplexSearch(PARTS, f, budget=60, min_share=0.15).run()
    assert f.seen
    for blend in f.seen:
        assert min(blend.values()) >= 0.15 - 1e-9, blend
    # the floor binds on c (target 0.1), so the search ends on it
    assert res.best.blend["c"] == pytest.approx(0.15, abs=1e-6)


def test_on_point_sees_every_evaluation():
    seen: list[BlendPoint] = []
    res = SimplexSearch(PARTS, Counted(), budget=10, on_point=seen.append).run()
    assert seen == res.path


def test_non_finite_objective_names_the_blend():
    def f(blend: dict[str, float]) -> float:
        return math.nan if blend["a"] > 0.4 else 1.0

    with pytest.raises(ValueError, match=r"nan for blend \{'a': 0\.533334"):
        SimplexSearch(PARTS, f, budget=20).run()
    with pytest.raises(ValueError, match="inf for blend"):
        SimplexSearch(PARTS, lambda b: math.inf).run()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": 0}, "budget"),
        ({"step": 0.01}, "min_step <= step"),
        ({"step": 1.5}, "step <= 1"),
        ({"min_step": 0.0}, "0 < min_step"),
        ({"min_share": 0.34}, "min_share"),
        ({"min_share": -0.1}, "min_share"),
        ({"start": {"a": 0.5, "b": 0.5}}, "missing \\['c'\\]"),
        ({"start": {"a": 0.5, "b": 0.3, "c": 0.1, "d": 0.1}}, "extra \\['d'\\]"),
        ({"start": {"a": 0.5, "b": 0.3, "c": 0.3}}, "sum to 1"),
        ({"start": {"a": 1.2, "b": -0.2, "c": 0.0}}, ">= 0"),
        ({"start": {"a": 0.8, "b": 0.15, "c": 0.05}, "min_share": 0.1}, "below min_share"),
    ],
)
def test_search_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimplexSearch(PARTS, Counted(), **kwargs)


@pytest.mark.parametrize(
    "parts, match", [(["a"], "at least 2"), (["a", "b", "a"], "duplicate partitions: \\['a'\\]")]
)
def test_search_partition_validation(parts, match):
    with pytest.raises(ValueError, match=match):
        SimplexSearch(parts, Counted())


# ---------------------------------------------------------------- regression

RT = np.array([0.5, 0.3, 0.2])


def _log_quadratic(p: np.ndarray) -> float:
    """exp(0.5 + 2 |p - RT|^2): a log-quadratic surface whose simplex minimiser is RT."""
    return float(np.exp(0.5 + 2.0 * np.sum((p - RT) ** 2)))


def _points(n: int, seed: int = 1) -> list[tuple[dict[str, float], float]]:
    rng = np.random.default_rng(seed)
    return [
        (dict(zip(PARTS, p.tolist())), _log_quadratic(p)) for p in rng.dirichlet(np.ones(3), size=n)
    ]


def test_regression_recovers_exact_surface():
    reg = fit_regression(_points(30), PARTS, ridge=0.0)
    assert reg.r2 > 0.999 and reg.n_points == 30 and not reg.underdetermined
    for blend, value in _points(20, seed=7):  # held-out blends
        assert reg.predict(blend) == pytest.approx(value, rel=1e-6)
    opt = reg.optimum()
    assert all(abs(opt[k] - t) <= 0.05 for k, t in zip(PARTS, RT)), opt
    assert round(sum(opt.values()), 6) == 1.0
    assert reg.optimum(seed=3) == reg.optimum(seed=3)
    assert len(reg.coef) == len(reg.feature_names) == 1 + 2 + 3


def test_regression_optimum_respects_min_share():
    reg = fit_regression(_points(30), PARTS, ridge=0.0)
    opt = reg.optimum(n_samples=20_000, min_share=0.25)
    assert min(opt.values()) >= 0.25 - 1e-6
    with pytest.raises(ValueError, match="min_share"):
        reg.optimum(min_share=0.4)


def test_regression_with_default_ridge_stays_close():
    reg = fit_regression(_points(30), PARTS)
    assert reg.ridge == 1e-3 and reg.r2 > 0.99
    blend, value = _points(1, seed=9)[0]
    assert reg.predict(blend) == pytest.approx(value, rel=0.02)


def test_regression_underdetermined_is_flagged_but_fits():
    reg = fit_regression(_points(3), PARTS, ridge=1e-3)
    assert reg.underdetermined and reg.n_points == 3
    assert math.isfinite(reg.predict({"a": 0.2, "b": 0.3, "c": 0.5}))


def test_regression_on_search_path():
    res = SimplexSearch(PARTS, Counted(), budget=40).run()
    reg = fit_regression(res.path, PARTS, ridge=1e-6)
    assert reg.n_points == len(res.path)
    # Counted is 1 + quadratic, close to exp(quadratic) near its minimum, so the fit is good
    assert reg.r2 > 0.99
    d = json.loads(json.dumps(reg.to_dict()))
    assert d["features"][0] == "intercept" and d["features"][-1] == "b*c"
    assert d["coef"] == reg.coef.tolist()


@pytest.mark.parametrize(
    "points, kwargs, match",
    [
        (_points(1), {}, "at least 2"),
        (_points(5), {"ridge": -1.0}, "ridge"),
        ([({"a": 0.5, "b": 0.5, "c": 0.0}, 0.0), *_points(3)], {}, "> 0"),
        ([({"a": 0.5, "b": 0.5}, 1.0), *_points(3)], {}, "missing \\['c'\\]"),
    ],
)
def test_regression_errors(points, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_regression(points, PARTS, **kwargs)


# ---------------------------------------------------------------- objectives


def test_geometric_mean_objective():
    assert geometric_mean_objective({"x": 4.0, "y": 9.0}) == pytest.approx(6.0)
    assert geometric_mean_objective({"x": 4.0, "y": 9.0, "z": 100.0}, ["x", "y"]) == pytest.approx(
        6.0
    )
    assert geometric_mean_objective({"x": 4.0, "y": 9.0}, ["y"]) == pytest.approx(9.0)
    with pytest.raises(ValueError, match="'z'"):
        geometric_mean_objective({"x": 4.0}, ["x", "z"])
    with pytest.raises(ValueError, match="no domains"):
        geometric_mean_objective({"x": 4.0}, [])
    with pytest.raises(ValueError, match="> 0"):
        geometric_mean_objective({"x": 0.0, "y": 9.0})


def test_weighted_loss_objective():
    assert weighted_loss_objective({"x": 1.0, "y": 3.0}, {"x": 1.0, "y": 3.0}) == pytest.approx(2.5)
    # unweighted domains need not be finite
    assert weighted_loss_objective({"x": 2.0, "y": math.nan}, {"x": 2.0}) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="'q'"):
        weighted_loss_objective({"x": 1.0}, {"x": 1.0, "q": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        weighted_loss_objective({"x": 1.0, "y": 2.0}, {"x": 1.0, "y": -1.0})
    with pytest.raises(ValueError, match="all zero"):
        weighted_loss_objective({"x": 1.0}, {"x": 0.0})
