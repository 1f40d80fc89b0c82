"""Shared fixtures of the command tests: a tiny checkpoint whose lineage records the
test tokenizer, and a four-document evaluation set."""

from __future__ import annotations

import json

import pytest
import torch

from megablocks_ablate.checkpoint import Lineage, save_model_checkpoint

TINY = ["vocab_size=512", "max_seq_len=32", "init_std=0.1"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, sp_model_path) -> str:
    """A tiny-model checkpoint whose lineage records the test tokenizer."""
    from megablocks_ablate.data.tokenizer import load_tokenizer
    from megablocks_ablate.model.config import ModelConfig

    torch.manual_seed(7)
    cfg = ModelConfig.from_preset("tiny", TINY)
    tok = load_tokenizer(sp_model_path)
    path = str(tmp_path_factory.mktemp("ckpt") / "seed")
    lineage = Lineage(
        kind="seed", tokenizer_fingerprint=tok.fingerprint, extra={"tokenizer": sp_model_path}
    )
    save_model_checkpoint(path, cfg.build().state_dict(), cfg.to_dict(), lineage)
    return path


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory, tiny_corpus) -> str:
    path = str(tmp_path_factory.mktemp("evalset") / "bio.jsonl")
    with open(tiny_corpus, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        for line in list(f)[:4]:
            out.write(json.dumps({"text": json.loads(line)["text"][:200]}) + "\n")
    return path
