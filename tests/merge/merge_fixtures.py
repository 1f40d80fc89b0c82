"""A tiny model family (seed + unit models) written with save_model_checkpoint.

Imported by the merge tests (``from merge_fixtures import ...``) and by conftest.py.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from megablocks_ablate.checkpoint import Lineage, model_hash, save_model_checkpoint

CONFIG = {"vocab_size": 37, "hidden_size": 12, "ffn_size": 20}


class TinyLM(nn.Module):
    """Embedding -> Linear -> LayerNorm -> Linear: enough parameter kinds for the pool."""

    def __init__(self, vocab_size=37, hidden_size=12, ffn_size=20):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.up = nn.Linear(hidden_size, ffn_size)
        self.norm = nn.LayerNorm(ffn_size)
        self.down = nn.Linear(ffn_size, vocab_size, bias=False)

    def forward(self, ids):
        return self.down(self.norm(torch.relu(self.up(self.embed(ids)))))


def write_family(
    root: str, units=("cs_0", "cs_1", "bio_0"), dtype=torch.float32, tokenizer="tok-abc"
) -> tuple[str, dict[str, str]]:
    """A seed checkpoint and one perturbed unit model per unit; returns (seed, {unit: dir})."""
    torch.manual_seed(0)
    seed_model = TinyLM(**CONFIG)
    seed_dir = os.path.join(root, "seed")
    seed_sd = {k: v.to(dtype) for k, v in seed_model.state_dict().items()}
    save_model_checkpoint(
        seed_dir,
        seed_sd,
        CONFIG,
        Lineage(kind="seed", tokens_seen=1000, tokenizer_fingerprint=tokenizer),
    )
    seed_hash = model_hash(seed_dir)
    out = {}
    for i, unit in enumerate(units):
        g = torch.Generator().manual_seed(100 + i)
        sd = {
            k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype)
            for k, v in seed_sd.items()
        }
        d = os.path.join(root, "pool", unit)
        save_model_checkpoint(
            d,
            sd,
            CONFIG,
            Lineage(
                kind="unit",
                seed_hash=seed_hash,
                units=[unit],
                weights=[1.0],
                tokens_seen=100 * (i + 1),
                tokenizer_fingerprint=tokenizer,
            ),
        )
        out[unit] = d
    return seed_dir, out


def merged_flats(pool, weights, live_dtype=torch.float32) -> list[torch.Tensor]:
    """The live model's flat parameters after ``pool.merge_into`` of each weight vector
    (any pool placement), cloned in order."""
    model = TinyLM(**CONFIG).to(live_dtype)
    flat = pool.bind(model)
    out = []
    for w in weights:
        pool.merge_into(model, w)
        out.append(flat.clone())
    return out
