"""Paloma as published (evaluate/paloma.py) and sharded / filtered sources (evaluate/sets.py)."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import pytest
from paloma_layout import corpus_texts, write_paloma, write_shard

from megablocks_ablate.data.tokenizer import load_tokenizer
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.evaluate import paloma
from megablocks_ablate.evaluate.sets import EvalSource, EvalSuite, _cache_key

SOURCES = ["c4_100_domains", "c4_en", "m2d2_s2orc_unsplit", "ptb"]


@pytest.fixture
def paloma_dir(tmp_path, tiny_corpus) -> str:
    return write_paloma(str(tmp_path), corpus_texts(tiny_corpus))


@pytest.fixture(scope="module")
def tok(sp_model_path):
    return load_tokenizer(sp_model_path)


def texts_of(*files: str, subdomain: str | None = None) -> list[str]:
    out = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            recs = [json.loads(line) for line in f]
        out += [r["text"] for r in recs if subdomain is None or r["subdomain"] == subdomain]
    return out


class CountingTokenizer:
    """The test tokenizer, recording every text it is asked to encode."""

    def __init__(self, tok):
        self._tok, self.encoded = tok, []

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode_batch(self, texts):
        self.encoded += list(texts)
        return self._tok.encode_batch(texts)


def assert_documents(suite, domain, texts, tok):
    s = suite.sets[domain]
    assert s.num_documents == len(texts)
    assert [s.document(i).tolist() for i in range(len(texts))] == [tok.encode(t) for t in texts]
    assert s.num_bytes == sum(len(t.encode("utf-8")) for t in texts)


def test_one_domain_per_source_with_all_its_shards(paloma_dir, tok, tmp_path):
    srcs = paloma.paloma_sources(paloma_dir)
    assert [s.domain for s in srcs] == SOURCES  # README.md, .gitattributes, .cache/ ignored
    c4 = {s.domain: s for s in srcs}["c4_en"]
    val = os.path.join(paloma_dir, "c4_en", "val")
    assert c4.path == val and c4.where is None
    assert c4.files == (f"{val}/val-00000000.jsonl.gz", f"{val}/val-00000001.jsonl.gz")
    suite = EvalSuite.load(srcs, tok, cache_dir=str(tmp_path / "cache"))
    assert suite.domains == SOURCES
    assert_documents(suite, "c4_en", texts_of(*c4.files), tok)  # shard order, 3 + 2 docs
    assert suite.sets["c4_en"].num_documents == 5
    m2d2 = os.path.join(paloma_dir, "m2d2_s2orc_unsplit", "val")
    assert_documents(
        suite,
        "m2d2_s2orc_unsplit",
        texts_of(f"{m2d2}/cs.CL.jsonl.gz", f"{m2d2}/math.AG.jsonl.gz"),
        tok,
    )
    assert suite.describe()["c4_en"]["path"] == val


def test_split_by_subdomain(paloma_dir, tok, tmp_path):
    srcs = paloma.paloma_sources(paloma_dir, split_by="subdomain")
    assert [s.domain for s in srcs] == [
        "c4_100_domains/www.ign.com",
        "c4_100_domains/www.nytimes.com",
        "c4_en",  # no record has a subdomain: one domain
        "m2d2_s2orc_unsplit/cs.CL",
        "m2d2_s2orc_unsplit/math.AG",
        "ptb",
    ]
    ign = srcs[0]
    val = os.path.join(paloma_dir, "c4_100_domains", "val")
    assert ign.files == (f"{val}/val_www.ign.com.jsonl.gz",)
    assert ign.where == ("subdomain", "www.ign.com")
    cache = str(tmp_path / "cache")
    suite = EvalSuite.load(srcs, tok, cache_dir=cache)
    assert_documents(suite, "c4_100_domains/www.ign.com", texts_of(*ign.files), tok)
    assert suite.sets["c4_100_domains/www.nytimes.com"].num_documents == 3
    # the "/" of a domain name never reaches the file system
    assert all("/" not in f and f.startswith(("c4_", "m2d2_", "ptb")) for f in os.listdir(cache))


def test_subdomains_sharing_shards_are_filtered_on_the_field(paloma_dir, tok, tmp_path):
    val = os.path.join(paloma_dir, "dolma_100_subreddits", "val")
    os.makedirs(val)
    recs = [
        {"text": f"post {i} about {sub}", "id": str(i), "source": "reddit", "subdomain": sub}
        for i, sub in enumerate(["depression", "AskReddit", "depression", "AskReddit"])
    ]
    write_shard(f"{val}/val-00000000.jsonl.gz", recs[:3])
    write_shard(f"{val}/val-00000001.jsonl.gz", recs[3:])
    srcs = paloma.paloma_sources(paloma_dir, split_by="subdomain", sources=["dolma_100_subreddits"])
    by = {s.domain: s for s in srcs}
    assert list(by) == ["dolma_100_subreddits/depression", "dolma_100_subreddits/AskReddit"]
    assert by["dolma_100_subreddits/depression"].files == (f"{val}/val-00000000.jsonl.gz",)
    assert len(by["dolma_100_subreddits/AskReddit"].files) == 2
    suite = EvalSuite.load(srcs, tok, cache_dir=str(tmp_path / "c"))
    assert_documents(
        suite,
        "dolma_100_subreddits/depression",
        ["post 0 about depression", "post 2 about depression"],
        tok,
    )
    assert_documents(
        suite,
        "dolma_100_subreddits/AskReddit",
        ["post 1 about AskReddit", "post 3 about AskReddit"],
        tok,
    )


def test_sources_filter_and_test_split(paloma_dir, tok, tmp_path):
    srcs = paloma.paloma_sources(paloma_dir, sources=["ptb", "c4_en"])
    assert [s.domain for s in srcs] == ["ptb", "c4_en"]  # the order given
    test = paloma.paloma_sources(paloma_dir, split="test", sources=["c4_en", "ptb"])
    c4 = test[0]
    assert c4.files == (os.path.join(paloma_dir, "c4_en", "test", "test-00000000.jsonl.gz"),)
    assert test[1].files == (os.path.join(paloma_dir, "ptb", "test", "test.jsonl.gz"),)
    suite = EvalSuite.load(test, tok, cache_dir=str(tmp_path / "c"))
    assert_documents(suite, "c4_en", texts_of(*c4.files), tok)
    assert texts_of(*c4.files) != texts_of(*srcs[1].files)[:3]  # val and test differ


def test_errors(paloma_dir, tmp_path):
    with pytest.raises(DataFormatError, match=r"nowhere: no such Paloma directory"):
        paloma.paloma_sources(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="no Paloma source directories"):
        paloma.paloma_sources(str(tmp_path / "empty"))
    with pytest.raises(
        DataFormatError,
        match=r"unknown Paloma source 'c4' \(available: c4_100_domains, c4_en, "
        r"m2d2_s2orc_unsplit, ptb\)",
    ):
        paloma.paloma_sources(paloma_dir, sources=["c4_en", "c4"])
    with pytest.raises(DataFormatError, match="split must be one of"):
        paloma.paloma_sources(paloma_dir, split="dev")
    with pytest.raises(DataFormatError, match="split_by must be"):
        paloma.paloma_sources(paloma_dir, split_by="file")

    shutil.rmtree(os.path.join(paloma_dir, "ptb", "test"))
    with pytest.raises(
        DataFormatError, match=r"ptb/test: Paloma source 'ptb' has no 'test' split \(it has: val\)"
    ):
        paloma.paloma_sources(paloma_dir, split="test")
    assert "ptb" in [s.domain for s in paloma.paloma_sources(paloma_dir)]  # val is still there

    c4_val = os.path.join(paloma_dir, "c4_en", "val")
    for f in os.listdir(c4_val):
        os.remove(os.path.join(c4_val, f))
    open(os.path.join(c4_val, "notes.txt"), "w").close()
    with pytest.raises(DataFormatError, match=r"c4_en/val: no shard files"):
        paloma.paloma_sources(paloma_dir, sources=["c4_en"])


def test_records_missing_subdomain_name_file_and_line(paloma_dir, tok, tmp_path):
    path = os.path.join(paloma_dir, "c4_100_domains", "val", "val_www.nytimes.com.jsonl.gz")
    recs = [{"text": "t", "id": "1", "source": "c4", "subdomain": "www.nytimes.com"}] * 2
    write_shard(path, recs + [{"text": "no domain", "id": "3", "source": "c4"}])
    with pytest.raises(
        DataFormatError, match=r"val_www\.nytimes\.com\.jsonl\.gz:3: record has no 'subdomain'"
    ):
        paloma.paloma_sources(paloma_dir, split_by="subdomain")
    paloma.paloma_sources(paloma_dir)  # by source the field is not needed
    # the filter itself (sets.py) refuses a record without the field, naming file:line
    src = EvalSource("x", path, (path,), ("subdomain", "www.nytimes.com"))
    with pytest.raises(DataFormatError, match=r"jsonl\.gz:3: record has no 'subdomain' field"):
        EvalSuite.load([src], tok, cache_dir=str(tmp_path / "c"))


def test_cache_reuse_and_invalidation_when_a_shard_changes(paloma_dir, tok, tmp_path):
    cache = str(tmp_path / "cache")
    srcs = paloma.paloma_sources(paloma_dir, split_by="subdomain")
    first = CountingTokenizer(tok)
    suite = EvalSuite.load(srcs, first, cache_dir=cache)
    assert first.encoded  # built
    again = CountingTokenizer(tok)
    EvalSuite.load(paloma.paloma_sources(paloma_dir, split_by="subdomain"), again, cache_dir=cache)
    assert again.encoded == []  # every domain from the cache

    # one shard of c4_en changes: only c4_en is tokenized again, and holds the new text
    shard = os.path.join(paloma_dir, "c4_en", "val", "val-00000001.jsonl.gz")
    write_shard(shard, [{"text": "a changed document", "id": "x", "source": "c4_en"}])
    changed = CountingTokenizer(tok)
    new = EvalSuite.load(
        paloma.paloma_sources(paloma_dir, split_by="subdomain"), changed, cache_dir=cache
    )
    c4_files = [f"{os.path.dirname(shard)}/val-00000000.jsonl.gz", shard]
    assert changed.encoded == texts_of(*c4_files)
    assert_documents(new, "c4_en", texts_of(*c4_files), tok)
    assert new.sets["c4_en"].num_documents == 4 != suite.sets["c4_en"].num_documents
    # a subdomain's own shard changes: only that domain is rebuilt
    ign = os.path.join(paloma_dir, "c4_100_domains", "val", "val_www.ign.com.jsonl.gz")
    write_shard(ign, [{"text": "ign news", "id": "i", "source": "c4", "subdomain": "www.ign.com"}])
    rebuilt = CountingTokenizer(tok)
    EvalSuite.load(
        paloma.paloma_sources(paloma_dir, split_by="subdomain"), rebuilt, cache_dir=cache
    )
    assert rebuilt.encoded == ["ign news"]


def test_single_file_cache_key_is_unchanged_and_sharded_keys_cover_files_and_filter(paloma_dir):
    f0, f1 = (os.path.join(paloma_dir, "c4_en", "val", f"val-0000000{i}.jsonl.gz") for i in (0, 1))
    single = _cache_key(EvalSource("c4_en", f0), "fp", "text", "error")
    assert set(single) == {
        "format",
        "source_sha256",
        "tokenizer_fingerprint",
        "text_key",
        "on_bad_line",
    }
    both = _cache_key(EvalSource("c4_en", "d", (f0, f1)), "fp", "text", "error")
    swapped = _cache_key(EvalSource("c4_en", "d", (f1, f0)), "fp", "text", "error")
    assert both["shard_sha256"] == [single["source_sha256"], swapped["shard_sha256"][0]]
    assert both != swapped  # order is the documents' order
    a = _cache_key(EvalSource("x", "d", (f0,), ("subdomain", "a")), "fp", "text", "error")
    b = _cache_key(EvalSource("x", "d", (f0,), ("subdomain", "b")), "fp", "text", "error")
    assert a["record_filter"] == {"field": "subdomain", "value": "a"} and a != b


def test_refs_round_trip_and_follow_the_files(paloma_dir):
    srcs = paloma.paloma_sources(paloma_dir, split_by="subdomain")
    refs = {s.domain: paloma.source_ref(s) for s in srcs}
    assert refs["c4_en"] == "paloma:" + os.path.join(paloma_dir, "c4_en", "val")
    assert refs["c4_100_domains/www.ign.com"].endswith("c4_100_domains/val#subdomain=www.ign.com")
    assert paloma.sources_from_refs(refs) == {s.domain: s for s in srcs}
    odd = EvalSource("s/x", "/p/a#b/val", (), ("subdomain", "r/C++ #1"))
    assert paloma._parse_ref("s/x", paloma.source_ref(odd)) == ("/p/a#b/val", "r/C++ #1")
    os.remove(os.path.join(paloma_dir, "c4_100_domains", "val", "val_www.ign.com.jsonl.gz"))
    with pytest.raises(
        DataFormatError, match=r"'c4_100_domains/www\.ign\.com': no record .* any more"
    ):
        paloma.sources_from_refs(refs)
