"""benchmarks/fisher_variants.py: variants of the Fisher merge scored on a copy of a
finished study (RegMean's rule, input Grams, and the copy leaving the study untouched)."""

from __future__ import annotations

import sqlite3

import pytest
import torch
import yaml
from study_fixtures import load_benchmark


@pytest.fixture(scope="module")
def fv():
    return load_benchmark("fisher_variants")


class _Toy(torch.nn.Module):
    """Embedding then one Linear; ``model(inputs, labels)`` returns a loss, as the
    package's models do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(11, 4)
        self.proj = torch.nn.Linear(4, 11, bias=False)

    def forward(self, inputs, labels):
        logits = self.proj(self.embed(inputs))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def test_input_grams_are_the_mean_outer_product_of_each_linears_inputs(fv):
    model = _Toy()
    seqs = [
        torch.randint(0, 11, (6,), generator=torch.Generator().manual_seed(i)) for i in range(5)
    ]
    grams = fv.input_grams(model, iter(seqs), batch=2)  # batches of 2, 2 and 1
    assert set(grams) == {"proj.weight"}
    x = model.embed(torch.stack(seqs)[:, :-1]).reshape(-1, 4).detach()
    assert torch.allclose(grams["proj.weight"], x.T @ x / x.shape[0], atol=1e-6)


def test_regmean_solves_its_normal_equations_and_reduces_to_the_average(fv):
    g = torch.Generator().manual_seed(1)
    seed = {"w": torch.randn(3, 4, generator=g)}
    deltas = [{"w": torch.randn(3, 4, generator=g)} for _ in range(2)]
    grams = []
    for _ in range(2):
        x = torch.randn(20, 4, generator=g)
        grams.append({"w": x.T @ x / 20})
    w = [0.3, 0.7]
    merged = fv.regmean_merge(seed, deltas, grams, w, alpha=1.0)["w"]
    # sum_u w_u (W - W_u) A_u = 0 at the minimiser (up to the 1e-6 ridge)
    residual = sum(
        wu * (merged - seed["w"] - d["w"]) @ a["w"] for wu, d, a in zip(w, deltas, grams)
    )
    assert float(residual.abs().max()) < 1e-4
    same = [{"w": grams[0]["w"]}, {"w": grams[0]["w"]}]  # equal Grams: the weighted average
    avg = seed["w"] + 0.3 * deltas[0]["w"] + 0.7 * deltas[1]["w"]
    assert torch.allclose(fv.regmean_merge(seed, deltas, same, w, alpha=1.0)["w"], avg, atol=1e-5)
    # alpha 0 keeps only the diagonal: each input column averaged by its own activity
    diag = fv.regmean_merge(seed, deltas, grams, w, alpha=0.0)["w"]
    a = [torch.diag(gr["w"]) for gr in grams]
    by_column = seed["w"] + (0.3 * deltas[0]["w"] * a[0] + 0.7 * deltas[1]["w"] * a[1]) / (
        0.3 * a[0] + 0.7 * a[1]
    )
    assert torch.allclose(diag, by_column, atol=1e-5)


def _rows(path, proxy=None):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        q = "select mixture_id, proxy, domain, nll_sum from results"
        rows = con.execute(q + (" where proxy = ?" if proxy else ""), (proxy,) if proxy else ())
        return sorted(rows.fetchall())
    finally:
        con.close()


@pytest.mark.integration
def test_a_variant_scores_a_copy_and_leaves_the_study_alone(fv, base, monkeypatch):
    """On the trained tiny study: the scaled variant at lambda 1 scores what the package's
    own fisher proxy scores, the copy keeps the study's seq and merged rows, the study's own store is
    unchanged, the fisher runner is restored, and an existing --out is refused."""
    import megablocks_ablate.ablate.runner.fisher as runner_fisher

    spec, root, runner = base
    monkeypatch.chdir(root)
    store = root / spec["out_dir"] / "results.sqlite"
    before = _rows(store)
    merge_before = runner_fisher.fisher_merge
    argv = ["scaled", str(root / "study.yaml"), "--registry", spec["out_dir"]]
    assert fv.main([*argv, "--out", "v_one", "--lam", "1"]) == 0
    assert fv.main([*argv, "--out", "v_half", "--lam", "0.5"]) == 0
    assert runner_fisher.fisher_merge is merge_before
    assert _rows(store) == before  # the study itself is only read
    one, half = root / "v_one" / "results.sqlite", root / "v_half" / "results.sqlite"
    assert _rows(one, "merged") == _rows(store, "merged") and _rows(one, "seq") == _rows(
        store, "seq"
    )
    fisher_one, fisher_half = _rows(one, "fisher"), _rows(half, "fisher")
    mixtures = {m.id for m in runner.study.mixtures}
    assert {r[0] for r in fisher_one} == mixtures
    assert [r[:3] for r in fisher_one] == [r[:3] for r in fisher_half]
    assert all(a[3] != b[3] for a, b in zip(fisher_one, fisher_half))  # half-way: other scores
    with pytest.raises(SystemExit, match="exists"):
        fv.main([*argv, "--out", "v_one"])
    # a user's file named like the spec it would write: refused, untouched, nothing made
    (root / "v_mine.yaml").write_text("mine\n")
    with pytest.raises(SystemExit, match="v_mine.yaml exists"):
        fv.main([*argv, "--out", "v_mine"])
    assert (root / "v_mine.yaml").read_text() == "mine\n" and not (root / "v_mine").exists()
    # the Fisher along the path (seed and unit ends): other weights, so other scores,
    # and the seed's Fishers cached beside the copy, not in the study's run directories
    path_argv = ["path", str(root / "study.yaml"), "--registry", spec["out_dir"]]
    assert fv.main([*path_argv, "--out", "v_path"]) == 0
    fisher_path_rows = _rows(root / "v_path" / "results.sqlite", "fisher")
    assert [r[:3] for r in fisher_path_rows] == [r[:3] for r in fisher_one]
    assert any(a[3] != b[3] for a, b in zip(fisher_path_rows, fisher_one))
    assert list((root / "v_path" / "variant-cache").glob("seed-fisher-*.safetensors"))
    assert _rows(store) == before
    # relnorm (the package's fisher.stretch): at gamma 0 the Fisher merge itself; at
    # gamma 1 other scores
    rel_argv = ["relnorm", str(root / "study.yaml"), "--registry", spec["out_dir"]]
    assert fv.main([*rel_argv, "--out", "v_rel0", "--gamma", "0"]) == 0
    assert fv.main([*rel_argv, "--out", "v_rel1", "--gamma", "1"]) == 0
    rel0 = _rows(root / "v_rel0" / "results.sqlite", "fisher")
    rel1 = _rows(root / "v_rel1" / "results.sqlite", "fisher")
    assert all(a[3] == pytest.approx(b[3], rel=1e-6) for a, b in zip(rel0, fisher_one))
    assert any(a[3] != pytest.approx(b[3], rel=1e-6) for a, b in zip(rel1, fisher_one))
    # the package's own fisher proxy (no variant installed) on the same study
    from megablocks_ablate.cli import main as cli_main

    pkg = yaml.safe_load((root / "v_one.yaml").read_text())
    pkg["out_dir"] = "v_pkg"
    (root / "v_pkg.yaml").write_text(yaml.safe_dump(pkg, sort_keys=False))
    assert cli_main(["study", "run", str(root / "v_pkg.yaml"), "--registry", spec["out_dir"]]) == 0
    package_rows = _rows(root / "v_pkg" / "results.sqlite", "fisher")
    assert [r[:3] for r in package_rows] == [r[:3] for r in fisher_one]
    assert all(a[3] == pytest.approx(b[3], rel=1e-6) for a, b in zip(package_rows, fisher_one))
    # every variant's spec turns the package's stretch off, but relnorm's sets it to gamma
    assert pkg["fisher"]["stretch"] == 0.0
    assert yaml.safe_load((root / "v_rel1.yaml").read_text())["fisher"]["stretch"] == 1.0


def test_agree_adds_aligned_moves_and_keeps_the_fisher_merge_elsewhere(fv):
    from megablocks_ablate.merge.fisher import fisher_merge

    seed = {"w": torch.zeros(4)}
    deltas = [{"w": torch.tensor([1.0, 1.0, 1.0, -1.0])}, {"w": torch.tensor([2.0, 3.0, 0.0, 1.0])}]
    fishers = [{"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}, {"w": torch.tensor([1.0, 1e6, 1.0, 1.0])}]
    w, eps = [0.5, 0.5], 1e-9
    merged = fisher_merge(seed, deltas, fishers, w, eps)
    out = fv.agree_merge(seed, deltas, fishers, w, eps, 1.0, merged)["w"]
    assert out[0] == pytest.approx(3.0)  # same sign, equal curvature: the two moves added
    assert out[1] == pytest.approx(3.0, rel=1e-5)  # one unit dominates: about its own move
    assert out[2] == merged["w"][2] and out[3] == merged["w"][3]  # a zero or opposite move
