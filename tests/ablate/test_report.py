"""The report: files, numbers equal to a recomputation from the store (ablate/report.py)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from study_fixtures import fill_roles_store, fill_store

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate.report import write_report
from megablocks_ablate.ablate.store import ResultStore


@pytest.fixture()
def report(tmp_path):
    store, _ = fill_store(str(tmp_path / "s.sqlite"))
    summary = write_report(store, str(tmp_path / "report"), n_boot=40, seed=1)
    yield summary, store, tmp_path / "report"
    store.close()


def test_files_and_headline(report):
    summary, store, out = report
    names = {p.name for p in out.iterdir()}
    assert {
        "report.md",
        "summary.json",
        "results.csv",
        "scores.csv",
        "correlations.csv",
        "rankings.csv",
        "scatter_merged.png",
        "scatter_mean_ind.png",
    } <= names
    assert (out / "scatter_merged.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    for section in (
        "## Headline",
        "### Pearson",
        "### Spearman",
        "## Top-3 agreement",
        "## Rankings by macro",  # c holds two units: macro heads the report
        "## Cost",
        "Recommended mixture",
    ):
        assert section in md
    head = summary.headline()
    assert "macro vs seq, out of domain: per-domain mean Pearson" in head
    assert "macro vs seq, pooled over domains: Pearson" in head and "report.md" in head
    assert json.loads((out / "summary.json").read_text())["primary"] == "macro"


def test_numbers_equal_a_recomputation_from_the_store(report):
    summary, store, out = report
    table = an.build_table(store)
    pooled = an.pooled_correlation(table, "merged", "pearson", n_boot=40, seed=1)
    assert summary.pooled["merged"]["pearson"] == pooled
    with open(out / "correlations.csv") as f:
        rows = {(r["method"], r["row"], r["role"], r["proxy"]): r for r in csv.DictReader(f)}
    for d in table.domains:
        for role in ("ood", "id", "all"):  # the report's domain rows are the OOD ones
            _, p, s = table.paired("macro", d, None if role == "all" else role)
            got = float(rows["spearman", d, role, "macro"]["r"])
            want = an.spearman(p, s) if len(p) >= an.MIN_POINTS else math.nan
            assert got == pytest.approx(want, nan_ok=True)
    with open(out / "results.csv") as f:
        raw = list(csv.DictReader(f))
    assert len(raw) == store.count() + store.count("unit_results")
    with open(out / "rankings.csv") as f:
        ranks = [r for r in csv.DictReader(f) if r["domain"] == "wiki"]
    assert [r["mixture_id"] for r in ranks] == [
        m for m, _ in an.rank_mixtures(table, "macro", "wiki")
    ]
    assert summary.recommended[0] == an.recommend(table, "macro")[0]
    # the runner-up by the same score (geometric mean over every domain), by hand
    scores = {}
    for mid in table.mixtures:
        vals = [table.get("macro", d).get(mid) for d in table.domains]
        if all(v is not None for v in vals):
            scores[mid] = math.exp(sum(math.log(v) for v in vals) / len(vals))
    ranked = sorted(scores, key=scores.get)
    assert summary.runner_up is not None and summary.runner_up[0] == ranked[1]
    margin = scores[ranked[1]] / scores[ranked[0]] - 1
    assert summary.runner_up[2] == pytest.approx(margin)
    got = json.loads((out / "summary.json").read_text())["runner_up"]
    assert got["id"] == ranked[1] and got["close_call"] == (margin < 0.01)
    assert f"ahead of the runner-up {got['label']} by {100 * margin:.2f}%" in summary.headline()


def test_report_without_seq_results(tmp_path):
    store, _ = fill_store(str(tmp_path / "s.sqlite"), n_seq=0)
    summary = write_report(store, str(tmp_path / "r"), n_boot=10, plots=False)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "No seq (validation) results yet" in md and summary.pooled == {}
    assert summary.recommended is not None
    store.close()


def _study_cli(argv):
    import argparse

    from megablocks_ablate.commands import study

    parser = argparse.ArgumentParser()
    study.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_study_report_command(tmp_path, capsys):
    fill_store(str(tmp_path / "results.sqlite"))[0].close()
    assert (
        _study_cli(
            [
                "study",
                "report",
                "--store",
                str(tmp_path / "results.sqlite"),
                "--bootstrap",
                "20",
                "--no-plots",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "headline proxy: macro" in out and "macro vs seq, in domain: ID (P1+P2)" in out
    assert (tmp_path / "report" / "report.md").is_file()
    with ResultStore(str(tmp_path / "results.sqlite")) as s:
        assert s.count() > 0
    from megablocks_ablate.errors import ConfigError

    with pytest.raises(ConfigError, match="no results store"):
        _study_cli(["study", "report", "--store", str(tmp_path / "none.sqlite")])


# ----------------------------------------------------------------------------- roles


def _r(points, keep):
    x = [p[3] for p in points if keep(p)]
    y = [p[4] for p in points if keep(p)]
    return float(np.corrcoef(x, y)[0, 1])


def test_headline_separates_in_and_out_of_domain(tmp_path):
    store, _, points = fill_roles_store(str(tmp_path / "r.sqlite"))
    summary = write_report(store, str(tmp_path / "rep"), n_boot=20, plots=False)
    store.close()
    ood, idp = _r(points, lambda p: p[2] == "ood"), _r(points, lambda p: p[2] == "id")
    every = _r(points, lambda p: True)
    assert every < min(ood, idp)
    # one unit per partition: merged heads the report, and says why
    assert summary.primary == "merged" and "same merge" in summary.primary_reason
    head = summary.headline()
    assert "headline proxy: merged: every partition is one unit" in head
    assert "merged vs seq, out of domain: per-domain mean Pearson" in head
    assert f"pooled Pearson {ood:.3f} [" in head and "(24 points, 6 mixtures)" in head
    assert f"ID pooled Pearson {idp:.3f} [" in head
    secondary = next(line for line in head.splitlines() if line.startswith("secondary"))
    assert (
        f"pooled over domains: Pearson {every:.3f}" in secondary and "different lines" in secondary
    )
    md = (tmp_path / "rep" / "report.md").read_text()
    headline = md.split("## Headline")[1].split("## Correlation")[0]
    assert "Headline proxy: **merged**" in headline
    assert (
        f"Pearson {every:.3f}" in headline and "reads lower than the per-role figures" in headline
    )
    # the table's rows: ID rows, domains (OOD), per-role summaries, role-blind last
    pearson = md.split("### Pearson")[1].split("###")[0]
    labels = [line.split(" | ")[0].strip("| ") for line in pearson.strip().splitlines()[2:]]
    assert labels == ["P1", "P2", "ID (P1+P2)", "q", "p", "s", "r", "x", "y"] + [
        "OOD mean",
        "OOD pooled",
        "ID pooled",
        "all-domain mean",
        "all-domain pooled",
    ]
    assert pearson.strip().startswith("| eval domain | ind_id | mean_ind | merged |")
    data = json.loads((tmp_path / "rep" / "summary.json").read_text())
    roles = data["roles"]["merged"]
    assert roles["ood"]["pooled"]["pearson"]["r"] == pytest.approx(ood, abs=1e-12)
    assert roles["id"]["pooled"]["pearson"]["r"] == pytest.approx(idp, abs=1e-12)
    assert roles["all"]["pooled"]["pearson"]["r"] == pytest.approx(every, abs=1e-12)
    assert roles["all"]["pooled"]["pearson"]["n"] == 36
    assert set(roles["ood"]) == {"mean", "pooled"} and {"row", "pooled"} <= set(roles["id"])
    assert roles["id"]["row"]["spearman"]["mixtures"] == 6
    assert data["pooled"]["merged"]["pearson"]["r"] == pytest.approx(every, abs=1e-12)
    assert list(data["per_domain"])[:3] == ["P1", "P2", "ID"] and data["id_label"] == "ID (P1+P2)"
    assert data["best_true_rank"]["merged"]["ood"]["n"] == 6


def test_macro_heads_when_a_partition_has_two_units(tmp_path):
    store, _, _ = fill_roles_store(str(tmp_path / "r.sqlite"), units={"r": 2})
    summary = write_report(store, str(tmp_path / "rep"), n_boot=0, plots=False)
    store.close()
    assert summary.primary == "macro" and "more than one unit" in summary.primary_reason
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Headline proxy: **macro**" in md and "## Rankings by macro" in md
    assert "| **macro** |" in md  # bold in the every-proxy table


def test_fixed_partition_report_and_median_rank(tmp_path):
    store, mixtures, _ = fill_roles_store(
        str(tmp_path / "f.sqlite"), order=("a", "b", "c", "z"), fixed="z"
    )
    summary = write_report(store, str(tmp_path / "rep"), n_boot=0, plots=False)
    table = an.build_table(store)
    store.close()
    md = (tmp_path / "rep" / "report.md").read_text()
    pearson = md.split("### Pearson")[1].split("###")[0]
    # z is in every mixture: in-domain always, so its OOD row is a dash
    z_row = next(line for line in pearson.splitlines() if line.startswith("| z |"))
    assert set(z_row.strip("| ").split(" | ")[1:]) == {"–"}
    assert "z, in every validation mixture, first" in md
    ranks = [an.best_true_rank(table, "merged", d, an.ROLE_OOD) for d in ("a", "b", "c", "x", "y")]
    assert summary.ranks["merged"]["ood"].median == float(np.median(ranks))
    assert summary.ranks["merged"]["ood"].max == max(ranks)
    assert "| **true rank, OOD domains** |" in md and summary.ranks["merged"]["ood"].fmt() in md
