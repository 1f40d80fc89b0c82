"""The report: files, numbers equal to a recomputation from the store (ablate/report.py)."""

from __future__ import annotations

import csv
import json

import pytest
from study_fixtures import fill_store

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
        "## Rankings by merged",
        "## Cost",
        "Recommended mixture",
    ):
        assert section in md
    head = summary.headline()
    assert "merged vs seq, pooled over domains: Pearson" in head and "report.md" in head
    assert json.loads((out / "summary.json").read_text())["primary"] == "merged"


def test_numbers_equal_a_recomputation_from_the_store(report):
    summary, store, out = report
    table = an.build_table(store)
    pooled = an.pooled_correlation(table, "merged", "pearson", n_boot=40, seed=1)
    assert summary.pooled["merged"]["pearson"] == pooled
    with open(out / "correlations.csv") as f:
        rows = {(r["method"], r["row"], r["proxy"]): r for r in csv.DictReader(f)}
    for d in table.domains:
        _, p, s = table.paired("macro", d)
        assert float(rows["spearman", d, "macro"]["r"]) == pytest.approx(an.spearman(p, s))
    with open(out / "results.csv") as f:
        raw = list(csv.DictReader(f))
    assert len(raw) == store.count() + store.count("unit_results")
    with open(out / "rankings.csv") as f:
        ranks = [r for r in csv.DictReader(f) if r["domain"] == "wiki"]
    assert [r["mixture_id"] for r in ranks] == [
        m for m, _ in an.rank_mixtures(table, "merged", "wiki")
    ]
    assert summary.recommended[0] == an.recommend(table, "merged")[0]


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
    assert "merged vs seq, pooled over domains: Pearson" in out
    assert (tmp_path / "report" / "report.md").is_file()
    with ResultStore(str(tmp_path / "results.sqlite")) as s:
        assert s.count() > 0
    from megablocks_ablate.errors import ConfigError

    with pytest.raises(ConfigError, match="no results store"):
        _study_cli(["study", "report", "--store", str(tmp_path / "none.sqlite")])
