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
    (d / "summary.json").write_text(json.dumps({"primary": "merged", "roles": roles}))
    return d


def test_targets_of_the_measured_demo_study(fid, report_dir):
    summary = json.loads((report_dir / "summary.json").read_text())
    got = fid.targets(summary)
    assert got["OOD mean >= 0.93"] == (pytest.approx(0.9162, abs=1e-4), False)
    assert got["OOD pooled >= 0.93"] == (pytest.approx(0.9941, abs=1e-4), True)
    assert got["OOD mean - mean_ind >= 0.1"] == (pytest.approx(0.1748, abs=1e-4), True)
    assert got["OOD pooled - mean_ind >= 0.1"][1] is False
    assert got["all-domain mean >= 0.93"] == (pytest.approx(0.9585, abs=1e-4), True)


def test_cli_writes_its_json_and_refuses_a_users_file(fid, report_dir, tmp_path, capsys):
    out = tmp_path / "f.json"
    assert fid.main([f"s={report_dir}", "--json", str(out)]) == 0
    assert "| s | **merged** | 0.916 / 0.906 |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["benchmark"] == "fidelity" and data["command"].endswith(f"--json {out}")
    assert data["studies"]["s"]["targets"]["OOD mean >= 0.93"][1] is False
    assert fid.main([f"s={report_dir}", "--json", str(out)]) == 0  # a rerun refreshes it
    mine = tmp_path / "mine.json"
    mine.write_text("{}\n")
    with pytest.raises(SystemExit, match="not overwriting it"):
        fid.main([f"s={report_dir}", "--json", str(mine)])
    assert mine.read_text() == "{}\n"
    assert fid.main([f"s={tmp_path / 'nothing'}"]) == 2
