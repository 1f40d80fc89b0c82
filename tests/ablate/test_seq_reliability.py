"""benchmarks/seq_reliability.py: two seq sets of one study compared per domain."""

from __future__ import annotations

import json
import math
import os

import pytest
from study_fixtures import fill_roles_store, load_benchmark

from megablocks_ablate.ablate import analysis as an


@pytest.fixture(scope="module")
def rel():
    return load_benchmark("seq_reliability")


def _study(tmp_path, name, seed):
    os.makedirs(tmp_path / name)
    store, _, _ = fill_roles_store(str(tmp_path / name / "results.sqlite"), seed=seed)
    store.close()
    return str(tmp_path / name)


def test_a_study_against_itself_is_perfectly_reliable(rel, tmp_path):
    a = rel.load(_study(tmp_path, "a", 3))
    res = rel.reliability(a, a)
    assert set(res["domains"]) == set(a.domains)
    for d, row in res["domains"].items():
        assert row["seq_a_vs_seq_b"] == pytest.approx(1.0)
        ref = an.correlate(a, "merged", d, role="ood", n_boot=0).r
        assert row["merged_vs_seq_a"] == pytest.approx(ref)
        assert row["merged_vs_seq_b"] == pytest.approx(ref)
    assert res["pooled_seq_a_vs_seq_b"] == pytest.approx(1.0)


def test_other_seq_noise_lowers_the_agreement_and_the_cli_writes_json(rel, tmp_path, capsys):
    a_dir, b_dir = _study(tmp_path, "a", 3), _study(tmp_path, "b", 4)
    out = tmp_path / "r.json"
    assert rel.main([f"A={a_dir}", f"B={b_dir}", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "seq_reliability"
    assert all(r["seq_a_vs_seq_b"] < 1.0 for r in data["domains"].values())
    assert "| per-domain mean |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="expected a study out_dir"):
        rel.main([f"A={a_dir}", f"B={tmp_path / 'missing'}"])


def test_undefined_coefficients_are_left_out_of_the_mean(rel):
    assert rel.defined_mean([0.9, math.nan, 0.7]) == pytest.approx(0.8)
    assert math.isnan(rel.defined_mean([math.nan]))
    assert rel._f(math.nan) == "-" and rel._f(0.97123) == "0.971"
