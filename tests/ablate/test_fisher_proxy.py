"""The ``fisher`` proxy in a study (ablate/runner/fisher.py): Fisher files per unit
model, rows equal to the Fisher merge evaluated by hand, provenance, reruns, and the
refusals that protect a user's files."""

from __future__ import annotations

import itertools
import os
import time

import pytest
import torch
import yaml

from megablocks_ablate.errors import ConfigError


@pytest.mark.integration
def test_fisher_rows_equal_the_merge_evaluated_by_hand(tmp_path):
    from runner_fixtures import tiny_settings

    from megablocks_ablate.ablate.demo import build_data, study_spec
    from megablocks_ablate.ablate.report import write_report
    from megablocks_ablate.ablate.runner import RunOptions, resolve, run_study
    from megablocks_ablate.ablate.runner.fisher import _unit_sequences, ensure_fisher
    from megablocks_ablate.ablate.spec import StudySpec
    from megablocks_ablate.ablate.store import ResultStore
    from megablocks_ablate.checkpoint import load_model_checkpoint
    from megablocks_ablate.corpora.synthetic import write_corpus
    from megablocks_ablate.evaluate import evaluate
    from megablocks_ablate.merge.fisher import (
        empirical_fisher,
        fisher_merge,
        fisher_path,
        read_fisher_meta,
    )
    from megablocks_ablate.model.loading import load_model

    corpus = write_corpus(str(tmp_path / "corpus.jsonl"), n_docs=600, seed=3)
    s = tiny_settings(str(tmp_path), corpus)
    data, seed_data = build_data(s, time.time())
    spec = study_spec(s, data, seed_data)
    spec["proxies"] = ["merged", "fisher"]
    spec["fisher"] = {"sequences": 6, "batch": 2, "eps": 0.05, "stretch": 0.0}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    runner = run_study(resolve(StudySpec.load(str(path))), RunOptions())
    store_file = os.path.join(spec["out_dir"], "results.sqlite")
    with ResultStore(store_file) as store:
        rows = list(store.results("fisher"))
        summary = write_report(store, str(tmp_path / "report"), n_boot=20, plots=False)
    assert {r.subject for r in rows} == {m.id for m in runner.study.mixtures}
    plan = runner.plan()
    jobs = {j.name: j for j in plan.units}
    m = next(m for m in runner.study.mixtures if len(m.units) > 1)
    prov = next(r.provenance for r in rows if r.subject == m.id)
    assert prov["fisher"] == {"sequences": 6, "batch": 2, "eps": 0.05, "power": 1.0}
    assert set(prov["unit_hashes"]) == set(m.units) and prov["proxies"] == ["fisher"]
    # the Fisher file: in the unit's run directory, naming the weights it was made for
    fpath = fisher_path(jobs[m.units[0]].entry.out_dir, 6, 2)
    meta = read_fisher_meta(fpath)
    assert meta["model_sha256"] == jobs[m.units[0]].verified_sha256() and meta["sequences"] == 6
    # recompute by hand: Fisher of each unit on its first 6 sequences, merge, evaluate
    seed = load_model_checkpoint(plan.seed_dir)[0]
    deltas, fishers = [], []
    for u in m.units:
        state = load_model_checkpoint(jobs[u].entry.model_dir)[0]
        deltas.append({k: state[k] - seed[k] for k in seed})
        model, _ = load_model(jobs[u].entry.model_dir)
        fishers.append(empirical_fisher(model, _unit_sequences(jobs[u], 6), 2))
    w = [prov["weights"][u] for u in m.units]
    merged = fisher_merge(seed, deltas, fishers, w, 0.05)
    model, _ = load_model(jobs[m.units[0]].entry.model_dir)
    model.load_state_dict(merged, strict=True)
    direct = evaluate(model, runner.scorer().suite)
    stored = {r.domain: r.score for r in rows if r.subject == m.id}
    for d, res in direct.items():
        assert stored[d].perplexity == pytest.approx(res.perplexity, rel=1e-5)
    # it differs from the plain merge (the Fisher moved something)
    with ResultStore(store_file) as store:
        plain = {r.domain: r.score.perplexity for r in store.results("merged") if r.subject == m.id}
    assert any(abs(plain[d] - stored[d].perplexity) > 1e-6 for d in plain)
    # the report carries the proxy like any other
    md = (tmp_path / "report" / "report.md").read_text()
    assert "fisher" in md and "fisher" in summary.roles and "fisher" in summary.decisions
    # a rerun reuses files and rows: nothing recomputed, nothing added
    mtime = os.path.getmtime(fpath)
    with ResultStore(store_file) as store:
        before = store.count()
    run_study(resolve(StudySpec.load(str(path))), RunOptions())
    with ResultStore(store_file) as store:
        assert store.count() == before
    assert os.path.getmtime(fpath) == mtime
    # other settings replace the rows (the study wrote them) and reuse nothing stale
    spec["fisher"]["eps"] = 0.5
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_study(resolve(StudySpec.load(str(path))), RunOptions())
    with ResultStore(store_file) as store:
        assert store.count() == before and store.get_meta("fisher")["eps"] == 0.5
        again = {r.domain: r.score.perplexity for r in store.results("fisher") if r.subject == m.id}
        assert all(r.provenance["fisher"]["eps"] == 0.5 for r in store.results("fisher"))
    assert any(abs(again[d] - stored[d].perplexity) > 1e-9 for d in again)
    assert os.path.getmtime(fpath) == mtime  # eps is not the Fisher's: the file is reused
    # the stretch: rows replaced; each merge's displacement, tensor by tensor, times
    # (its shortening / the mean shortening over every group of the study's models of
    # its size) ** 0.5
    spec["fisher"]["stretch"] = 0.5
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_study(resolve(StudySpec.load(str(path))), RunOptions())
    from megablocks_ablate.ablate.runner.fisher import fisher_weights

    models = sorted({u for mx in runner.study.mixtures for u in fisher_weights(runner.study, mx)})
    with ResultStore(store_file) as store:
        meta = store.get_meta("fisher")
        stretched = {
            r.domain: r.score.perplexity for r in store.results("fisher") if r.subject == m.id
        }
        provs = [r.provenance["fisher"] for r in store.results("fisher")]
    assert meta["stretch"] == 0.5 and meta["stretch_reference"] == models
    expected = {"sequences": 6, "batch": 2, "eps": 0.5, "power": 1.0}
    assert all(p == {**expected, "stretch": 0.5, "stretch_max_models": 2} for p in provs)
    all_deltas, all_fishers = {}, {}
    for u in models:
        state = load_model_checkpoint(jobs[u].entry.model_dir)[0]
        all_deltas[u] = {k: state[k] - seed[k] for k in seed}
        unit_model, _ = load_model(jobs[u].entry.model_dir)
        all_fishers[u] = empirical_fisher(unit_model, _unit_sequences(jobs[u], 6), 2)

    def lengths(ds, ws, merged_state):  # per tensor: mean unit move / merged move
        return {
            k: sum(w * float(d[k].norm()) for d, w in zip(ds, ws))
            / float((merged_state[k] - seed[k]).norm())
            for k in seed
            if float((merged_state[k] - seed[k]).norm()) > 0
        }

    size = len(m.units)  # the reference: every equal-weight group of that many models
    group_ratios = []
    for group in itertools.combinations(models, size):
        ds = [all_deltas[u] for u in group]
        gm = fisher_merge(seed, ds, [all_fishers[u] for u in group], [1 / size] * size, 0.5)
        group_ratios.append(lengths(ds, [1 / size] * size, gm))
    plain_fisher = fisher_merge(seed, deltas, fishers, w, 0.5)
    ratio = lengths(deltas, w, plain_fisher)
    by_hand = dict(plain_fisher)
    for k, r in ratio.items():
        mean = sum(p[k] for p in group_ratios) / len(group_ratios)
        by_hand[k] = seed[k] + (r / mean) ** 0.5 * (plain_fisher[k] - seed[k])
    model.load_state_dict(by_hand, strict=True)
    for d, res in evaluate(model, runner.scorer().suite).items():
        assert stretched[d] == pytest.approx(res.perplexity, rel=1e-5)
    assert any(abs(stretched[d] - again[d]) > 1e-6 for d in again)
    # a file at a Fisher path that is not ours, or is for other weights, is refused
    job = jobs[m.units[0]]
    with pytest.raises(ConfigError, match="other weights"):
        ensure_fisher(job, "0" * 64, 6, 2, "cpu")
    foreign = fisher_path(job.entry.out_dir, 7, 2)
    with open(foreign, "w") as f:
        f.write("a user's notes")
    with pytest.raises(
        ConfigError, match="not a Fisher file written by megablocks-ablate; move it away"
    ):
        ensure_fisher(job, job.verified_sha256(), 7, 2, "cpu")
    with open(foreign) as f:
        assert f.read() == "a user's notes"
    assert torch.isfinite(torch.tensor([r.score.perplexity for r in rows])).all()


