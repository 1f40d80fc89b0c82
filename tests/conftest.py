"""Shared fixtures: tiny corpora and a tiny SentencePiece tokenizer (built once per run)."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("MBA_NO_PROGRESS", "1")
# Verification cache (utils/verify.py) of this test session only, not the user's.
os.environ.setdefault("MBA_CACHE_DIR", tempfile.mkdtemp(prefix="mba-test-cache-"))


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


# Without a GPU, Triton kernels run in Triton's CPU interpreter. Must be set before any
# kernel module is imported (triton.jit reads it at decoration time).
if "TRITON_INTERPRET" not in os.environ and _no_cuda():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    """Every test is ``unit`` unless marked ``integration`` (multi-process, kill/signal,
    compiler, end-to-end study): ``make test-fast`` runs ``-m unit``, ``make test`` both."""
    for item in items:
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """A 400-document JSONL corpus over 4 fields of study with years."""
    from megablocks_ablate.corpora.synthetic import write_corpus

    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    return write_corpus(str(path), n_docs=400, seed=1)


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory, tiny_corpus) -> str:
    """A 512-piece BPE SentencePiece model trained on the tiny corpus (with EOS id 2)."""
    import json

    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    sample = d / "sample.txt"
    with open(tiny_corpus, encoding="utf-8") as f, open(sample, "w", encoding="utf-8") as out:
        for line in f:
            out.write(json.loads(line)["text"].replace("\n", " ") + "\n")
    prefix = str(d / "tok")
    spm.SentencePieceTrainer.train(
        input=str(sample),
        model_prefix=prefix,
        vocab_size=512,
        model_type="bpe",
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=2,
        byte_fallback=True,
        num_threads=1,
        minloglevel=2,
    )
    return prefix + ".model"


@pytest.fixture(scope="session")
def launcher_env() -> dict:
    """The environment for a torchrun / mpiexec child: none of this process's rank
    variables (a test may itself run under a launcher), one thread per rank, no
    progress bars, and this checkout importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "PMI_", "OMPI_", "SLURM_")
        )
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env.update(
        OMP_NUM_THREADS="1",
        MBA_NO_PROGRESS="1",
        PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env
