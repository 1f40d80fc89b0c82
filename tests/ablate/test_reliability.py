"""benchmarks/reliability.py: a study against its retrained seq or unit models, per domain."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
from study_fixtures import fill_roles_store, load_benchmark

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate.analysis import ROLE_OOD


@pytest.fixture(scope="module")
def rel():
    return load_benchmark("reliability")


def _study(tmp_path, name, seed):
    os.makedirs(tmp_path / name)
    store, _, _ = fill_roles_store(str(tmp_path / name / "results.sqlite"), seed=seed)
    store.close()
    return str(tmp_path / name)


def _jitter(table: an.ResultTable, proxy: str, sd: float, seed: int) -> an.ResultTable:
    """``table`` with ``proxy``'s values multiplied by log-normal noise: a retrained set."""
    out = copy.deepcopy(table)
    rng = np.random.default_rng(seed)
    for by_m in out.values[proxy].values():
        for m in by_m:
            by_m[m] *= math.exp(rng.normal(0, sd))
    return out


def test_a_study_against_itself_is_perfectly_reliable(rel, tmp_path):
    a = rel.load(_study(tmp_path, "a", 3))
    res = rel.reliability(a, a, a)
    assert res["columns"] == ["merged_vs_seq", "seq_a_vs_seq_b", "merged_a_vs_merged_b", "ceiling"]
    # a domain with fewer than MIN_POINTS out-of-domain mixtures gives no coefficient
    enough = {d for d in a.domains if len(a.paired("merged", d, ROLE_OOD)[0]) >= an.MIN_POINTS}
    assert set(res["domains"]) == enough and enough
    for d, row in res["domains"].items():
        ref = an.correlate(a, "merged", d, role="ood", n_boot=0).r
        assert row["merged_vs_seq"] == pytest.approx(ref)
        assert row["seq_a_vs_seq_b"] == pytest.approx(1.0)
        assert row["merged_a_vs_merged_b"] == pytest.approx(1.0)
        assert row["ceiling"] == pytest.approx(1.0)
    assert res["pooled"]["seq_a_vs_seq_b"] == pytest.approx(1.0)


def test_retrained_columns_are_pearson_of_the_two_sets(rel, tmp_path):
    a = rel.load(_study(tmp_path, "a", 3))
    seq_b, units_b = _jitter(a, "seq", 0.05, 1), _jitter(a, "merged", 0.08, 2)
    res = rel.reliability(a, seq_b=seq_b, units_b=units_b)
    for d, row in res["domains"].items():
        ids, merged, seq = a.paired("merged", d, ROLE_OOD)
        sb = [seq_b.values["seq"][d][m] for m in ids]
        mb = [units_b.values["merged"][d][m] for m in ids]
        r_ss, r_mm = np.corrcoef(seq, sb)[0, 1], np.corrcoef(merged, mb)[0, 1]
        assert row["n"] == len(ids)
        assert row["seq_a_vs_seq_b"] == pytest.approx(r_ss) and r_ss < 1.0
        assert row["merged_a_vs_merged_b"] == pytest.approx(r_mm) and r_mm < 1.0
        assert row["ceiling"] == pytest.approx(math.sqrt(r_ss * r_mm))
    only_seq = rel.reliability(a, seq_b=seq_b)
    assert only_seq["columns"] == ["merged_vs_seq", "seq_a_vs_seq_b"]
    with pytest.raises(SystemExit, match="give --seq-retrained"):
        rel.reliability(a)


def test_ceiling_known_values(rel):
    assert rel.ceiling(0.81, 0.64) == pytest.approx(0.72)
    assert math.isnan(rel.ceiling(math.nan, 0.9)) and math.isnan(rel.ceiling(-0.2, 0.9))


def test_cli_writes_json_and_reports_a_missing_study(rel, tmp_path, capsys):
    a_dir, b_dir = _study(tmp_path, "a", 3), _study(tmp_path, "b", 4)
    out = tmp_path / "r.json"
    assert rel.main([a_dir, "--seq-retrained", b_dir, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "reliability" and data["columns"][1] == "seq_a_vs_seq_b"
    assert all(r["seq_a_vs_seq_b"] < 1.0 for r in data["domains"].values())
    assert "| per-domain mean |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="expected a study out_dir"):
        rel.main([a_dir, "--units-retrained", str(tmp_path / "missing")])


def test_undefined_coefficients_are_left_out_of_the_mean(rel):
    assert rel.defined_mean([0.9, math.nan, 0.7]) == pytest.approx(0.8)
    assert math.isnan(rel.defined_mean([math.nan]))
    assert rel._f(math.nan) == "-" and rel._f(0.97123) == "0.971"
