"""The paper's summary row and the decision figures (ablate/decisions.py), against
hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from study_fixtures import ROLE_EXTRA, fill_roles_store

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate import decisions as dc
from megablocks_ablate.ablate.mixtures import Mixture
from megablocks_ablate.ablate.report import write_report

NAMES = "abcde"
SEQ_X = {"a": 10, "b": 11, "c": 12, "d": 13, "e": 14}
MERGED_X = {"a": 6, "b": 5, "c": 7, "d": 8, "e": 9}
SEQ_Y = {"a": 20, "b": 30, "c": 40, "d": 50, "e": 60}
MERGED_Y = {"a": 2.5, "b": 3, "c": 4, "d": 5, "e": 1}
SEQ_A = {"a": 1, "b": 3, "c": 4, "d": 5, "e": 6}  # domain "a": a's own held-out set
MERGED_A = {"a": 9, "b": 1, "c": 2, "d": 3, "e": 4}


@pytest.fixture()
def table():
    mix = {n: Mixture.of({n: [n + "0"]}) for n in NAMES}

    def by_id(vals):
        return {mix[n].id: float(v) for n, v in vals.items()}

    values = {
        "seq": {"x": by_id(SEQ_X), "y": by_id(SEQ_Y), "a": by_id(SEQ_A)},
        "merged": {"x": by_id(MERGED_X), "y": by_id(MERGED_Y), "a": by_id(MERGED_A)},
    }
    t = an.ResultTable(
        values, {m.id: m for m in mix.values()}, ["a", "x", "y"], ["merged"], {"a": ["a0"]}
    )
    return t, {n: mix[n].id for n in NAMES}


def test_summary_domains_are_ood_for_every_validation_mixture(table):
    t, _ = table
    assert dc.summary_domains(t) == ["x", "y"]  # "a" is mixture a's own set


def test_summary_row_values_and_coefficients(table):
    t, ids = table
    arith = dc.summary_values(t, "seq", ["x", "y"], "arith")
    geom = dc.summary_values(t, "merged", ["x", "y"], "geom")
    assert arith[ids["a"]] == pytest.approx(15.0) and arith[ids["e"]] == pytest.approx(37.0)
    assert geom[ids["e"]] == pytest.approx(math.sqrt(9 * 1))
    row = dc.summary_row(t, ["merged"], n_boot=0)
    sx = [(SEQ_X[n] + SEQ_Y[n]) / 2 for n in NAMES]
    mx = [(MERGED_X[n] + MERGED_Y[n]) / 2 for n in NAMES]
    assert row.get("merged").r == pytest.approx(np.corrcoef(mx, sx)[0, 1])
    assert row.get("merged").n == 5
    lg_s = [(math.log(SEQ_X[n]) + math.log(SEQ_Y[n])) / 2 for n in NAMES]
    lg_m = [(math.log(MERGED_X[n]) + math.log(MERGED_Y[n])) / 2 for n in NAMES]
    assert row.get("merged", "pearson", "geom/log").r == pytest.approx(
        np.corrcoef(lg_m, lg_s)[0, 1]
    )
    assert row.get("merged", "pearson", "arith/log").r == pytest.approx(
        np.corrcoef(np.log(mx), np.log(sx))[0, 1]
    )
    # Spearman does not see the log
    assert row.get("merged", "spearman", "arith/log").r == row.get("merged", "spearman").r
    assert row.missing_reason == ""


def test_decisions_rank_overlap_and_regret(table):
    t, ids = table
    ds = dc.decisions(t, "merged")
    rows = {d.row: d for d in ds.domains}
    assert list(rows) == ["a", "x", "y"]
    x, y, a = rows["x"], rows["y"], rows["a"]
    assert (x.pick, x.seq_best, x.seq_rank, x.top_overlap, x.n) == (ids["b"], ids["a"], 2, 3, 5)
    assert x.regret == pytest.approx(11 / 10 - 1)
    assert (y.pick, y.seq_rank, y.top_overlap) == (ids["e"], 5, 2)
    assert y.regret == pytest.approx(60 / 20 - 1)
    # on "a", mixture a is in-domain: the 4 others are ranked
    assert (a.n, a.pick, a.seq_rank, a.regret) == (4, ids["b"], 1, 0.0)
    s = ds.summary
    assert s is not None and (s.pick, s.seq_rank) == (ids["b"], 2)  # 4.0 < a's 4.25
    assert s.regret == pytest.approx(20.5 / 15 - 1)
    assert ds.share_top2 == pytest.approx(2 / 3)
    assert ds.mean_regret == pytest.approx((0.1 + 2.0 + 0.0) / 3)
    assert ds.max_regret == pytest.approx(2.0) and ds.median_rank == 2
    assert ds.mean_overlap == pytest.approx(8 / 3)
    # the proxy's margin: its second-best over its pick, minus 1 (x: a 6 over b 5)
    assert (x.margin, y.margin, a.margin) == (pytest.approx(0.2), 1.5, 1.0)
    assert ds.close_calls == 0 and not x.close_call
    line = ds.fmt()
    assert "top 2 on 2/3 OOD domains" in line and "mean regret 70.00%" in line
    assert "0 close call(s)" in line
    assert json.loads(json.dumps(ds.to_json()))["share_top2"] == pytest.approx(2 / 3)


def test_a_pick_within_one_percent_of_the_runner_up_is_a_close_call():
    ids = ["m1", "m2", "m3", "m4"]
    close = dc.decide("x", ids, np.array([1.005, 1.0, 2, 3]), np.array([1.0, 2, 3, 4]))
    assert close is not None and close.pick == "m2" and close.margin == pytest.approx(0.005)
    assert close.close_call and (close.seq_rank, close.regret) == (2, 1.0)
    clear = dc.decide("x", ids, np.array([1.02, 1.0, 2, 3]), np.array([1.0, 2, 3, 4]))
    assert clear is not None and not clear.close_call
    ds = dc.DecisionSummary("merged", [close, clear], None)
    assert ds.close_calls == 1 and ds.to_json()["close_calls"] == 1
    assert "1 close call(s) (a pick within 1% of the proxy's runner-up)" in ds.fmt()


def test_too_few_mixtures_give_no_decision_and_no_coefficient():
    ids = ["m1", "m2", "m3"]
    assert dc.decide("x", ids, np.array([1.0, 2, 3]), np.array([1.0, 2, 3])) is None
    assert dc.decide("x", ids + ["m4"], np.full(4, 2.0), np.arange(4.0)) is None  # all tied
    c = an.bootstrap_ci([1, 2, 3], [1, 2, 3])
    assert math.isnan(c.r) and c.n == 3 and c.fmt() == "– n=3"


def test_no_summary_domain_is_said(table):
    t, _ = table
    t.domains = ["a"]
    row = dc.summary_row(t, ["merged"], n_boot=0)
    assert row.domains == [] and "no summary row" in row.missing_reason
    assert math.isnan(row.get("merged").r)
    assert dc.decisions(t, "merged").summary is None


def test_report_shows_summary_row_decisions_and_n(tmp_path):
    store, _, _ = fill_roles_store(str(tmp_path / "r.sqlite"))
    summary = write_report(store, str(tmp_path / "rep"), n_boot=50, plots=False)
    store.close()
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Summary row (the paper's Paloma / Avg row)" in md
    assert f"({', '.join(ROLE_EXTRA)})" in md
    assert "## Decisions: how good is the proxy's pick under seq?" in md
    assert "**pick in seq's top 2 (OOD domains)**" in md
    assert "**close calls (OOD domains)**" in md
    got = json.loads((tmp_path / "rep" / "summary.json").read_text())
    margins = [d["margin"] for d in got["decisions"]["merged"]["ood_domains"].values()]
    closes = sum(m < dc.CLOSE_CALL for m in margins)
    assert got["decisions"]["merged"]["close_calls"] == closes
    section = md.split("## Decisions")[1].splitlines()
    header = [c.strip() for c in next(ln for ln in section if ln.startswith("| row |")).split("|")]
    row = next(ln for ln in section if ln.startswith("| **close calls (OOD domains)**"))
    assert row.split("|")[header.index("merged")].strip() == f"{closes} of {len(margins)}"
    cell = got["summary_row"]["cells"]["arith/raw"]["pearson"]["merged"]
    assert cell["n"] == 6 and cell["lo"] is not None and cell["lo"] <= cell["r"] <= cell["hi"]
    assert got["decisions"]["merged"]["n_domains"] == len(ROLE_EXTRA)  # 3 OOD points elsewhere
    head = summary.headline()
    assert "summary row (mean perplexity over x, y" in head and "merged decisions:" in head
    # every coefficient shows its n; the OOD mean carries an interval over mixtures
    ood_mean = summary.fig("merged", "ood", "mean", "pearson")
    assert ood_mean.per == "domains" and not math.isnan(ood_mean.lo)
    assert f"n={ood_mean.n} domains" in md


def test_the_recommendation_says_how_far_ahead_of_its_runner_up_it_is():
    from megablocks_ablate.ablate.report_tables import _runner_up_note

    assert _runner_up_note(None) == ""
    clear = _runner_up_note(("m2", "b+c", 0.02))
    assert clear == "; ahead of the runner-up b+c by 2.00%"
    close = _runner_up_note(("m2", "b+c", 0.004))
    assert "by 0.40% (a close call, under 1%" in close and "seq model" in close
