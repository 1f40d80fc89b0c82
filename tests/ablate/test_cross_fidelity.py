"""benchmarks/cross_fidelity.py: every arm's proxy against every arm's seq reference."""

from __future__ import annotations

import json
import math

import pytest
from study_fixtures import fill_roles_store, load_benchmark

from megablocks_ablate.ablate import decisions as dc
from megablocks_ablate.ablate import roles as rl
from megablocks_ablate.ablate.analysis import SEQ
from megablocks_ablate.ablate.store import read_study_table, store_path


@pytest.fixture(scope="module")
def cf():
    return load_benchmark("cross_fidelity")


@pytest.fixture
def studies(tmp_path):
    """Two studies of one design (same mixtures and domains), other noise draws."""
    dirs = {}
    for name, seed in (("a", 3), ("b", 5)):
        d = tmp_path / name
        d.mkdir()
        store, _, _ = fill_roles_store(store_path(str(d)), seed=seed)
        store.close()
        dirs[name] = str(d)
    return dirs


def test_crossed_takes_proxy_from_one_and_seq_from_the_other(cf, studies):
    a, b = read_study_table(studies["a"]), read_study_table(studies["b"])
    t = cf.crossed(a, b, "merged")
    assert t.values["merged"] == a.values["merged"] and t.values[SEQ] == b.values[SEQ]
    same = cf.figures(cf.crossed(a, a, "merged"), "merged", n_boot=0)
    want = rl.role_table(a, "pearson", proxies=["merged"], n_boot=0)
    assert same["ood_mean"]["r"] == pytest.approx(want.figure("merged", "ood", "mean").r)
    row = dc.summary_row(a, ["merged"], n_boot=0)
    assert same["summary"]["r"] == pytest.approx(row.get("merged").r)
    per = [r for r in same["per_domain"].values() if r is not None]
    assert same["ood_mean"]["r"] == pytest.approx(sum(per) / len(per))
    other = cf.figures(t, "merged", n_boot=0)
    assert other["summary"]["r"] != pytest.approx(same["summary"]["r"])


def test_a_reference_against_itself_is_the_ceiling(cf, studies):
    a = read_study_table(studies["a"])
    f = cf.figures(cf.retrained(a, a), cf.RETRAINED, n_boot=0)
    assert f["ood_mean"]["r"] == pytest.approx(1.0) and f["summary"]["r"] == pytest.approx(1.0)
    assert f["share_top2"] == 1.0 and f["mean_regret"] == 0.0


def test_cli_prints_the_grid_and_writes_json(cf, studies, tmp_path, capsys):
    out = tmp_path / "x.json"
    args = ["--units", f"A={studies['a']}", "--units", f"B={studies['b']}"]
    args += ["--seq", f"A={studies['a']}", "--retrained", f"A={studies['a']}"]
    assert cf.main([*args, "--n-boot", "50", "--json", str(out), "--per-domain"]) == 0
    printed = capsys.readouterr().out
    assert "| A | A |" in printed and "| B | A |" in printed and "noise ceiling" in printed
    assert "| domain | A / A | B / A | ceiling / A |" in printed
    data = json.loads(out.read_text())
    assert data["benchmark"] == "cross_fidelity" and set(data["cells"]) == {"A", "B"}
    assert data["ceilings"]["A"]["attenuation_ceiling"] == pytest.approx(1.0)
    with pytest.raises(SystemExit, match="no --seq study"):
        cf.main([*args, "--retrained", f"Z={studies['b']}"])
    with pytest.raises(SystemExit, match="NAME=STUDY_DIR"):
        cf.main(["--units", "oops", "--seq", f"A={studies['a']}"])


def test_an_ensemble_is_the_geometric_mean_of_its_members(cf, studies, tmp_path, capsys):
    a, b = read_study_table(studies["a"]), read_study_table(studies["b"])
    ens = cf.ensemble([a, b], "merged")
    for d, by_m in ens.values["merged"].items():
        for m, v in by_m.items():
            want = (a.values["merged"][d][m] * b.values["merged"][d][m]) ** 0.5
            assert v == pytest.approx(want)
    assert ens.values[SEQ] == a.values[SEQ]  # only the proxy changes
    same = cf.ensemble([a, a], "merged")
    assert same.values["merged"]["p"] == pytest.approx(a.values["merged"]["p"])
    out = tmp_path / "e.json"
    args = ["--units", f"E={studies['a']}+{studies['b']}", "--seq", f"B={studies['b']}"]
    assert cf.main([*args, "--n-boot", "0", "--json", str(out)]) == 0
    got = json.loads(out.read_text())["cells"]["E"]["B"]
    want = cf.figures(cf.crossed(ens, b, "merged"), "merged", n_boot=0)
    assert got["ood_mean"]["r"] == pytest.approx(want["ood_mean"]["r"])
    # a seq reference of that form averages the seq models' perplexities
    args = ["--units", f"A={studies['a']}", "--seq", f"M={studies['a']}+{studies['b']}"]
    assert cf.main([*args, "--n-boot", "0", "--json", str(out)]) == 0
    got = json.loads(out.read_text())["cells"]["A"]["M"]
    want = cf.figures(cf.crossed(a, cf.ensemble([a, b], SEQ), "merged"), "merged", n_boot=0)
    assert got["ood_mean"]["r"] == pytest.approx(want["ood_mean"]["r"])
    with pytest.raises(SystemExit, match="no 'nope' scores"):
        cf.ensemble([a, b], "nope")


