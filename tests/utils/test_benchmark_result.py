"""Benchmark result files: a rerun refreshes its own file; any other file is refused, untouched."""

from __future__ import annotations

import glob
import json
import os

import pytest

from megablocks_ablate.utils.benchmark_result import (
    check_writable,
    command_line,
    load_own,
    write_result,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_first_write_and_rerun_replace_only_the_own_file(tmp_path):
    path = str(tmp_path / "sub" / "r.json")
    assert load_own(path, "eval") is None
    write_result(path, "eval", {"runs": [1]}, "python benchmarks/eval.py")
    data = json.loads(open(path).read())
    assert list(data)[:2] == ["benchmark", "command"]
    assert data == {"benchmark": "eval", "command": "python benchmarks/eval.py", "runs": [1]}
    write_result(path, "eval", {"runs": [2]}, "python benchmarks/eval.py --rounds 3")
    assert load_own(path, "eval")["runs"] == [2]
    assert [p for p in os.listdir(tmp_path / "sub") if p != "r.json"] == []  # no temporaries


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("my notes, not JSON\n", "is not a JSON results file"),
        ('{"runs": [1]}\n', "is not a results file of benchmarks/eval.py"),
        ("[1, 2]\n", "is not a results file"),
        ('{"benchmark": "merge", "kernel": []}\n', "of benchmarks/merge.py, not of"),
    ],
)
def test_a_file_that_is_not_this_benchmarks_is_refused_and_kept(tmp_path, content, why):
    path = tmp_path / "r.json"
    path.write_text(content)
    for attempt in (
        lambda: check_writable(str(path), "eval"),
        lambda: write_result(str(path), "eval", {"runs": []}, "python benchmarks/eval.py"),
    ):
        with pytest.raises(SystemExit, match=why) as e:
            attempt()
        assert str(path) in str(e.value) and "not overwriting it" in str(e.value)
    assert path.read_text() == content
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not a regular file"):
        check_writable(str(tmp_path), "eval")


def test_the_result_must_not_claim_another_benchmark_and_must_name_its_command(tmp_path):
    with pytest.raises(ValueError, match="written as 'eval'"):
        write_result(str(tmp_path / "r.json"), "eval", {"benchmark": "merge"}, "python x.py")
    with pytest.raises(ValueError, match="records the command"):
        write_result(str(tmp_path / "r.json"), "eval", {"runs": []})
    assert not os.path.exists(tmp_path / "r.json")
    write_result(str(tmp_path / "r.json"), "eval", {"command": "python y.py", "runs": []})
    assert load_own(str(tmp_path / "r.json"), "eval")["command"] == "python y.py"


def test_command_line_names_the_script_as_the_repository_has_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run from elsewhere: the arguments stay as given
    script = "/somewhere/checkout/benchmarks/fidelity.py"
    assert command_line(script, ["a=b", "--json", "o.json"]) == (
        "python benchmarks/fidelity.py a=b --json o.json"
    )


def test_every_committed_result_names_a_benchmark_script():
    """So rerunning each script (make bench) refreshes its committed file instead of refusing."""
    files = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")))
    assert files
    for f in files:
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
        name = data.get("benchmark")
        assert os.path.isfile(os.path.join(ROOT, "benchmarks", f"{name}.py")), (f, name)
        assert data.get("command", "").startswith(f"python benchmarks/{name}.py"), f


def test_undefined_figures_are_written_as_null_and_the_file_is_strict_json(tmp_path):
    path = tmp_path / "r.json"
    result = {"mean": {"r": float("nan"), "n": 3}, "rows": [0.5, float("inf"), (1.0, float("nan"))]}
    write_result(str(path), "reliability", result, "python benchmarks/reliability.py s")

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["mean"] == {"r": None, "n": 3} and data["rows"] == [0.5, None, [1.0, None]]
