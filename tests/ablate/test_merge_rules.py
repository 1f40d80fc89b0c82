"""benchmarks/merge_rules.py: merge rules other than the average, against seq."""

from __future__ import annotations

import json
import math

import pytest
import torch
from study_fixtures import load_benchmark


@pytest.fixture(scope="module")
def mr():
    return load_benchmark("merge_rules")


def _length(t: dict) -> float:
    return math.sqrt(sum(float(v.square().sum()) for v in t.values()))


def test_rules_against_their_definitions(mr):
    seed = {"a": torch.zeros(4), "b": torch.ones(2)}
    # two orthogonal displacements of length 2 and 4 (tensor a), parallel ones in b
    d1 = {"a": torch.tensor([2.0, 0, 0, 0]), "b": torch.tensor([1.0, 0])}
    d2 = {"a": torch.tensor([0, 4.0, 0, 0]), "b": torch.tensor([3.0, 0])}
    w = [0.5, 0.5]
    avg = mr.merge_rule(seed, [d1, d2], w, "average")
    assert torch.equal(avg["a"], torch.tensor([1.0, 2.0, 0, 0]))
    assert torch.equal(avg["b"], torch.tensor([3.0, 1.0]))

    tensor = mr.merge_rule(seed, [d1, d2], w, "norm-tensor")
    assert float(tensor["a"].norm()) == pytest.approx(3.0)  # mean length of 2 and 4
    assert torch.allclose(tensor["a"] / tensor["a"].norm(), avg["a"] / avg["a"].norm())
    assert torch.allclose(tensor["b"], avg["b"])  # parallel: the average keeps its length

    whole = mr.merge_rule(seed, [d1, d2], w, "norm")
    moved = {k: whole[k] - seed[k] for k in seed}
    target = 0.5 * _length(d1) + 0.5 * _length(d2)
    assert _length(moved) == pytest.approx(target)
    ratio = mr.displacement_ratio([d1, d2], w, per_tensor=False)
    assert len(set(ratio.values())) == 1 and ratio["a"] > 1.0

    # relnorm divides the factor by its mean over the mixtures: at the mean, the average
    same = mr.merge_rule(seed, [d1, d2], w, "relnorm", ratio_mean=ratio)
    assert all(torch.allclose(same[k], avg[k]) for k in seed)
    with pytest.raises(ValueError, match="needs the factor"):
        mr.merge_rule(seed, [d1, d2], w, "relnorm")
    with pytest.raises(ValueError, match="sum to"):
        mr.merge_rule(seed, [d1, d2], [0.5, 0.6], "average")
    with pytest.raises(ValueError, match="unknown rule"):
        mr.merge_rule(seed, [d1, d2], w, "ties")


def test_average_reproduces_the_studys_merged_rows(mr, base, tmp_path, capsys, monkeypatch):
    """End to end on the trained tiny study: the average rule re-merges the unit models
    from their files (hash-checked) and matches the stored merged rows; the norm rule
    moves further from the seed, so its scores differ."""
    spec, root, _ = base
    monkeypatch.chdir(tmp_path)  # paths come from the spec, the store and the lineage files
    out = tmp_path / "rules.json"
    args = ["--spec", str(root / "study.yaml"), "--seq", f"own={spec['out_dir']}"]
    assert mr.main([*args, "--rule", "average", "--rule", "norm", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| average | own |" in printed and "| norm | own |" in printed
    data = json.loads(out.read_text())
    assert data["benchmark"] == "merge_rules"
    assert data["check_average_vs_stored_log"] < 1e-4
    assert set(data["proxies"]) == {"merged (stored)", "average", "norm"}
    with pytest.raises(SystemExit, match="ALPHA"):
        mr.main([*args, "--blend", "1.5"])