def test_a_name_may_be_a_units_and_a_seq_study_of_other_directories(cf, studies, capsys):
    """--units X=a --seq X=b: X's proxy comes from a, its seq models from b."""
    a, b = read_study_table(studies["a"]), read_study_table(studies["b"])
    assert (
        cf.main(["--units", f"X={studies['a']}", "--seq", f"X={studies['b']}", "--n-boot", "0"])
        == 0
    )
    want = cf.figures(cf.crossed(a, b, "merged"), "merged", n_boot=0)
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| X | X |")]
    assert row and f"{want['ood_mean']['r']:.3f}" in row[0]


def _flat(values: dict) -> dict:
    return {(d, m): v for d, by_m in values.items() for m, v in by_m.items()}


def test_blend_is_a_geometric_mix_of_merged_and_mean_ind(cf, studies, tmp_path):
    t = read_study_table(studies["a"])
    merged, mean_ind = _flat(t.values["merged"]), _flat(t.values["mean_ind"])
    assert _flat(cf.blend(t, 1.0).values["merged"]) == pytest.approx(merged)
    assert _flat(cf.blend(t, 0.0).values["merged"]) == pytest.approx(
        {k: mean_ind[k] for k in merged}
    )
    half = cf.blend(t, 0.5).values["merged"]
    d, m = "p", next(iter(half["p"]))
    assert half[d][m] == pytest.approx(
        math.sqrt(t.values["merged"][d][m] * t.values["mean_ind"][d][m])
    )
    assert cf.blend(t, 0.5).values[SEQ] == t.values[SEQ]
    out = tmp_path / "b.json"
    args = ["--units", f"A={studies['a']}", "--seq", f"B={studies['b']}", "--n-boot", "0"]
    assert cf.main([*args, "--blend", "0.5", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    want = cf.figures(
        cf.crossed(cf.blend(t, 0.5), read_study_table(studies["b"]), "merged"), "merged", 0
    )
    assert got["blend"] == 0.5 and got["cells"]["A"]["B"]["ood_mean"]["r"] == pytest.approx(
        want["ood_mean"]["r"]
    )
    with pytest.raises(SystemExit, match="ALPHA"):
        cf.main([*args, "--blend", "2"])


def test_fit_blend_fits_on_one_half_and_judges_on_the_other(cf, tmp_path, capsys):
    from megablocks_ablate.ablate.report_scaled import held_out_table

    studies = {}
    for name, seed in (("a", 3), ("b", 5)):  # 7 partitions: 21 pairs, ~10 per half
        (tmp_path / name).mkdir()
        store, _, _ = fill_roles_store(
            store_path(str(tmp_path / name)), order=tuple("pqrstuv"), seed=seed
        )
        store.close()
        studies[name] = str(tmp_path / name)
    a, b = read_study_table(studies["a"]), read_study_table(studies["b"])
    fb = cf.fit_blend(a, b, "merged")
    assert fb["alpha"] in cf.BLEND_GRID and set(fb["grid"]) == {str(x) for x in cf.BLEND_GRID}
    fit, held = fb["fit_mixtures"], fb["held_out_mixtures"]
    assert not set(fit) & set(held) and sorted(fit + held) == sorted(b.seq_mixtures)
    t = cf.crossed(a, b, "merged")
    want = cf.figures(held_out_table(t, held), "merged", n_boot=0)
    assert fb["held_out"]["merged"]["ood_mean"]["r"] == pytest.approx(want["ood_mean"]["r"])
    blended = cf.crossed(cf.blend(a, fb["alpha"]), b, "merged")
    best = cf.figures(held_out_table(blended, fit), "merged", n_boot=0)
    assert best["ood_mean"]["r"] is not None and best["summary"]["r"] is not None
    score = (best["ood_mean"]["r"] + best["summary"]["r"]) / 2
    assert score == pytest.approx(max(fb["grid"].values()))
    args = ["--units", f"A={studies['a']}", "--seq", f"B={studies['b']}", "--n-boot", "0"]
    assert cf.main([*args, "--fit-blend"]) == 0
    assert "| A (held-out half) | B |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give one"):
        cf.main([*args, "--fit-blend", "--blend", "0.9"])


def test_a_blended_ensemble_blends_with_its_members_units(cf, studies):
    """An ensemble averages mean_ind as well, so blending the ensemble (what
    --fit-blend does) equals the ensemble of the blended members."""
    a, b = read_study_table(studies["a"]), read_study_table(studies["b"])
    ens = cf.ensemble([a, b], "merged")
    got = _flat(cf.blend(ens, 0.7).values["merged"])
    want = _flat(cf.ensemble([cf.blend(a, 0.7), cf.blend(b, 0.7)], "merged").values["merged"])
    assert got == pytest.approx(want)
    mean_ind = _flat(ens.values["mean_ind"])
    a_ind, b_ind = _flat(a.values["mean_ind"]), _flat(b.values["mean_ind"])
    assert mean_ind == pytest.approx({k: math.sqrt(a_ind[k] * b_ind[k]) for k in mean_ind})
