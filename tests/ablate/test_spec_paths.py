"""Study spec paths: relative to the spec file, not the working directory (ablate/spec_paths.py)."""

from __future__ import annotations

import logging
import os

import yaml
from study_fixtures import write_manifest_dir

from megablocks_ablate.ablate.spec import StudySpec
from megablocks_ablate.ablate.spec_paths import record_spec_paths

SPEC = {
    "data": "data",
    "out_dir": "study",
    "seed": {
        "config": "../configs/seed.yaml",
        "overrides": ["data.manifest=seed_data", "out_dir=seed", "train_tokens=8k"],
    },
    "unit": {"config": "tiny_unit", "overrides": ["init_from=/abs/seed", "out_dir=null"]},
    "mixtures": {"k_subsets": 2},
    "eval": {"extra": ["ood/a.jsonl", "named=ood/b.jsonl"], "paloma": {"dir": "paloma"}},
}


def _write(path, spec: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def test_paths_are_relative_to_the_spec_file(tmp_path, monkeypatch):
    write_manifest_dir(tmp_path / "exp" / "data", {"a": 1, "b": 1})
    path = _write(tmp_path / "exp" / "study.yaml", SPEC)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for given, base in ((path, str(tmp_path / "exp")), ("../exp/study.yaml", "../exp")):
        s = StudySpec.load(given, ["validation.seed=1", "out_dir=mine"])
        assert s.data == os.path.join(base, "data")
        assert s.out_dir == "mine"  # a command-line override is as typed
        assert s.seed.config == os.path.join(os.path.dirname(base), "configs", "seed.yaml")
        assert s.seed.overrides == [
            f"data.manifest={os.path.join(base, 'seed_data')}",
            f"out_dir={os.path.join(base, 'seed')}",
            "train_tokens=8k",
        ]
        # preset names, absolute paths and null are left alone
        assert s.unit.config == "tiny_unit"
        assert s.unit.overrides == ["init_from=/abs/seed", "out_dir=null"]
        assert s.eval.extra == [
            os.path.join(base, "ood", "a.jsonl"),
            f"named={os.path.join(base, 'ood', 'b.jsonl')}",
        ]
        assert s.eval.paloma is not None and s.eval.paloma.dir == os.path.join(base, "paloma")
    # from the spec's own directory nothing changes
    monkeypatch.chdir(tmp_path / "exp")
    s = StudySpec.load("study.yaml")
    assert (s.data, s.out_dir, s.eval.extra[0]) == ("data", "study", os.path.join("ood", "a.jsonl"))


def test_an_older_spec_relative_to_the_working_directory_still_loads(tmp_path, monkeypatch, caplog):
    """Written for the old rule: its data exists only relative to the working directory,
    so every relative path is read from there (with a warning); when the data is beside
    the spec too, the spec's directory wins."""
    write_manifest_dir(tmp_path / "runs" / "data", {"a": 1, "b": 1})
    spec = dict(SPEC, data="runs/data", out_dir="runs/study")
    path = _write(tmp_path / "configs" / "old.yaml", spec)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        s = StudySpec.load(path)
    assert (s.data, s.out_dir) == ("runs/data", "runs/study")
    assert s.seed.overrides[0] == "data.manifest=seed_data"
    assert "is not in the spec's directory" in caplog.text and "data: runs/data" in caplog.text
    write_manifest_dir(tmp_path / "configs" / "runs" / "data", {"a": 1})
    s = StudySpec.load(path)
    assert s.data == str(tmp_path / "configs" / "runs" / "data")
    assert s.out_dir == str(tmp_path / "configs" / "runs" / "study")


def test_the_shipped_preset_stays_relative_to_the_working_directory(tmp_path, monkeypatch):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.chdir(tmp_path)
    s = StudySpec.load(os.path.join(repo, "configs", "studies", "demo.yaml"))
    assert (s.data, s.out_dir) == ("demo_out/data", "demo_out/study")
    assert "out_dir=demo_out/seed" in s.seed.overrides


def test_record_then_load_elsewhere_names_the_same_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    held = {
        "data": "exp/data",  # relative to the working directory, as a process holds them
        "out_dir": str(tmp_path / "exp" / "study"),  # absolute, inside the study directory
        "seed": {"checkpoint": "/shared/seed/final"},  # absolute, outside
        "unit": {"config": "tiny_unit", "overrides": ["out_dir=exp/runs/{unit}"]},
        "mixtures": {"k_subsets": 2},
        "eval": {"extra": [f"x={tmp_path / 'exp' / 'x.jsonl'}", "other.jsonl"]},
    }
    spec_file = str(tmp_path / "exp" / "study.yaml")
    plain = record_spec_paths(held, spec_file)
    assert plain["data"] == "data" and plain["out_dir"] == held["out_dir"]  # absolute kept
    assert plain["eval"]["extra"][1] == os.path.join("..", "other.jsonl")
    moved = record_spec_paths(held, spec_file, inside=str(tmp_path / "exp"))
    assert moved["out_dir"] == "study" and moved["eval"]["extra"][0] == "x=x.jsonl"
    assert moved["seed"]["checkpoint"] == "/shared/seed/final"  # outside: as given
    assert moved["unit"]["overrides"] == ["out_dir=runs/{unit}"]
    assert held["data"] == "exp/data"  # the argument is not changed
    write_manifest_dir(tmp_path / "exp" / "data", {"a": 1, "b": 1})
    _write(tmp_path / "exp" / "study.yaml", moved)
    os.rename(tmp_path / "exp", tmp_path / "moved")
    s = StudySpec.load(str(tmp_path / "moved" / "study.yaml"))
    assert s.data == str(tmp_path / "moved" / "data")
    assert s.out_dir == str(tmp_path / "moved" / "study")
    assert s.eval.extra[0] == f"x={tmp_path / 'moved' / 'x.jsonl'}"
