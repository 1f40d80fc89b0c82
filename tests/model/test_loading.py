"""A checkpoint whose config.json does not describe its weights (a config edited, or
copied from another model) is refused naming the tensor and both shapes, by every
reader that builds the model from the config (eval's load_model, export-hf), instead
of failing deep inside loading with a traceback."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megablocks_ablate.checkpoint import Lineage, save_model_checkpoint
from megablocks_ablate.cli import main
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.model import ModelConfig
from megablocks_ablate.model.loading import load_model


@pytest.fixture
def ckpt(tmp_path) -> str:
    torch.manual_seed(0)
    model = ModelConfig.from_preset("tiny").build()
    path = str(tmp_path / "ckpt")
    save_model_checkpoint(path, model.state_dict(), model.cfg.to_dict(), Lineage(kind="seed"))
    return path


def _edit_config(path: str, **changes) -> None:
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)


def test_matching_config_loads(ckpt):
    model, lineage = load_model(ckpt)
    assert (
        lineage.kind == "seed"
        and model.cfg.mlp_hidden == ModelConfig.from_preset("tiny").mlp_hidden
    )


def test_wrong_width_is_refused_naming_the_tensor_and_shapes(ckpt):
    hidden = ModelConfig.from_preset("tiny").mlp_hidden
    _edit_config(ckpt, mlp_hidden=hidden // 2)
    with pytest.raises(
        DataFormatError, match=r"model\.safetensors: tensor 'layers\.0\.\S+' has shape"
    ):
        load_model(ckpt)


def test_missing_layer_is_refused(ckpt):
    n = ModelConfig.from_preset("tiny").n_layers
    _edit_config(ckpt, n_layers=n + 1)
    with pytest.raises(DataFormatError, match=rf"no tensor 'layers\.{n}\."):
        load_model(ckpt)


def test_export_hf_refuses_in_one_line_and_writes_nothing(ckpt, tmp_path, capsys):
    hidden = ModelConfig.from_preset("tiny").mlp_hidden
    _edit_config(ckpt, mlp_hidden=hidden // 2)
    out = tmp_path / "hf"
    assert main(["export-hf", ckpt, str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "config.json describes" in err[0]
    assert not out.exists()
