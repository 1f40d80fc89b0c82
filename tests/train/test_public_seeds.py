"""Public checkpoints as seeds: a tiny Llama- and a tiny Pythia-shaped model, imported
from Hugging Face format, continue training as unit models through the trainer."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import transformers
from conftest import tiny_overrides

from megablocks_ablate.checkpoint import load_model_checkpoint, model_hash
from megablocks_ablate.data.manifest import Manifest
from megablocks_ablate.model.hf import import_hf
from megablocks_ablate.train.config import TrainConfig
from megablocks_ablate.train.trainer import train

FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "pythia": (transformers.GPTNeoXConfig, dict(rotary_pct=0.25)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_imported_model_trains_as_a_seed(family, train_manifest, tmp_path):
    cls, extra = FAMILIES[family]
    hf_cfg = cls(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **extra,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "hf")
    seed = str(tmp_path / "seed")
    import_hf(str(tmp_path / "hf"), seed)

    unit = Manifest.load(train_manifest).partition_units()["physics"][0]
    out = str(tmp_path / "unit")
    cfg = TrainConfig.load(
        None,
        tiny_overrides(
            train_manifest,
            out,
            kind="unit",
            init_from=seed,
            model=os.path.join(seed, "config.json"),
            model_overrides="[]",
            **{"data.unit": unit, "data.mixture": "[]"},
        ),
    )
    summary = train(cfg)
    assert math.isfinite(summary["final_loss"])
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 8 and losses[-1] < losses[0]  # it learns from the imported weights
    state, config, lineage = load_model_checkpoint(os.path.join(out, "final"))
    assert lineage.kind == "unit" and lineage.units == [unit]
    assert lineage.seed_hash == model_hash(seed)
    assert config == load_model_checkpoint(seed)[1]  # the family's shape, unchanged
