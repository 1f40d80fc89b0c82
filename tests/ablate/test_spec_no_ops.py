"""What a spec did not change is said: an override that is already the value, a
``mixtures.random`` that adds no mixture (ablate/spec.py, config.py), and `study report
SPEC` on a store another spec wrote (commands/study.py, ablate/report.py)."""

from __future__ import annotations

import argparse
import logging
import os

import pytest
from study_fixtures import fill_store, write_manifest_dir

from megablocks_ablate import config as config_mod
from megablocks_ablate.ablate.report import spec_differences
from megablocks_ablate.ablate.runner import resolve
from megablocks_ablate.ablate.spec import StudySpec
from megablocks_ablate.ablate.store import ResultStore, store_path
from megablocks_ablate.commands import study as study_cmd
from megablocks_ablate.config import shipped_preset_dir
from megablocks_ablate.train.config import TrainConfig

PARTS = {"bio": 1, "cs": 1, "math": 1, "phys": 1}  # 4 partitions: 6 pairs


@pytest.fixture(autouse=True)
def _fresh_no_op_memory(monkeypatch):
    # each override is reported once per process; every test starts afresh
    monkeypatch.setattr(config_mod, "_REPORTED_NO_OPS", set())


@pytest.fixture()
def spec_file(tmp_path) -> str:
    data = write_manifest_dir(tmp_path / "data", PARTS)
    spec = StudySpec.from_dict(
        {
            "data": data,
            "out_dir": str(tmp_path / "study"),
            "seed": {"config": "tiny_seed"},
            "unit": {"config": "tiny_unit"},
            "mixtures": {"k_subsets": 2},
        }
    )
    path = str(tmp_path / "s.yaml")
    spec.save(path)
    return path


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_random_mixtures_that_add_nothing_are_reported(spec_file, caplog):
    caplog.set_level(logging.WARNING)
    study = resolve(StudySpec.load(spec_file, ["mixtures.random.n=50"]))
    assert len(study.mixtures) == 6  # the 6 pairs, as without the override
    (msg,) = _warnings(caplog)
    assert msg == (
        "mixtures.random (n=50, k=2) adds no mixture: only 6 2-subsets of 4 partitions "
        "exist; every one drawn is already a mixture of the study (k_subsets/explicit)"
    )
    caplog.clear()
    study = resolve(StudySpec.load(spec_file, ["mixtures.k_subsets=null", "mixtures.random.n=50"]))
    assert len(study.mixtures) == 6
    assert _warnings(caplog) == [
        "mixtures.random.n=50 draws 6: only 6 2-subsets of 4 partitions exist"
    ]
    caplog.clear()
    study = resolve(StudySpec.load(spec_file, ["mixtures.random.k=3", "mixtures.random.n=2"]))
    assert len(study.mixtures) == 8 and _warnings(caplog) == []  # 6 pairs + 2 triples


def test_an_override_already_in_place_is_reported_once(spec_file, caplog):
    caplog.set_level(logging.WARNING)
    StudySpec.load(spec_file, ["mixtures.k_subsets=2", "name=other"])
    StudySpec.load(spec_file, ["mixtures.k_subsets=2"])  # once per process
    assert _warnings(caplog) == [
        "override mixtures.k_subsets=2 changes nothing: mixtures.k_subsets is already 2"
    ]
    caplog.clear()
    presets = shipped_preset_dir("train")
    seed = TrainConfig.load_preset(presets, "tiny_seed").seed
    over = [f"seed={seed}", "optimizer.lr=0.5"]
    TrainConfig.load_preset(presets, "tiny_seed", over)  # a program's own: not reported
    assert _warnings(caplog) == []
    cfg = TrainConfig.load_preset(presets, "tiny_seed", over, report_no_ops=True)
    assert cfg.optimizer.lr == 0.5 and _warnings(caplog) == [
        f"override seed={seed} changes nothing: seed is already {seed}"
    ]
    caplog.clear()
    TrainConfig.load_preset(presets, "paperlike_unit", ["train_tokens=96000"], report_no_ops=True)
    assert _warnings(caplog) == [  # against the file's 96k, read as a count
        "override train_tokens=96000 changes nothing: train_tokens is already 96000"
    ]
    caplog.clear()
    # another type is another value (a flag is not the number 1); programmatic
    # replace() does not report
    config_mod.apply_overrides(
        {"a": True, "b": {"c": 1}}, ["a=1", "b.c=1.0", "d=1"], report_no_ops=True
    )
    TrainConfig.load_preset(presets, "tiny_seed").replace([f"seed={seed}"])
    assert _warnings(caplog) == []


def _report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    study_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["study", "report", *argv, "--bootstrap", "10", "--no-plots"])
    return args.func(args)


def test_study_report_warns_on_a_store_of_another_spec(spec_file, caplog):
    spec = StudySpec.load(spec_file)
    path = store_path(spec.out_dir)
    os.makedirs(spec.out_dir)
    store, _ = fill_store(path)
    meta = store.get_meta("study")
    meta["spec"] = resolve(spec).to_meta(store_file=path)["spec"]  # as the runner writes it
    store.set_meta("study", meta)
    assert spec_differences(store, spec.to_dict(), path) == []
    other = StudySpec.load(spec_file, ["mixtures.k_subsets=3", "name=other"])
    assert spec_differences(store, other.to_dict(), path) == [
        "mixtures.k_subsets",
        "name",
    ]
    meta.pop("spec")
    store.set_meta("study", meta)
    assert spec_differences(store, other.to_dict(), path) == []  # an older store: no spec
    meta["spec"] = resolve(spec).to_meta(store_file=path)["spec"]
    store.set_meta("study", meta)
    store.close()

    caplog.set_level(logging.WARNING)
    assert _report([spec_file]) == 0
    assert _warnings(caplog) == []
    assert _report([spec_file, "name=other", "--out", os.path.join(spec.out_dir, "r2")]) == 0
    (msg,) = _warnings(caplog)
    assert msg == (
        f"{path} was written under another spec than {spec_file} (differing: name); "
        "the report is of what the store holds"
    )
    with ResultStore(path) as s:  # still reported, from the store
        assert s.count() > 0
    assert os.path.isfile(os.path.join(spec.out_dir, "r2", "report.md"))
