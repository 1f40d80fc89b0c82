"""benchmarks/fidelity_design.py: the report's OOD figures recomputed on seq subsets."""

from __future__ import annotations

import json

import pytest
from study_fixtures import fill_roles_store, load_benchmark

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate import roles as rl
from megablocks_ablate.ablate.mixtures import SEQ


@pytest.fixture(scope="module")
def design():
    return load_benchmark("fidelity_design")


@pytest.fixture
def table(tmp_path):
    store, _, _ = fill_roles_store(str(tmp_path / "results.sqlite"), order=tuple("pqrstu"))
    with store:
        return an.build_table(store)


def test_full_figures_are_the_reports(design, table):
    """With every seq model the figures equal the report's role table (no bootstrap)."""
    roles = rl.role_table(table, n_boot=0)
    mean, pooled = design.ood_figures(table, "merged")
    assert mean == pytest.approx(roles.figures["ood"]["mean"]["merged"].r)
    assert pooled == pytest.approx(roles.figures["ood"]["pooled"]["merged"].r)


def test_restrict_keeps_only_the_drawn_seq_mixtures(design, table):
    keep = set(table.seq_mixtures[:5])
    sub = design.restrict(table, keep)
    assert set(sub.seq_mixtures) == keep
    assert sub.get("merged", "x") == table.get("merged", "x")  # proxies untouched
    assert len(table.seq_mixtures) == 15  # the original is not modified
    ids, _, _ = sub.paired("merged", "x", "ood")
    assert set(ids) == keep


def test_study_design_draws_subsets_and_the_full_set_once(design, table):
    out = design.study_design(table, [4, 15, 99], draws=25, seed=1)
    assert out["seq_models"] == 15 and out["proxy"] == "merged"
    assert set(out["by_n"]) == {4, 15}  # 99 > 15 seq models: skipped
    full = out["by_n"][15]["merged"]["mean"]
    assert full["mean"] == pytest.approx(out["full"]["merged"]["mean"]) and full["sd"] == 0.0
    small = out["by_n"][4]["merged"]["mean"]
    assert small["sd"] > 0.0 and 0.0 <= small["share_ge_target"] <= 1.0


def test_summarise_known_values(design):
    got = design.summarise([0.90, 0.95, 1.0, float("nan")])  # NaN: an undefined draw
    assert got["mean"] == pytest.approx(0.95) and got["sd"] == pytest.approx(0.05)
    assert got["p10"] == pytest.approx(0.91) and got["share_ge_target"] == pytest.approx(2 / 3)


def test_cli_prints_rows_and_writes_json(design, tmp_path, capsys):
    store, _, _ = fill_roles_store(str(tmp_path / "results.sqlite"), order=tuple("pqrs"))
    store.close()
    out = tmp_path / "d.json"
    assert design.main([f"s={tmp_path}", "--n", "3,6", "--draws", "5", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| s | merged | 3 |" in text and "| s | merged | 6 |" in text
    data = json.loads(out.read_text())
    assert data["benchmark"] == "fidelity_design" and "--draws 5" in data["command"]
    s = data["studies"]["s"]
    assert s["seq_models"] == 6 and SEQ not in s["full"]
    assert design.main([f"s={tmp_path / 'missing'}"]) == 2


def test_cli_refuses_to_overwrite_a_file_it_did_not_write(design, tmp_path, capsys):
    store, _, _ = fill_roles_store(str(tmp_path / "results.sqlite"), order=tuple("pqrs"))
    store.close()
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "figures"}\n')
    with pytest.raises(SystemExit, match="not overwriting it"):
        design.main([f"s={tmp_path}", "--n", "3", "--draws", "2", "--json", str(mine)])
    assert mine.read_text() == '{"my": "figures"}\n'
    assert capsys.readouterr().out == ""  # refused before any table was computed


def test_domains_filter(design, table):
    assert design.select_domains(table, "[xy]") == ["x", "y"]
    assert design.select_domains(table, None) == table.domains
    with pytest.raises(SystemExit, match="leave none"):
        design.select_domains(table, "zz*")
    assert design.select_domains(table, None, "x") == [d for d in table.domains if d != "x"]
    assert design.select_domains(table, "[xy]", "y") == ["x"]
    with pytest.raises(SystemExit, match="leave none"):
        design.select_domains(table, "x", "*")
    mean, pooled = design.ood_figures(table, "merged", ["x"])
    assert mean == pytest.approx(an.correlate(table, "merged", "x", role="ood", n_boot=0).r)
    assert pooled == pytest.approx(mean)  # one domain: pooled is that domain's coefficient
