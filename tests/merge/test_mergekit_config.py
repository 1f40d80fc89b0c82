"""mergekit linear configs given to `merge --spec` (merge/mergekit_config.py): what is
read, where relative paths lead, and every unsupported form refused in one line,
before anything is written."""

from __future__ import annotations

import os

import pytest
import yaml
from hf_fixtures import write_hf_models

from megablocks_ablate.cli import main
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.merge.mergekit_config import plan_from_mergekit


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    return write_hf_models(str(tmp_path_factory.mktemp("mk") / "models"), "llama", n=2)


def _entries(models, weights=(1.0, 1.0)):
    return [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights)]


def _refused(capsys, tmp_path, d: dict, *expected: str) -> None:
    cfg = tmp_path / "mk.yaml"
    cfg.write_text(yaml.safe_dump(d))
    rc = main(["merge", "--spec", str(cfg), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for text in expected:
        assert text in err[0], (text, err[0])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"merge_method": "ties"}, ["merge_method: 'ties' is not supported (only linear)"]),
        ({"slices": [{"sources": []}]}, ["slices: not supported"]),
        ({"base_model": "x"}, ["base_model: not supported"]),
        ({"tokenizer_source": "union"}, ["tokenizer_source: not supported"]),
        ({"chat_template": "chatml"}, ["chat_template: not supported"]),
        ({"name": "x"}, ["unknown key 'name'"]),
        ({"dtype": "float64"}, ["dtype: expected one of float32, bfloat16, float16", "float64"]),
        ({"out_dtype": "int8"}, ["out_dtype: expected one of"]),
        ({"parameters": {"normalize": "yes"}}, ["parameters.normalize: expected true or false"]),
        ({"parameters": {"density": 0.5}}, ["parameters.density: not a parameter"]),
        ({"models": []}, ["models: expected a non-empty list"]),
    ],
    ids=lambda x: str(x)[:40],
)
def test_unsupported_top_level_forms_are_refused(models, tmp_path, capsys, change, expected):
    d = {"merge_method": "linear", "models": _entries(models), **change}
    _refused(capsys, tmp_path, d, *expected)


@pytest.mark.parametrize(
    "entry, expected",
    [
        (
            {"parameters": {"weight": [0.1, 0.9]}},
            ["models[0].parameters.weight: per-tensor weights (gradients)"],
        ),
        (
            {"parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}},
            ["per-tensor weights (filter conditions)"],
        ),
        ({"parameters": {"weight": "heavy"}}, ["expected a number, got 'heavy'"]),
        ({"parameters": {"weight": float("nan")}}, ["weight must be finite"]),
        ({"parameters": {}}, ["models[0].parameters.weight: missing"]),
        ({"parameters": {"weight": 1.0, "density": 0.3}}, ["models[0].parameters.density"]),
        ({"lora": "x", "parameters": {"weight": 1.0}}, ["models[0].lora: not supported"]),
    ],
    ids=lambda x: str(x)[:40],
)
def test_unsupported_model_entries_are_refused(models, tmp_path, capsys, entry, expected):
    first = {"model": models[0], **entry}
    d = {"merge_method": "linear", "models": [first, *_entries(models[1:])]}
    _refused(capsys, tmp_path, d, *expected)


def test_model_paths_are_relative_to_the_config(models, tmp_path, capsys, monkeypatch):
    """Relative to the config's directory (mergekit: the working directory or the hub)."""
    base = os.path.dirname(models[0])
    cfg = os.path.join(base, "mk.yaml")
    rel = [os.path.basename(m) for m in models]
    with open(cfg, "w") as f:
        yaml.safe_dump({"merge_method": "linear", "models": _entries(rel, (1.0, 3.0))}, f)
    monkeypatch.chdir(tmp_path)  # elsewhere: the names mean nothing here
    plan = plan_from_mergekit(yaml.safe_load(open(cfg)), cfg)
    assert plan.paths == [os.path.join(base, r) for r in rel]
    assert plan.labels == rel and plan.applied_weights() == {rel[0]: 0.25, rel[1]: 0.75}
    d = {"merge_method": "linear", "models": _entries(["org/model", rel[1]])}
    _refused(capsys, tmp_path, d, "models[0].model: 'org/model' is not a directory", "hub names")


def test_defaults_and_numeric_strings(models, tmp_path):
    d = {
        "merge_method": "linear",
        "models": [{"model": models[0]}, {"model": models[1], "parameters": {"weight": "3e0"}}],
        "parameters": {"weight": 1.0, "normalize": False},
        "dtype": "torch.bfloat16",
    }
    plan = plan_from_mergekit(d, str(tmp_path / "x.yaml"))
    assert plan.given_weights == [1.0, 3.0] and plan.arithmetic.divisor is None
    assert plan.arithmetic.merge_dtype == "BF16" and plan.arithmetic.out_dtype is None
    plan = plan_from_mergekit(d, str(tmp_path / "x.yaml"), dtype="fp16")  # --dtype
    assert plan.arithmetic.out_dtype == "F16"


def test_weights_that_cannot_be_normalised(models, tmp_path):
    d = {"merge_method": "linear", "models": _entries(models, (1.0, -1.0))}
    with pytest.raises(ConfigError, match="the weights sum to 0.0 in fp32; cannot normalize"):
        plan_from_mergekit(d, str(tmp_path / "x.yaml"))
    d["parameters"] = {"normalize": False}  # task arithmetic: allowed, as in mergekit
    assert plan_from_mergekit(d, str(tmp_path / "x.yaml")).applied_weights() == {
        models[0]: 1.0,
        models[1]: -1.0,
    }


def test_our_checkpoint_in_a_mergekit_config_is_refused(models, tmp_path, capsys):
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "lineage.json").write_text("{}")
    (ours / "config.json").write_text("{}")
    d = {"merge_method": "linear", "models": _entries([models[0], str(ours)])}
    _refused(capsys, tmp_path, d, f"models[1].model: {ours} is a megablocks-ablate checkpoint")
