"""Merge specs reduce to one weight vector: uniform, weights, by_tokens, macro, micro, trees."""

from __future__ import annotations

import pytest

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.merge.spec import MergeSpec, macro_weights, micro_weights

CKPTS = {
    "cs_0": "p/cs_0",
    "cs_1": "p/cs_1",
    "cs_2": "p/cs_2",
    "bio_0": "p/bio_0",
    "bio_1": "p/bio_1",
}


def spec(**kw) -> MergeSpec:
    return MergeSpec.from_dict({"checkpoints": CKPTS, **kw}, source="m.yaml")


def approx(d):
    return pytest.approx({u: d.get(u, 0.0) for u in CKPTS})


def test_macro_is_one_over_G_times_one_over_size():
    w = spec(macro={"cs": ["cs_0", "cs_1", "cs_2"], "bio": ["bio_0", "bio_1"]}).weights()
    assert w == approx(
        {"cs_0": 1 / 6, "cs_1": 1 / 6, "cs_2": 1 / 6, "bio_0": 1 / 4, "bio_1": 1 / 4}
    )
    assert list(w) == list(CKPTS)
    assert macro_weights(
        {"cs": ["cs_0", "cs_1", "cs_2"], "bio": ["bio_0", "bio_1"]}
    ) == pytest.approx(
        {"cs_0": 1 / 6, "cs_1": 1 / 6, "cs_2": 1 / 6, "bio_0": 1 / 4, "bio_1": 1 / 4}
    )


def test_macro_equals_merge_of_partition_merges():
    """Averaging unit models inside each partition, then the partition models, is the
    same weight vector as the macro spec (merging is linear)."""
    cs = spec(uniform=["cs_0", "cs_1", "cs_2"]).weights()
    bio = spec(uniform=["bio_0", "bio_1"]).weights()
    merge_of_merges = {u: 0.5 * cs[u] + 0.5 * bio[u] for u in CKPTS}
    macro = spec(macro={"cs": ["cs_0", "cs_1", "cs_2"], "bio": ["bio_0", "bio_1"]}).weights()
    assert macro == pytest.approx(merge_of_merges)


def test_micro_and_uniform():
    assert spec(micro=True).weights() == approx({u: 0.2 for u in CKPTS})
    assert spec(uniform=True).weights() == approx({u: 0.2 for u in CKPTS})
    # micro flattens partitions: uniform over the units, not over the groups
    tree = {"micro": [{"macro": {"cs": ["cs_0", "cs_1", "cs_2"]}}, "bio_0"]}
    assert spec(tree=tree).weights() == approx(
        {"cs_0": 0.25, "cs_1": 0.25, "cs_2": 0.25, "bio_0": 0.25}
    )
    assert micro_weights(["a", "b"]) == {"a": 0.5, "b": 0.5}


def test_explicit_weights_normalised_or_not():
    assert spec(weights={"cs_0": 3, "bio_0": 1}).weights() == approx({"cs_0": 0.75, "bio_0": 0.25})
    raw = spec(weights={"cs_0": 3, "bio_0": 1}, normalize=False).weights()
    assert raw == approx({"cs_0": 3.0, "bio_0": 1.0})


def test_by_tokens_from_lineage_or_explicit():
    s = spec(by_tokens=["cs_0", "bio_0"])
    assert s.needs_tokens()
    assert s.weights({"cs_0": 300, "bio_0": 100}) == approx({"cs_0": 0.75, "bio_0": 0.25})
    with pytest.raises(ConfigError, match="token counts"):
        s.weights()
    assert spec(by_tokens={"cs_0": 1, "cs_1": 3}).weights() == approx({"cs_0": 0.25, "cs_1": 0.75})


def test_nested_tree():
    tree = {
        "weights": [
            {"node": {"macro": {"cs": ["cs_0", "cs_1"], "bio": ["bio_0"]}}, "weight": 2},
            {"node": {"uniform": ["cs_2", "bio_1"]}, "weight": 2},
        ]
    }
    w = spec(tree=tree).weights()
    assert w == approx({"cs_0": 0.125, "cs_1": 0.125, "bio_0": 0.25, "cs_2": 0.25, "bio_1": 0.25})
    assert sum(w.values()) == pytest.approx(1.0)


def test_repeated_unit_accumulates():
    w = spec(macro={"a": ["cs_0"], "b": ["cs_0", "cs_1"]}).weights()
    assert w == approx({"cs_0": 0.75, "cs_1": 0.25})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"weights": {"cs_0": float("nan")}}, r"weights\.cs_0: weight must be finite"),
        ({"weights": {"cs_0": float("inf"), "cs_1": 1}}, r"weights\.cs_0"),
        ({"weights": {"cs_0": 0, "cs_1": 0}}, "sum to 0"),
        ({"weights": {"cs_0": 0, "cs_1": 0}, "normalize": False}, "all weights are zero"),
        ({"weights": {"cs_0": -1, "cs_1": 2}}, r"weights\.cs_0: negative weight"),
        ({"weights": {"cs_0": 1, "cs_1": -1}, "allow_negative": True}, "cannot normalise"),
        ({"weights": {"cs_0": "x"}}, "expected a number"),
        ({"macro": {"cs": ["cs_0", "cs_9"]}}, r"macro\.cs\[1\]: unknown unit 'cs_9'"),
        ({"macro": {"cs": []}}, r"macro\.cs: expected a non-empty list"),
        ({"tree": {"mean": ["cs_0"]}}, "unknown mixture kind 'mean'"),
        ({"uniform": True, "micro": True}, "exactly one of"),
        ({}, "exactly one of"),
        ({"uniform": True, "normalise": True}, "unknown key"),
        ({"uniform": True, "dtype": "int8"}, "dtype"),
    ],
)
def test_bad_specs_name_the_entry(kw, match):
    with pytest.raises(ConfigError, match=match):
        spec(**kw)


def test_negative_allowed_with_flag():
    w = spec(weights={"cs_0": 2, "cs_1": -1}, allow_negative=True).weights()
    assert w == approx({"cs_0": 2.0, "cs_1": -1.0})


def test_load_resolves_paths_relative_to_file(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("checkpoints:\n  a: pool/a\n  b: /abs/b\nuniform: true\n")
    s = MergeSpec.load(str(p))
    assert s.checkpoints == {"a": str(tmp_path / "pool" / "a"), "b": "/abs/b"}
    p.write_text("checkpoints: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        MergeSpec.load(str(p))
    with pytest.raises(ConfigError, match="cannot read"):
        MergeSpec.load(str(tmp_path / "missing.yaml"))
