"""Evaluation sets: sources, tokenization cache, bad-line / empty rules (evaluate/sets.py)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from megablocks_ablate.data.tokenizer import load_tokenizer
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.evaluate.sets import EvalSuite, domain_name, resolve_sources


def test_domain_names_and_directory_sources(eval_dir):
    assert domain_name("x/c4_en.jsonl.gz") == "c4_en"
    assert domain_name("wiki.jsonl.zst") == "wiki"
    srcs = resolve_sources(eval_dir)
    assert [s.domain for s in srcs] == ["bio", "cs", "mixed"]
    named = resolve_sources([f"alpha={eval_dir}/bio.jsonl", f"{eval_dir}/cs.jsonl.gz"])
    assert [s.domain for s in named] == ["alpha", "cs"]


def test_source_errors(eval_dir, tmp_path):
    with pytest.raises(DataFormatError, match="no such file"):
        resolve_sources([str(tmp_path / "nope.jsonl")])
    with pytest.raises(DataFormatError, match="no evaluation files"):
        resolve_sources(str(tmp_path))
    with pytest.raises(DataFormatError, match="domain 'bio' comes from both"):
        resolve_sources([f"{eval_dir}/bio.jsonl", f"bio={eval_dir}/cs.jsonl.gz"])


def test_suite_tokenizes_once_and_matches_tokenizer(eval_dir, sp_model_path, tmp_path):
    tok = load_tokenizer(sp_model_path)
    cache = str(tmp_path / "cache")
    suite = EvalSuite.load(eval_dir, tok, cache_dir=cache)
    assert suite.domains == ["bio", "cs", "mixed"]
    assert suite.tokenizer_fingerprint == tok.fingerprint and suite.eod_id == tok.eod_id
    with open(os.path.join(eval_dir, "bio.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    bio = suite.sets["bio"]
    assert bio.num_documents == len(texts)
    for i, text in enumerate(texts):
        assert bio.document(i).tolist() == tok.encode(text)
    assert bio.num_bytes == sum(len(t.encode("utf-8")) for t in texts)
    # the empty document is skipped and counted; the one-character one is kept
    mixed = suite.sets["mixed"]
    assert mixed.empty_documents == 1 and mixed.num_documents == 5
    assert mixed.document(4).tolist() == tok.encode("a")

    # second load: every domain comes from the cache (no .bin rewritten), same arrays
    bins = sorted(p for p in os.listdir(cache) if p.endswith(".bin"))
    assert len(bins) == 3
    mtimes = {p: os.stat(os.path.join(cache, p)).st_mtime_ns for p in bins}

    class NoEncode:
        fingerprint, eod_id, vocab_size = tok.fingerprint, tok.eod_id, tok.vocab_size

        def encode_batch(self, texts):
            raise AssertionError("re-tokenized although cached")

    again = EvalSuite.load(eval_dir, NoEncode(), cache_dir=cache)
    assert {p: os.stat(os.path.join(cache, p)).st_mtime_ns for p in bins} == mtimes
    for d in suite.domains:
        np.testing.assert_array_equal(again.sets[d].tokens, suite.sets[d].tokens)
        np.testing.assert_array_equal(again.sets[d].doc_bytes, suite.sets[d].doc_bytes)
    # the cache holds JSON + npy + indexed files only (no pickle)
    assert {p.split(".", 2)[-1] for p in os.listdir(cache)} == {"bin", "idx", "bytes.npy", "json"}


def test_bad_lines_error_or_skip_and_empty_domain(sp_model_path, tmp_path, caplog):
    d = tmp_path / "sets"
    d.mkdir()
    (d / "good.jsonl").write_text('{"text": "hello world"}\n')
    (d / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n{"text": 3}\n')
    (d / "empty.jsonl").write_text("")
    cache = str(tmp_path / "cache")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: invalid JSON"):
        EvalSuite.load(str(d), sp_model_path, cache_dir=cache)
    with caplog.at_level(logging.WARNING, logger="megablocks_ablate"):
        suite = EvalSuite.load(str(d), sp_model_path, cache_dir=cache, on_bad_line="skip")
    assert "eval domain 'empty' left out" in caplog.text
    assert suite.domains == ["bad", "good"]
    assert suite.sets["bad"].bad_lines == {"invalid_json": 1, "text_not_a_string": 1}
    assert suite.sets["bad"].num_documents == 1
    assert "empty" in suite.skipped_domains
    with pytest.raises(DataFormatError, match="no domain has a scorable document"):
        EvalSuite.load([str(d / "empty.jsonl")], sp_model_path, cache_dir=cache)


def test_corrupt_compressed_file_is_a_clear_error(sp_model_path, tmp_path):
    bad = tmp_path / "broken.jsonl.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataFormatError, match="broken.jsonl.gz"):
        EvalSuite.load([str(bad)], sp_model_path, cache_dir=str(tmp_path / "c"))


def test_manifest_heldout_files_are_domains(tiny_corpus, sp_model_path, tmp_path):
    from megablocks_ablate.data.preprocess import PreprocessConfig, run_preprocess

    out = str(tmp_path / "data")
    cfg = PreprocessConfig(
        input=[tiny_corpus],
        tokenizer=sp_model_path,
        partition_by=["fos"],
        heldout_fraction=0.05,
        out=out,
        workers=1,
    )
    run_preprocess(cfg)
    from megablocks_ablate.data.manifest import Manifest

    m = Manifest.load(out)
    expected = {p: m.heldout_path(p) for p in m.partitions if m.heldout_path(p)}
    srcs = resolve_sources(out)
    assert {s.domain: s.path for s in srcs} == expected
    suite = EvalSuite.load(out, sp_model_path, cache_dir=str(tmp_path / "c"))
    for p, info in m.partitions.items():
        if p in suite.sets:
            assert suite.sets[p].num_documents == info["heldout"]["documents"]
