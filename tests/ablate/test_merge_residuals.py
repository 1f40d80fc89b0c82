"""benchmarks/merge_residuals.py: per domain, the partitions whose mixtures seq and merge judge apart."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
from study_fixtures import fill_roles_store, load_benchmark

from megablocks_ablate.ablate.analysis import ROLE_OOD


@pytest.fixture(scope="module")
def resid():
    return load_benchmark("merge_residuals")


@pytest.fixture
def study(tmp_path):
    os.makedirs(tmp_path / "s")
    store, _, _ = fill_roles_store(str(tmp_path / "s" / "results.sqlite"), order=tuple("pqrst"))
    store.close()
    return str(tmp_path / "s")


def test_a_partition_that_seq_values_more_reads_negative(resid, study):
    table = copy.deepcopy(resid.load(study))
    for d, by_m in table.values["seq"].items():  # seq = merged, 5% better with partition p
        for m in by_m:
            gain = 0.05 if "p" in table.mixtures[m].names else 0.0
            by_m[m] = table.values["merged"][d][m] * math.exp(-gain)
    got = resid.residuals(table)
    assert got["p"] == pytest.approx({q: 0.0 for q in "qrst"}, abs=1e-9)  # no p: seq = merged
    for d, row in got.items():
        if d == "p":
            continue
        ids, merged, seq = table.paired("merged", d, ROLE_OOD)
        x, y = np.log(merged), np.log(seq)
        b, a = np.polyfit(x, y, 1)
        ref = (y - (a + b * x)) * 100
        with_p = [ref[i] for i, m in enumerate(ids) if "p" in table.mixtures[m].names]
        assert row["p"] == pytest.approx(float(np.mean(with_p)), abs=1e-9)
        assert row["p"] < -1.0 and all(v > 0 for k, v in row.items() if k != "p")
        assert d not in row  # a domain is out-of-domain only for mixtures without it


def test_cli_prints_the_table_and_writes_json(resid, study, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert resid.main([study, "--json", str(out)]) == 0
    assert "| domain | p | q | r | s | t |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["benchmark"] == "merge_residuals" and data["proxy"] == "merged"
    assert set(data["domains"]["p"]) == {"q", "r", "s", "t"}
    with pytest.raises(SystemExit, match="expected a study out_dir"):
        resid.main([str(tmp_path / "missing")])
