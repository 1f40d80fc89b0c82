"""Partition-level models (``partition_models: true``, paper §5.2) and ``ind_seq``.

A tiny study whose partitions hold two base units each: the planner adds one model per
partition trained on both units for 2x the unit budget; ``merged`` is then the uniform
average of the mixture's partition-level models (``macro`` and ``micro`` stay unit
averages), the partition models' own scores are stored beside the unit models' for
``mean_ind`` / ``ind_id``, and a one-unit partition reuses its unit model.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import yaml
from runner_fixtures import tiny_settings

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.demo import build_data, study_spec
from megablocks_ablate.ablate.runner import RunOptions, dry_run, resolve, run_study
from megablocks_ablate.ablate.spec import StudySpec
from megablocks_ablate.ablate.store import ResultStore
from megablocks_ablate.errors import ConfigError

pytestmark = pytest.mark.integration  # trains a whole tiny study


@pytest.fixture(scope="module")
def study_two_units(tmp_path_factory):
    """(spec path, finished runner): 3 partitions (2 units, 2 units, 1 unit)."""
    from megablocks_ablate.corpora.synthetic import write_corpus
    from megablocks_ablate.data.manifest import Manifest

    root = tmp_path_factory.mktemp("pstudy")
    corpus = write_corpus(str(root / "corpus.jsonl"), n_docs=600, seed=3)
    s = tiny_settings(str(root), corpus)
    s.unit_tokens = "3k"
    data, seed_data = build_data(s, time.time())
    units = Manifest.load(data).partition_units()
    names = [p for p in units if len(units[p]) >= 2][:3]
    assert len(names) == 3, units
    parts = {
        names[0]: units[names[0]][:2],
        names[1]: units[names[1]][:2],
        names[2]: units[names[2]][:1],
    }
    spec = study_spec(s, data, seed_data, partitions=parts)
    spec["partition_models"] = True
    spec["validation"] = dict(spec["validation"], n=0, mixtures=[[names[0], names[1]]])
    path = str(root / "study.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    runner = run_study(resolve(StudySpec.load(path)), RunOptions())
    return path, runner, names, parts


def test_plan_trains_one_model_per_multi_unit_partition(study_two_units):
    path, runner, names, parts = study_two_units
    study = runner.study
    assert study.partition_models == {
        names[0]: f"partition:{names[0]}",
        names[1]: f"partition:{names[1]}",
        names[2]: parts[names[2]][0],  # one unit: its unit model is the partition model
    }
    plan = runner.plan()
    assert sorted(j.name for j in plan.partitions) == sorted(
        [f"partition:{names[0]}", f"partition:{names[1]}"]
    )
    for j in plan.partitions:
        g = j.name.split(":", 1)[1]
        assert j.weights == {u: 0.5 for u in parts[g]}
        assert j.tokens == 2 * plan.units[0].tokens  # (budgets round up to whole steps)
        assert j.entry.complete
    assert study.cost.partition_model_tokens == 4 * study.unit_tokens
    assert "partition-level models: 2" in dry_run(study)


def test_merged_averages_partition_models_and_they_are_scored(study_two_units):
    path, runner, names, parts = study_two_units
    study = runner.study
    with ResultStore(os.path.join(study.spec.out_dir, "results.sqlite")) as store:
        meta = store.get_meta("study")
        subjects = {r.subject for r in store.unit_results()}
        rows = {(r.subject, r.proxy, r.domain): r for r in store.results()}
        spent = store.get_meta("spent")
    assert meta["partition_models"] == study.partition_models
    assert {f"partition:{names[0]}", f"partition:{names[1]}"} <= subjects
    m = next(m for m in study.mixtures if set(m.names) == {names[0], names[1]})
    merged = rows[(m.id, "merged", names[0])].provenance["weights"]
    assert merged == {f"partition:{names[0]}": 0.5, f"partition:{names[1]}": 0.5}
    macro = rows[(m.id, "macro", names[0])].provenance["weights"]
    assert macro == {u: 0.25 for g in names[:2] for u in parts[g]}
    # merged and macro are different models here, so their scores differ
    assert not math.isclose(
        rows[(m.id, "merged", names[0])].score.nll_sum,
        rows[(m.id, "macro", names[0])].score.nll_sum,
    )
    unit_job_tokens = runner.plan().units[0].tokens
    assert spent["partition-model tokens"] == 4 * unit_job_tokens


def test_ind_seq_needs_a_cross_scale_study(tmp_path):
    with pytest.raises(ConfigError, match="validation.ind_seq: only for cross-scale"):
        StudySpec.from_dict(
            {
                "data": "d",
                "out_dir": str(tmp_path),
                "seed": {"checkpoint": "s"},
                "unit": {"config": "tiny_unit"},
                "mixtures": {"k_subsets": 2},
                "validation": {"ind_seq": True, "n": 1, "train": {"config": "tiny_seq"}},
            }
        ).validate()


def test_merged_weights_with_partition_models():
    m = mx.Mixture.of({"a": ["a-0", "a-1"], "b": ["b-0"]})
    pm = {"a": "partition:a", "b": "b-0"}
    assert mx.proxy_weights(m, "merged", pm) == {"partition:a": 0.5, "b-0": 0.5}
    assert mx.proxy_weights(m, "merged") == mx.proxy_weights(m, "micro")
    plan = mx.merge_plan(m, ["merged", "macro", "micro"], pm)
    assert len(plan) == 3
    with pytest.raises(ValueError, match="no partition-level model"):
        mx.proxy_weights(m, "merged", {"a": "partition:a"})


def test_ind_seq_trains_the_validation_mixtures_at_the_unit_scale(tmp_path):
    """A "cross-scale" study whose target scale is the units' own (model preset tiny, the
    seed as its init_from): ind_seq then trains the same runs as seq, so its stored rows
    must equal the seq rows exactly (training is deterministic)."""
    from megablocks_ablate.corpora.synthetic import write_corpus

    corpus = write_corpus(str(tmp_path / "corpus.jsonl"), n_docs=600, seed=3)
    s = tiny_settings(str(tmp_path), corpus)
    data, seed_data = build_data(s, time.time())
    spec = study_spec(s, data, seed_data)
    names = list(spec["partitions"])
    seed_final = os.path.join(spec["seed"]["overrides"][-2].split("=", 1)[1], "final")
    spec["validation"] = dict(
        spec["validation"],
        n=0,
        mixtures=[[names[0], names[1]]],
        model="tiny",
        ind_seq=True,
    )
    spec["validation"]["train"]["overrides"] += [f"init_from={seed_final}"]
    path = str(tmp_path / "study.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    runner = run_study(resolve(StudySpec.load(path)), RunOptions())
    plan = runner.plan()
    assert [j.kind for j in plan.ind_seqs] == [mx.IND_SEQ]
    assert plan.ind_seqs[0].entry.out_dir != plan.seqs[0].entry.out_dir
    with ResultStore(os.path.join(spec["out_dir"], "results.sqlite")) as store:
        seq = {r.domain: r.score for r in store.results(mx.SEQ)}
        ind_seq = {r.domain: r.score for r in store.results(mx.IND_SEQ)}
        spent = store.get_meta("spent")
    assert set(seq) == set(ind_seq) == set(runner.study.eval_sets)
    for d in seq:
        assert ind_seq[d].nll_sum == pytest.approx(seq[d].nll_sum, rel=1e-6)
    assert spent["ind_seq-model tokens"] == spent["seq-model tokens"]


def test_registry_key_changes_with_the_seed_optimizer_but_not_for_fresh(monkeypatch):
    """init_optimizer=seed is another trajectory (new key); fresh keeps the key that runs
    trained before the field existed had, so existing pools are still found."""
    from megablocks_ablate.ablate.runner import registry
    from megablocks_ablate.train.config import TrainConfig

    class FakeManifest:
        def __init__(self):
            self.units = {"u-0000": {"bin": {"sha256": "b"}, "idx": {"sha256": "i"}}}

    fresh = TrainConfig.from_preset("tiny_unit", ["init_optimizer=fresh"])
    seed = TrainConfig.from_preset("tiny_unit", ["init_optimizer=seed"])
    w = {"u-0000": 1.0}
    k_fresh, k_seed = (registry.run_key(c, FakeManifest(), w, "s" * 64) for c in (fresh, seed))
    assert k_fresh != k_seed
    # the key as computed before init_optimizer was a trajectory field
    before = tuple(f for f in registry.TRAJECTORY_FIELDS if f != "init_optimizer")
    assert len(before) == len(registry.TRAJECTORY_FIELDS) - 1
    monkeypatch.setattr(registry, "TRAJECTORY_FIELDS", before)
    assert registry.run_key(fresh, FakeManifest(), w, "s" * 64) == k_fresh


def test_registry_key_changes_with_weight_averaging_but_not_for_none(monkeypatch):
    """weight_average other than none is another model (new key); none keeps the key
    runs trained before the field existed had, whatever its unused settings say."""
    from megablocks_ablate.ablate.runner import registry
    from megablocks_ablate.train.config import TrainConfig

    class FakeManifest:
        def __init__(self):
            self.units = {"u-0000": {"bin": {"sha256": "b"}, "idx": {"sha256": "i"}}}

    def key(*overrides):
        cfg = TrainConfig.from_preset("tiny_unit", list(overrides))
        return registry.run_key(cfg, FakeManifest(), {"u-0000": 1.0}, "s" * 64)

    none = key()
    assert key("weight_average.ema_decay=0.5") == none
    tail = key("weight_average.kind=tail")
    assert len({none, tail, key("weight_average.kind=ema")}) == 3
    assert key("weight_average.kind=tail", "weight_average.start_fraction=0.75") != tail
    before = tuple(f for f in registry.TRAJECTORY_FIELDS if f != "weight_average")
    monkeypatch.setattr(registry, "TRAJECTORY_FIELDS", before)
    assert key() == none
