"""The scaled merge: seed + lambda x (merged - seed), lambda fitted on half of the
validation mixtures (ablate/runner/scaled.py) and judged on the other half
(ablate/report_scaled.py)."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
import yaml

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate.mixtures import Mixture
from megablocks_ablate.ablate.runner import scaled as sc
from megablocks_ablate.errors import ConfigError


def test_split_is_seeded_disjoint_and_halves():
    ids = [f"m{i}" for i in range(9)]
    fit, held = sc.split_validation(ids, 0)
    assert len(fit) == 5 and len(held) == 4 and not set(fit) & set(held)
    assert sorted(fit + held) == sorted(ids)
    assert sc.split_validation(list(reversed(ids)), 0) == (fit, held)  # order-free
    assert sc.split_validation(ids, 1) != (fit, held)


def test_scaled_weights_move_from_the_seed():
    w = sc.scaled_weights({"a": 0.5, "b": 0.5}, 2.0)
    assert w == {"a": 1.0, "b": 1.0, "seed": -1.0} and sum(w.values()) == pytest.approx(1.0)
    assert sc.scaled_weights({"a": 1.0}, 1.0) == {"a": 1.0, "seed": 0.0}
    with pytest.raises(ConfigError, match="clashes"):
        sc.scaled_weights({"seed": 1.0}, 2.0)


def test_choose_lambda_best_then_nearest_one():
    assert sc.choose_lambda({0.5: 0.9, 1.0: 0.95, 2.0: 0.97}) == 2.0
    assert sc.choose_lambda({0.5: 0.97, 1.0: 0.95, 1.25: 0.97}) == 1.25  # tie: nearer 1
    assert sc.choose_lambda({0.5: math.nan, 2.0: math.nan}) == 0.5  # nothing learned


def test_fit_figure_is_the_ood_mean_else_the_summary_row():
    mix = {n: Mixture.of({n: [n + "0"]}) for n in "abcde"}
    ids = [m.id for m in mix.values()]
    s = {m: float(i + 1) for i, m in enumerate(ids)}
    p = {m: float(i + 1) ** 2 for i, m in enumerate(ids)}
    values = {"seq": {"x": s}, "scaled": {"x": p}}
    t = an.ResultTable(values, {m.id: m for m in mix.values()}, ["x"], ["scaled"], {})
    assert sc.fit_figure(t, "scaled") == pytest.approx(
        an.pearson(list(p.values()), list(s.values()))
    )
    few = {m: s[m] for m in ids[:3]}
    t.values = {"seq": {"x": few}, "scaled": {"x": p}}
    assert math.isnan(sc.fit_figure(t, "scaled"))


@pytest.mark.integration
def test_scaled_rows_equal_the_moved_seed_evaluated_by_hand(tmp_path):
    """A tiny study with proxies [merged, scaled]: every mixture's scaled rows are the
    model seed + lambda x (merged - seed) evaluated directly; the fit is in the store's
    meta and the report judges scaled on the held-out mixtures."""
    from runner_fixtures import tiny_settings

    from megablocks_ablate.ablate.demo import build_data, study_spec
    from megablocks_ablate.ablate.report import write_report
    from megablocks_ablate.ablate.runner import RunOptions, resolve, run_study
    from megablocks_ablate.ablate.spec import StudySpec
    from megablocks_ablate.ablate.store import ResultStore
    from megablocks_ablate.checkpoint import load_model_checkpoint
    from megablocks_ablate.corpora.synthetic import write_corpus
    from megablocks_ablate.evaluate import evaluate
    from megablocks_ablate.model.loading import load_model

    corpus = write_corpus(str(tmp_path / "corpus.jsonl"), n_docs=600, seed=3)
    s = tiny_settings(str(tmp_path), corpus)
    data, seed_data = build_data(s, time.time())
    spec = study_spec(s, data, seed_data)
    spec["proxies"] = ["merged", "scaled"]
    spec["scaled"] = {"lambdas": [0.5, 2.0]}
    spec["validation"] = dict(spec["validation"], n=3)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    runner = run_study(resolve(StudySpec.load(str(path))), RunOptions())
    store_file = os.path.join(spec["out_dir"], "results.sqlite")
    with ResultStore(store_file) as store:
        fit = store.get_meta("scaled")
        rows = [r for r in store.results("scaled")]
        summary = write_report(store, str(tmp_path / "report"), n_boot=20, plots=False)
    # 3 validation mixtures: 2 fit, 1 held out; too few for a figure -> nearest 1
    assert len(fit["fit"]) == 2 and len(fit["held_out"]) == 1 and fit["lambda"] == 0.5
    assert {r.subject for r in rows} == {m.id for m in runner.study.mixtures}
    assert all(r.provenance["lambda"] == 0.5 for r in rows)
    m = runner.study.mixtures[0]
    prov = next(r.provenance for r in rows if r.subject == m.id)
    assert prov["weights"]["seed"] == pytest.approx(0.5)
    plan = runner.plan()
    dirs = {j.name: j.entry.model_dir for j in plan.units}
    seed = load_model_checkpoint(plan.seed_dir)[0]
    states = [load_model_checkpoint(dirs[u])[0] for u in m.units]
    moved = {k: seed[k] + 0.5 * (sum(st[k] for st in states) / len(states) - seed[k]) for k in seed}
    model, _ = load_model(dirs[m.units[0]])
    model.load_state_dict(moved, strict=True)
    direct = evaluate(model, runner.scorer().suite)
    stored = {r.domain: r.score for r in rows if r.subject == m.id}
    for d, res in direct.items():
        assert stored[d].perplexity == pytest.approx(res.perplexity, rel=1e-5)
    # the report: the section, and the held-out figures in summary.json
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Scaled merge (beyond the paper)" in md and "lambda = **0.5**" in md
    got = json.loads((tmp_path / "report" / "summary.json").read_text())["scaled"]
    assert got["lambda"] == 0.5 and set(got["held_out_figures"]) == {"merged", "scaled"}
    assert summary.scaled is not None
    # a rerun reuses the recorded fit and adds nothing
    with ResultStore(store_file) as store:
        before = store.count()
    run_study(resolve(StudySpec.load(str(path))), RunOptions())
    with ResultStore(store_file) as store:
        assert store.count() == before and store.get_meta("scaled") == fit
    assert np.isfinite([r.score.perplexity for r in rows]).all()