def test_fisher_spec_checks():
    from megablocks_ablate.ablate.spec_proxies import FisherSpec

    assert FisherSpec().sequences == 512 and FisherSpec().eps == 0.01
    with pytest.raises(ConfigError, match="fisher.eps"):
        FisherSpec(eps=0.0)
    with pytest.raises(ConfigError, match="fisher.sequences"):
        FisherSpec(sequences=0)
    with pytest.raises(ConfigError, match="fisher.power"):
        FisherSpec(power=-1.0)
    with pytest.raises(ConfigError, match="fisher.stretch"):
        FisherSpec(stretch=-0.25)
    with pytest.raises(ConfigError, match="fisher.stretch"):
        FisherSpec(stretch=float("nan"))
    with pytest.raises(ConfigError, match="fisher.stretch_max_models"):
        FisherSpec(stretch_max_models=1)


def test_the_stretch_applies_to_mixtures_of_at_most_stretch_max_models():
    """``_mixture_merge`` on four models moving along different axes: a pair is
    stretched against the mean over pairs, a triple is left as the Fisher merge by
    default, and with ``stretch_max_models`` 3 is stretched against the mean over
    triples; one model is itself."""
    from megablocks_ablate.ablate.runner.fisher import _Inputs, _mixture_merge
    from megablocks_ablate.ablate.spec_proxies import FisherSpec
    from megablocks_ablate.merge.fisher import fisher_merge

    axes = {"a": [1.0, 0, 0], "b": [0, 1.0, 0], "c": [0, 0, 1.0], "d": [1.0, 0, 0]}
    seed = {"w": torch.zeros(3)}
    deltas = {u: {"w": torch.tensor(v)} for u, v in axes.items()}
    fishers = {u: {"w": torch.ones(3)} for u in axes}
    inputs = _Inputs(None, seed, deltas, fishers, {}, {})  # type: ignore[arg-type]
    models = sorted(axes)

    def plain(units):
        w = [1 / len(units)] * len(units)
        return fisher_merge(seed, [deltas[u] for u in units], [fishers[u] for u in units], w, 0.01)

    def ratio(units):  # mean move over merged move, equal weights
        return 1 / float(plain(units)["w"].norm())

    def mean_ratio(size):
        groups = list(itertools.combinations(models, size))
        return sum(ratio(g) for g in groups) / len(groups)

    merge = _mixture_merge(inputs, FisherSpec(stretch=1.0), models)
    pair = merge(["a", "b"], [0.5, 0.5])["w"]
    assert torch.allclose(pair, plain(["a", "b"])["w"] * ratio(["a", "b"]) / mean_ratio(2))
    triple = merge(["a", "b", "c"], [1 / 3] * 3)["w"]
    assert torch.equal(triple, plain(["a", "b", "c"])["w"])  # 3 > stretch_max_models 2
    assert torch.equal(merge(["a"], [1.0])["w"], deltas["a"]["w"])
    wide = _mixture_merge(inputs, FisherSpec(stretch=1.0, stretch_max_models=3), models)
    expected = plain(["a", "b", "c"])["w"] * ratio(["a", "b", "c"]) / mean_ratio(3)
    assert torch.allclose(wide(["a", "b", "c"], [1 / 3] * 3)["w"], expected)


def test_fisher_weights_give_each_partition_its_share():
    """Units inside a partition share its weight (macro), as a seq model trains each
    partition an equal share; with partition-level models, the paper's merged vector."""
    from types import SimpleNamespace

    from megablocks_ablate.ablate.mixtures import Mixture
    from megablocks_ablate.ablate.runner.fisher import fisher_weights

    m = Mixture.of({"a": ["a0", "a1"], "b": ["b0"]})
    w = fisher_weights(SimpleNamespace(partition_models={}), m)
    assert w == pytest.approx({"a0": 0.25, "a1": 0.25, "b0": 0.5})
    models = {"a": "partition:a", "b": "b0"}
    w = fisher_weights(SimpleNamespace(partition_models=models), m)
    assert w == pytest.approx({"partition:a": 0.5, "b0": 0.5})
