"""import-hf's weight files: shards confined to the model directory, NaN/inf refused."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megablocks_ablate.checkpoint import Lineage, load_model_checkpoint, save_model_checkpoint
from megablocks_ablate.cli import main
from megablocks_ablate.errors import DataFormatError, NonFiniteError
from megablocks_ablate.model import ModelConfig
from megablocks_ablate.model.hf import export_hf, import_hf
from megablocks_ablate.model.hf_files import INDEX_FILE, SINGLE_FILE, read_hf_weights

NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture
def hf_dir(tmp_path) -> str:
    """A tiny Cohere model exported as a Hugging Face directory (one model.safetensors)."""
    torch.manual_seed(0)
    model = ModelConfig.from_preset("tiny").build()
    ckpt = str(tmp_path / "ckpt")
    save_model_checkpoint(ckpt, model.state_dict(), model.cfg.to_dict(), Lineage(kind="seed"))
    out = str(tmp_path / "hf")
    export_hf(ckpt, out)
    return out


def _shard(hf_dir: str, names=("shard-1.safetensors", "shard-2.safetensors")) -> dict:
    """Split the single file into two shards and an index; returns the weight_map."""
    tensors = load_file(os.path.join(hf_dir, SINGLE_FILE))
    keys = sorted(tensors)
    half = len(keys) // 2
    weight_map = {}
    for shard, part in zip(names, (keys[:half], keys[half:]), strict=True):
        save_file({k: tensors[k] for k in part}, os.path.join(hf_dir, shard))
        weight_map.update({k: shard for k in part})
    os.remove(os.path.join(hf_dir, SINGLE_FILE))
    _write_index(hf_dir, weight_map)
    return weight_map


def _write_index(hf_dir: str, weight_map: dict) -> str:
    path = os.path.join(hf_dir, INDEX_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def _error(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_sharded_directory_reads_like_the_single_file(hf_dir, tmp_path):
    single = read_hf_weights(hf_dir)
    _shard(hf_dir)
    sharded = read_hf_weights(hf_dir)
    assert sorted(sharded) == sorted(single)
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    import_hf(hf_dir, str(tmp_path / "imported"))
    state, _, _ = load_model_checkpoint(str(tmp_path / "imported"))
    assert "embed.weight" in state


def test_import_refuses_a_nan_tensor_naming_it(hf_dir, tmp_path, capsys):
    path = os.path.join(hf_dir, SINGLE_FILE)
    tensors = load_file(path)
    assert NAN_TENSOR in tensors
    tensors[NAN_TENSOR][0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    save_file(tensors, path, metadata={"format": "pt"})
    out = str(tmp_path / "imported")
    with pytest.raises(NonFiniteError) as e:
        import_hf(hf_dir, out)
    assert str(e.value) == (
        f"{path}: tensor {NAN_TENSOR!r} has 3 non-finite values (NaN/inf); refusing to "
        "import a model with NaN/inf weights (a diverged or damaged model)"
    )
    assert main(["import-hf", hf_dir, out]) == 2
    assert _error(capsys).startswith(f"error: {path}: tensor {NAN_TENSOR!r} has 3 non-finite")
    assert not os.path.exists(out)


def test_import_refuses_a_nan_tensor_in_a_shard(hf_dir, tmp_path):
    weight_map = _shard(hf_dir)
    shard = os.path.join(hf_dir, weight_map[NAN_TENSOR])
    tensors = load_file(shard)
    tensors[NAN_TENSOR].view(-1)[5] = float("nan")
    save_file(tensors, shard)
    with pytest.raises(NonFiniteError, match=rf"^{shard}: tensor '{NAN_TENSOR}' has 1 non-finite"):
        import_hf(hf_dir, str(tmp_path / "imported"))
    assert not os.path.exists(tmp_path / "imported")


def _outside_copy(hf_dir: str, tmp_path, shard: str) -> str:
    """A valid shard outside the model directory: reading it would succeed."""
    os.makedirs(tmp_path / "x", exist_ok=True)
    target = str(tmp_path / "x" / "model.safetensors")
    shutil.copyfile(os.path.join(hf_dir, shard), target)
    return target


def test_a_shard_climbing_out_of_the_directory_is_refused(hf_dir, tmp_path, capsys):
    hf_dir = str(tmp_path / "models" / "hf")  # so ../../x is tmp_path/x
    shutil.move(str(tmp_path / "hf"), hf_dir)
    weight_map = _shard(hf_dir)
    _outside_copy(hf_dir, tmp_path, "shard-2.safetensors")
    escape = "../../x/model.safetensors"
    index = _write_index(
        hf_dir, {k: escape if v == "shard-2.safetensors" else v for k, v in weight_map.items()}
    )
    assert os.path.isfile(os.path.join(hf_dir, escape))  # it exists: only the check stops it
    out = str(tmp_path / "imported")
    assert main(["import-hf", hf_dir, out]) == 2
    assert _error(capsys) == (
        f"error: {index}: shard {escape!r} in weight_map climbs out with '..'; shard files "
        f"must lie inside the model directory {hf_dir}"
    )
    assert not os.path.exists(out)
    # inside-out-inside is still a '..' escape in the name
    _write_index(hf_dir, {k: "sub/../" + v for k, v in weight_map.items()})
    with pytest.raises(DataFormatError, match=r"climbs out with '\.\.'"):
        read_hf_weights(hf_dir)


def test_an_absolute_shard_path_is_refused(hf_dir, tmp_path):
    weight_map = _shard(hf_dir)
    target = _outside_copy(hf_dir, tmp_path, "shard-1.safetensors")
    index = _write_index(
        hf_dir, {k: target if v == "shard-1.safetensors" else v for k, v in weight_map.items()}
    )
    with pytest.raises(DataFormatError) as e:
        import_hf(hf_dir, str(tmp_path / "imported"))
    assert str(e.value).startswith(f"{index}: shard {target!r} in weight_map is an absolute path")
    assert not os.path.exists(tmp_path / "imported")


def test_a_symlinked_shard_must_resolve_inside(hf_dir, tmp_path):
    weight_map = _shard(hf_dir)
    target = _outside_copy(hf_dir, tmp_path, "shard-1.safetensors")
    link = os.path.join(hf_dir, "shard-1.safetensors")
    os.remove(link)
    os.symlink(target, link)
    index = os.path.join(hf_dir, INDEX_FILE)
    with pytest.raises(DataFormatError) as e:
        import_hf(hf_dir, str(tmp_path / "imported"))
    msg = str(e.value)
    assert msg.startswith(
        f"{index}: shard 'shard-1.safetensors' in weight_map resolves to {target}"
    )
    assert "through a symlink" in msg and f"inside the model directory {hf_dir}" in msg
    # a link that stays inside the directory is fine
    os.makedirs(os.path.join(hf_dir, "blobs"))
    shutil.move(target, os.path.join(hf_dir, "blobs", "one"))
    os.remove(link)
    os.symlink(os.path.join("blobs", "one"), link)
    assert sorted(read_hf_weights(hf_dir)) == sorted(weight_map)


def test_a_malformed_index_is_refused_naming_it(hf_dir):
    _shard(hf_dir)
    index = os.path.join(hf_dir, INDEX_FILE)
    for bad in ('{"weight_map": ', "[1, 2]", '{"weight_map": {}}', '{"weight_map": {"a": 3}}'):
        with open(index, "w", encoding="utf-8") as f:
            f.write(bad)
        with pytest.raises(DataFormatError, match=rf"^{index}: "):
            read_hf_weights(hf_dir)
    _write_index(hf_dir, {"a": "missing.safetensors"})
    with pytest.raises(DataFormatError, match=r"missing\.safetensors: missing shard"):
        read_hf_weights(hf_dir)
