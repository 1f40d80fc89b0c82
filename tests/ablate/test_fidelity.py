"""benchmarks/fidelity.py: the figures and targets of docs/fidelity.md, read from reports."""

from __future__ import annotations

import json
import os

import pytest
from study_fixtures import load_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def fid():
    return load_benchmark("fidelity")


@pytest.fixture
def report_dir(tmp_path):
    """A report/ whose summary.json holds the measured stdlib-fresh roles (docs/fidelity.md)."""
    with open(os.path.join(ROOT, "benchmarks", "results", "fidelity.json")) as f:
        roles = json.load(f)["studies"]["stdlib-fresh"]["roles"]
    d = tmp_path / "report"
    d.mkdir()
    summary = {
        "primary": "merged",
        "roles": roles,
        # summary row and decisions as report_tables writes them (values made up)
        "summary_row": {"cells": {"arith/raw": {"pearson": {"merged": {"r": 0.981}}}}},
        "decisions": {"merged": {"share_top2": 0.875, "mean_regret": 0.004}},
    }
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_targets_of_the_measured_demo_study(fid, report_dir):
    summary = json.loads((report_dir / "summary.json").read_text())
    got = fid.targets(summary)
    assert got["OOD mean >= 0.95"] == (pytest.approx(0.9162, abs=1e-4), False)
    assert got["summary row >= 0.97"] == (pytest.approx(0.981), True)
    assert got["pick in seq top 2 on >= 90% of OOD domains"] == (0.875, False)
    assert got["mean regret <= 1%"] == (0.004, True)
    # the best proxy by OOD mean: merged = macro = micro here, all above mean_ind
    assert fid.best_proxy(summary) in ("merged", "macro", "micro")
    assert fid.targets(summary, "mean_ind")["OOD mean >= 0.95"][0] == pytest.approx(0.741, abs=1e-3)


def test_cli_writes_its_json_and_refuses_a_users_file(fid, report_dir, tmp_path, capsys):
    out = tmp_path / "f.json"
    assert fid.main([f"s={report_dir}", "--json", str(out)]) == 0
    assert "| s | **merged** | 0.981 / - | 0.916 / 0.906 |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["benchmark"] == "fidelity" and data["command"].endswith(f"--json {out}")
    assert data["studies"]["s"]["targets"]["OOD mean >= 0.95"][1] is False
    assert data["studies"]["s"]["decisions"]["merged"]["share_top2"] == 0.875
    assert fid.main([f"s={report_dir}", "--json", str(out)]) == 0  # a rerun refreshes it
    mine = tmp_path / "mine.json"
    mine.write_text("{}\n")
    with pytest.raises(SystemExit, match="not overwriting it"):
        fid.main([f"s={report_dir}", "--json", str(mine)])
    assert mine.read_text() == "{}\n"
    assert fid.main([f"s={tmp_path / 'nothing'}"]) == 2


def test_replicates_give_mean_sd_and_range_and_judge_the_mean(fid, report_dir, tmp_path, capsys):
    summary = json.loads((report_dir / "summary.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    summary["summary_row"]["cells"]["arith/raw"]["pearson"]["merged"]["r"] = 0.951
    summary["decisions"]["merged"] = {"share_top2": 1.0, "mean_regret": 0.02}
    (other / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "f.json"
    argv = [f"a={report_dir}", f"b={other}", "--replicates", "setting=a,b", "--json", str(out)]
    assert fid.main(argv) == 0
    text = capsys.readouterr().out
    assert (
        "setting (2 replicates): summary row >= 0.97: mean 0.9660 sd 0.0212 [0.9510, 0.9810]"
        in text
    )
    rep = json.loads(out.read_text())["replicates"]["setting"]
    assert rep["studies"] == ["a", "b"]
    row = rep["targets"]["summary row >= 0.97"]
    assert row["mean"] == pytest.approx(0.966) and row["mean_met"] is False  # 0.981 alone met it
    assert row["sd"] == pytest.approx(0.0212132, abs=1e-6)
    top2 = rep["targets"]["pick in seq top 2 on >= 90% of OOD domains"]
    assert top2["mean"] == pytest.approx(0.9375) and top2["mean_met"] is True
    regret = rep["targets"]["mean regret <= 1%"]
    assert regret["values"] == [0.004, 0.02] and regret["mean_met"] is False
    assert fid.main([f"a={report_dir}", "--replicates", "s=a,zz"]) == 2
    with pytest.raises(SystemExit):
        fid.main([f"a={report_dir}", "--replicates", "s=a"])
