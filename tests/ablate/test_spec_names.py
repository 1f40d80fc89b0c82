"""A study spec by name: ``study plan demo`` loads the packaged preset, with its paths
relative to the working directory; a file of that name wins; an unknown name lists the
known presets in one line."""

from __future__ import annotations

import os

import pytest

from megablocks_ablate.ablate.spec import StudySpec
from megablocks_ablate.ablate.spec_names import is_bare_name, study_spec_file
from megablocks_ablate.cli import main
from megablocks_ablate.config import shipped_preset_dir
from megablocks_ablate.errors import ConfigError

PRESET = os.path.join(shipped_preset_dir("studies"), "demo.yaml")


@pytest.mark.parametrize(
    "text,bare",
    [
        ("demo", True),
        ("demo.yaml", False),
        ("demo.yml", False),
        ("spec.json", False),
        ("studies/demo", False),
        ("./demo", False),
        ("~/demo", False),
        (".hidden", False),
        ("", False),
    ],
)
def test_what_reads_as_a_name(text, bare):
    assert is_bare_name(text) is bare


def test_a_name_is_the_packaged_preset_unless_a_file_has_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert study_spec_file("demo") == PRESET and os.path.isfile(PRESET)
    (tmp_path / "demo").mkdir()  # a directory of that name is not a spec file
    assert study_spec_file("demo") == PRESET
    (tmp_path / "mine").write_text("name: mine\n")
    assert study_spec_file("mine") == "mine"
    assert study_spec_file("missing.yaml") == "missing.yaml"  # a path: its own error later
    assert study_spec_file("sub/demo") == "sub/demo"


def test_an_unknown_name_lists_the_presets():
    with pytest.raises(ConfigError, match=r"study spec 'nope': .*\(known presets: demo;"):
        study_spec_file("nope")


def test_the_preset_by_name_keeps_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = StudySpec.load("demo", ["validation.n=3"])
    assert spec.name == "stdlib-demo" and spec.validation.n == 3
    assert (spec.data, spec.out_dir) == ("demo_out/data", "demo_out/study")
    assert spec.eval.extra == ["demo_out/ood/general.jsonl"]
    assert "data.manifest=demo_out/seed_data" in spec.seed.overrides
    assert spec.to_dict() == StudySpec.load(PRESET, ["validation.n=3"]).to_dict()


def test_study_commands_take_the_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["study", "plan", "demo", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "name: stdlib-demo" in printed and "data: demo_out/data" in printed
    # no demo_out/ here: the plan names the missing data, relative to the working directory
    assert main(["study", "plan", "demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data: demo_out/data"), err
    assert main(["study", "report", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no packaged study preset of that name" in err[0], err
    assert os.listdir(tmp_path) == []
