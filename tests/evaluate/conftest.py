"""Fixtures for the evaluation tests: small eval domains and a tiny model."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import zstandard

# A tiny-preset model over the 512-piece test tokenizer with 32-token windows, so that
# most test documents span several windows.
TINY = ["vocab_size=512", "max_seq_len=32", "init_std=0.1"]


def _docs(corpus: str, start: int, count: int) -> list[dict]:
    with open(corpus, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][start : start + count]
    # Varying lengths (40..~400 bytes): one window to a dozen.
    return [{**r, "text": r["text"][: 40 + 37 * i]} for i, r in enumerate(rows)]


def _write(path: str, rows: list, opener=open) -> str:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def _zst_open(path, mode, encoding):
    import io

    return io.TextIOWrapper(zstandard.open(path, "wb"), encoding=encoding)


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory, tiny_corpus) -> str:
    """Three domains: ``bio`` (.jsonl), ``cs`` (.jsonl.gz), ``mixed`` (.jsonl.zst, with an
    empty document and a one-character document)."""
    d = str(tmp_path_factory.mktemp("evalsets"))
    _write(os.path.join(d, "bio.jsonl"), _docs(tiny_corpus, 0, 6))
    _write(os.path.join(d, "cs.jsonl.gz"), _docs(tiny_corpus, 100, 5), gzip.open)
    mixed = _docs(tiny_corpus, 200, 4) + [{"text": ""}, {"text": "a"}]
    _write(os.path.join(d, "mixed.jsonl.zst"), mixed, _zst_open)
    return d


@pytest.fixture
def tiny_model():
    """``tiny_model(seed)``: a fresh tiny model (fp32, eval mode)."""

    def make(seed: int = 0, overrides: list[str] | None = None):
        import torch

        from megablocks_ablate.model.config import ModelConfig

        torch.manual_seed(seed)
        return ModelConfig.from_preset("tiny", TINY + list(overrides or [])).build().eval()

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, sp_model_path) -> str:
    """A tiny-model checkpoint whose lineage records the test tokenizer."""
    import torch

    from megablocks_ablate.checkpoint import Lineage, save_model_checkpoint
    from megablocks_ablate.data.tokenizer import load_tokenizer
    from megablocks_ablate.model.config import ModelConfig

    torch.manual_seed(7)
    cfg = ModelConfig.from_preset("tiny", TINY)
    model = cfg.build()
    tok = load_tokenizer(sp_model_path)
    path = str(tmp_path_factory.mktemp("ckpt") / "seed")
    save_model_checkpoint(
        path,
        model.state_dict(),
        cfg.to_dict(),
        Lineage(
            kind="seed", tokenizer_fingerprint=tok.fingerprint, extra={"tokenizer": sp_model_path}
        ),
    )
    return path
