"""Hugging Face directories as merge inputs (merge/hf_inputs.py): inputs that cannot be
averaged tensor by tensor are refused in one line naming the directory and the tensor
or file, before anything is written; a spec mixing them with our checkpoints too."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from hf_fixtures import mergekit_config, write_hf_models
from safetensors.torch import load_file, save_file

from megablocks_ablate.cli import main


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, list[str]]:
    root = str(tmp_path_factory.mktemp("hfin"))
    return {
        "llama": write_hf_models(root, "llama", n=2),
        "cohere": write_hf_models(root, "cohere", n=1),
    }


def _copy(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


def _refused(capsys, tmp_path, models, *expected: str) -> None:
    cfg = mergekit_config(tmp_path / "mk.yaml", models, [1.0] * len(models))
    rc = main(["merge", "--spec", cfg, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("error: "), err
    for text in expected:
        assert text in err[-1], (text, err[-1])
    assert not (tmp_path / "out").exists()


def _edit_weights(path: str, fn) -> None:
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    fn(state)
    save_file(state, file, metadata={"format": "pt"})


def test_other_architecture_refused(hf, tmp_path, capsys):
    _refused(
        capsys,
        tmp_path,
        [hf["llama"][0], hf["cohere"][0]],
        f"{hf['cohere'][0]}: architecture CohereForCausalLM, {hf['llama'][0]} is LlamaForCausalLM",
    )


def test_unsupported_architecture_refused(hf, tmp_path, capsys):
    other = _copy(hf["llama"][1], tmp_path / "gpt2")
    cfg = json.load(open(os.path.join(other, "config.json")))
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    json.dump(cfg, open(os.path.join(other, "config.json"), "w"))
    _refused(
        capsys,
        tmp_path,
        [hf["llama"][0], other],
        "config.json: unsupported architecture 'GPT2LMHeadModel'",
        "CohereForCausalLM, LlamaForCausalLM, GPTNeoXForCausalLM",
    )


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: s.pop("model.norm.weight"), "missing tensor 'model.norm.weight'"),
        (lambda s: s.update(extra=s["model.norm.weight"].clone()), "unexpected tensor 'extra'"),
        (
            lambda s: s.update({"model.norm.weight": s["model.norm.weight"][:-1].clone()}),
            "tensor 'model.norm.weight' has shape [31]",
        ),
        (
            lambda s: s.update({"model.norm.weight": s["model.norm.weight"].long()}),
            "tensor 'model.norm.weight' (I64) differs",
        ),
    ],
    ids=["missing", "extra", "shape", "dtype"],
)
def test_tensor_mismatch_refused(hf, tmp_path, capsys, edit, expected):
    other = _copy(hf["llama"][1], tmp_path / "other")
    _edit_weights(other, edit)
    _refused(capsys, tmp_path, [hf["llama"][0], other], f"{other}: {expected}")


def test_different_tokenizer_refused(hf, tmp_path, capsys):
    other = _copy(hf["llama"][1], tmp_path / "other")
    with open(os.path.join(other, "tokenizer.json"), "a") as f:
        f.write(" ")
    _refused(
        capsys,
        tmp_path,
        [hf["llama"][0], other],
        f"{other}/tokenizer.json: differs from {hf['llama'][0]}/tokenizer.json",
    )


def test_missing_or_pickle_weights_refused(hf, tmp_path, capsys):
    other = _copy(hf["llama"][1], tmp_path / "other")
    os.rename(os.path.join(other, "model.safetensors"), os.path.join(other, "pytorch_model.bin"))
    _refused(capsys, tmp_path, [hf["llama"][0], other], f"{other}: only pickle weights")
    os.remove(os.path.join(other, "pytorch_model.bin"))
    _refused(capsys, tmp_path, [hf["llama"][0], other], f"{other}: no model.safetensors")


def test_shard_outside_the_directory_refused(hf, tmp_path, capsys):
    other = _copy(hf["llama"][1], tmp_path / "other")
    os.rename(os.path.join(other, "model.safetensors"), str(tmp_path / "elsewhere.safetensors"))
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    json.dump(index, open(os.path.join(other, "model.safetensors.index.json"), "w"))
    _refused(capsys, tmp_path, [hf["llama"][0], other], "climbs out with '..'")


def test_spec_mixing_hf_and_our_checkpoints_refused(hf, tmp_path, capsys):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from merge_fixtures import write_family

    _, units = write_family(str(tmp_path / "ours"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump({"checkpoints": {"a": hf["llama"][0], "b": units["cs_0"]}, "uniform": True})
    )
    rc = main(["merge", "--spec", str(spec), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"checkpoints.a ({hf['llama'][0]}) is a Hugging Face model directory" in err[0]
    assert "checkpoints.b" in err[0] and "import-hf" in err[0]
    assert not (tmp_path / "out").exists()


def test_exports_of_different_seeds_need_the_flag(hf, tmp_path, capsys):
    """Our exports record their seed in config.json: different seeds are refused as for
    our checkpoints (foreign models record none and are not checked)."""
    paths = []
    for i, seed in enumerate(("a" * 64, "b" * 64)):
        p = _copy(hf["llama"][i], tmp_path / f"export{i}")
        cfg = json.load(open(os.path.join(p, "config.json")))
        cfg["megablocks_ablate"] = {"lineage": {"kind": "unit", "seed_hash": seed}}
        json.dump(cfg, open(os.path.join(p, "config.json"), "w"))
        paths.append(p)
    _refused(capsys, tmp_path, paths, "do not all continue from the same seed")
    cfg = mergekit_config(tmp_path / "mk.yaml", paths, [1.0, 1.0])
    out = str(tmp_path / "out")
    assert main(["merge", "--spec", cfg, "--out", out, "--allow-different-seed"]) == 0
    merged = json.load(open(os.path.join(out, "config.json")))["megablocks_ablate"]["lineage"]
    assert merged["kind"] == "merged" and merged["seed_hash"] is None
    assert merged["weights"] == [0.5, 0.5] and len(merged["parents"]) == 2


def test_output_onto_a_users_directory_or_an_input_refused(hf, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    cfg = mergekit_config(tmp_path / "mk.yaml", hf["llama"], [1.0, 1.0])
    rc = main(["merge", "--spec", cfg, "--out", str(mine), "--overwrite"])
    assert rc == 2 and "files megablocks-ablate did not write" in capsys.readouterr().err
    rc = main(["merge", "--spec", cfg, "--out", hf["llama"][0], "--overwrite"])
    assert rc == 2 and "is the input" in capsys.readouterr().err
    assert sorted(os.listdir(mine)) == ["notes.txt"]
