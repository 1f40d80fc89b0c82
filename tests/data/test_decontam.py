"""Decontamination: paragraph normalisation, the Bloom filter and its file, the rule."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from megablocks_ablate.corpora.synthetic import iter_documents, write_corpus
from megablocks_ablate.data.decontam import (
    HEADER_SIZE,
    BloomFilter,
    Decontaminator,
    paragraphs,
)
from megablocks_ablate.data.jsonl import BadLineCounter
from megablocks_ablate.errors import DataFormatError

WORDS13 = "the quick brown fox jumps over the lazy dog while the cat sleeps"  # 13 words
WORDS12 = "one two three four five six seven eight nine ten eleven twelve"


def _write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return str(path)


# --------------------------------------------------------------------------- paragraphs


def test_paragraph_normalisation():
    text = (
        "  The QUICK\tbrown   fox jumps over the lazy dog while the cat SLEEPS \r\n"
        "\n\n"
        f"{WORDS12}\n"
        "Cafe\u0301 au lait is served hot to every guest who arrives before noon today"
    )
    assert paragraphs(text) == [
        WORDS13,
        "café au lait is served hot to every guest who arrives before noon today",  # NFC
    ]
    assert paragraphs(text)[1] == "caf\u00e9" + paragraphs(text)[1][4:]
    assert len(WORDS12.split()) == 12 and len(WORDS13.split()) == 13


def test_min_words_is_configurable():
    assert paragraphs(WORDS12) == []
    assert paragraphs(WORDS12, min_words=12) == [WORDS12]
    assert paragraphs("a b\nc d e", min_words=3) == ["c d e"]
    assert paragraphs("") == []


# --------------------------------------------------------------------------- Bloom filter


def test_size_from_standard_formulas():
    bloom = BloomFilter(1000, 1e-6)
    m = math.ceil(-1000 * math.log(1e-6) / math.log(2) ** 2)
    assert (bloom.num_bits, m) == (28756, 28756)
    assert bloom.num_hashes == round(m / 1000 * math.log(2)) == 20
    assert bloom.bits.dtype == np.uint8 and bloom.bits.shape == ((m + 7) // 8,)
    assert BloomFilter.for_items(0).num_bits == BloomFilter(1).num_bits  # empty eval set
    with pytest.raises(ValueError, match="error_rate"):
        BloomFilter(10, 1.5)


def _reference_indices(item: str, m: int, k: int) -> list[int]:
    """The documented hash scheme, written out independently of the module."""
    d = hashlib.blake2b(item.encode("utf-8"), digest_size=16).digest()
    h1 = int.from_bytes(d[:8], "little")
    h2 = int.from_bytes(d[8:], "little")
    return [(h1 + i * h2 + (i**3 - i) // 6) % m for i in range(k)]


def test_bits_follow_the_documented_hash_scheme():
    bloom = BloomFilter(50, 1e-3)
    expected = np.zeros(bloom.num_bits, dtype=bool)
    for item in ["hello world", "naïve café", WORDS13]:
        bloom.add(item)
        expected[_reference_indices(item, bloom.num_bits, bloom.num_hashes)] = True
    got = np.unpackbits(bloom.bits, bitorder="little")[: bloom.num_bits].astype(bool)
    assert np.array_equal(got, expected)
    assert bloom.count == 3


def test_count_ignores_duplicates():
    bloom = BloomFilter(100, 1e-4)
    bloom.add_many(["a", "b", "a", "a"])
    assert bloom.count == 2


def test_no_false_negatives_over_10k_items():
    bloom = BloomFilter.for_items(10_000, 1e-6)
    items = [f"eval paragraph {i} with some words" for i in range(10_000)]
    bloom.add_many(items)
    assert all(x in bloom for x in items)
    assert bloom.count == 10_000


def test_false_positive_rate_matches_configuration():
    p = 1e-2
    bloom = BloomFilter.for_items(10_000, p)
    bloom.add_many(f"present {i}" for i in range(10_000))
    assert abs(bloom.expected_false_positive_rate() - p) < 1e-3
    assert abs(bloom.fill_ratio() - 0.5) < 0.02  # optimal k leaves half the bits set
    fp = sum(f"absent {i}" in bloom for i in range(100_000)) / 100_000
    # ~1000 expected hits, sd ~31: a factor of 1.5 either way is > 15 sd.
    assert p / 1.5 < fp < p * 1.5, fp


@pytest.fixture
def saved_filter(tmp_path):
    bloom = BloomFilter.for_items(5_000, 1e-4)
    bloom.add_many(f"item {i}" for i in range(5_000))
    path = str(tmp_path / "eval.bloom")
    bloom.save(path)
    return bloom, path


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(saved_filter, mmap):
    bloom, path = saved_filter
    loaded = BloomFilter.load(path, mmap=mmap)
    assert (loaded.num_bits, loaded.num_hashes, loaded.count) == (
        bloom.num_bits,
        bloom.num_hashes,
        bloom.count,
    )
    assert isinstance(loaded.bits, np.memmap) == mmap
    assert np.array_equal(np.asarray(loaded.bits), bloom.bits)
    probes = [f"item {i}" for i in range(5_000)] + [f"other {i}" for i in range(5_000)]
    assert [x in loaded for x in probes] == [x in bloom for x in probes]
    assert loaded.expected_false_positive_rate() == bloom.expected_false_positive_rate()
    assert os.listdir(os.path.dirname(path)) == ["eval.bloom"]  # no temp file left


def test_mapped_filter_is_read_only(saved_filter):
    _, path = saved_filter
    with pytest.raises(ValueError, match="read-only"):
        BloomFilter.load(path, mmap=True).add("x")
    writable = BloomFilter.load(path, mmap=False)
    writable.add("brand new item")
    assert "brand new item" in writable


def test_file_header_layout(saved_filter):
    """Parse the header with an independent reading of the documented layout."""
    bloom, path = saved_filter
    raw = open(path, "rb").read()
    assert raw[:8] == b"MBABLOOM"
    version, header_size, m, k, reserved, count, capacity = struct.unpack_from("<IIQIIQQ", raw, 8)
    (error_rate,) = struct.unpack_from("<d", raw, 48)
    scheme = raw[56:72].rstrip(b"\0")
    assert (version, header_size, reserved, scheme) == (1, 72, 0, b"blake2b128-edh")
    assert (m, k, count, capacity, error_rate) == (
        bloom.num_bits,
        bloom.num_hashes,
        5_000,
        5_000,
        1e-4,
    )
    assert raw[HEADER_SIZE:] == bloom.bits.tobytes() and len(raw) == 72 + (m + 7) // 8


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[: HEADER_SIZE + 10], "truncated"),
        (lambda b: b + b"\0", "expected"),
        (lambda b: b[:40], "header"),
        (lambda b: b"", "header"),
        (lambda b: b"NOTBLOOM" + b[8:], "bad magic"),
        (lambda b: b[:8] + struct.pack("<I", 2) + b[12:], "version"),
        (lambda b: b[:56] + b"sha1-dh".ljust(16, b"\0") + b[72:], "hash scheme"),
        (lambda b: b[:24] + struct.pack("<I", 0) + b[28:], "num_hashes=0"),
    ],
)
def test_damaged_file_is_a_format_error_naming_it(saved_filter, damage, words):
    _, path = saved_filter
    data = open(path, "rb").read()
    bad = path + ".bad"
    with open(bad, "wb") as f:
        f.write(damage(data))
    for mmap in (True, False):
        with pytest.raises(DataFormatError, match=words) as exc:
            BloomFilter.load(bad, mmap=mmap)
        assert bad in str(exc.value)


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(DataFormatError, match="no such file"):
        BloomFilter.load(str(tmp_path / "absent.bloom"))


def test_deterministic_across_builds_and_processes(saved_filter):
    bloom, path = saved_filter
    again = BloomFilter.for_items(5_000, 1e-4)
    again.add_many(f"item {i}" for i in range(5_000))
    assert again.bits.tobytes() == bloom.bits.tobytes()

    probes = [f"item {i}" for i in range(0, 5_000, 7)] + [f"other {i}" for i in range(3_000)]
    script = (
        "import json, sys\n"
        "from megablocks_ablate.data.decontam import BloomFilter\n"
        "b = BloomFilter.load(sys.argv[1])\n"
        "print(json.dumps([x in b for x in json.load(sys.stdin)]))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")  # a salted hash() would differ
    out = subprocess.run(
        [sys.executable, "-c", script, path],
        input=json.dumps(probes),
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    answers = json.loads(out)
    assert answers == [x in bloom for x in probes]
    assert sum(answers) >= 715  # every present probe (715 of them) answered True


def test_pickles_for_worker_processes(saved_filter):
    bloom, path = saved_filter
    mapped = BloomFilter.load(path, mmap=True)
    for original in (bloom, mapped):
        copy = pickle.loads(pickle.dumps(Decontaminator(original)))
        assert np.array_equal(np.asarray(copy.bloom.bits), bloom.bits)
        assert copy.bloom.read_only == original.read_only
    assert len(pickle.dumps(mapped)) < 500  # re-maps the file instead of copying bits


# --------------------------------------------------------------------------- decontaminator


def test_planted_contaminated_document_is_flagged(tmp_path):
    eval_docs = [d["text"] for d in iter_documents(30, seed=7)]
    planted_source = eval_docs[4].split("\n")[0]
    assert len(planted_source.split()) >= 13
    eval_path = tmp_path / "eval.jsonl.gz"
    write_corpus(str(eval_path), n_docs=30, seed=7)
    deco = Decontaminator.from_eval_files([str(eval_path)])

    # The copied paragraph changes case and spacing and sits among clean paragraphs.
    copied = "   " + "  \t".join(planted_source.upper().split()) + "  "
    train = [d["text"] for d in iter_documents(200, seed=8)]
    contaminated = train[0] + "\n\n" + copied + "\n" + train[1]
    assert deco.is_contaminated(contaminated)
    assert not deco.is_contaminated(train[0] + "\n\n" + train[1])
    assert sum(deco.is_contaminated(t) for t in train) == 0
    # Every eval document with a qualifying paragraph is itself flagged.
    assert [deco.is_contaminated(t) for t in eval_docs] == [bool(paragraphs(t)) for t in eval_docs]

    stats = deco.stats()
    assert stats == {
        "eval_paragraphs": len({p for t in eval_docs for p in paragraphs(t)}),
        "num_bits": deco.bloom.num_bits,
        "num_hashes": deco.bloom.num_hashes,
        "false_positive_rate": deco.bloom.expected_false_positive_rate(),
    }
    assert stats["false_positive_rate"] <= 1e-6 * 1.01


def test_short_paragraphs_are_ignored_both_ways(tmp_path):
    # Not added: a 12-word eval paragraph does not contaminate training text.
    eval_path = _write_jsonl(tmp_path / "eval.jsonl", [WORDS12 + "\n" + WORDS13])
    deco = Decontaminator.from_eval_files([eval_path])
    assert deco.stats()["eval_paragraphs"] == 1
    assert not deco.is_contaminated(WORDS12)
    assert deco.is_contaminated("intro line\n" + WORDS13.title())
    # Not checked: a 12-word training paragraph is never looked up, even if present.
    bloom = BloomFilter.for_items(10)
    bloom.add(WORDS12)
    assert not Decontaminator(bloom).is_contaminated(WORDS12)
    assert Decontaminator(bloom, min_words=12).is_contaminated(WORDS12.upper())
    # A 13-word paragraph split over two lines is two short paragraphs.
    assert not deco.is_contaminated(
        " ".join(WORDS13.split()[:7]) + "\n" + " ".join(WORDS13.split()[7:])
    )


def test_eval_files_zst_glob_and_bad_lines(tmp_path):
    write_corpus(str(tmp_path / "ev_a.jsonl.zst"), n_docs=10, seed=1)
    bad = tmp_path / "ev_b.jsonl"
    bad.write_bytes(b'{"body": "x"}\n' + json.dumps({"body": WORDS13}).encode() + b"\n{oops\n")
    pattern = str(tmp_path / "ev_*")
    with pytest.raises(DataFormatError, match=f"{bad}:1:"):
        Decontaminator.from_eval_files([pattern])
    counter = BadLineCounter()
    deco = Decontaminator.from_eval_files([pattern], on_bad_line="skip", bad_lines=counter)
    assert counter.counts == {"missing_text": 2, "invalid_json": 1}  # counted once
    first = next(iter_documents(1, seed=1))["text"]
    assert deco.is_contaminated(first) == bool(paragraphs(first))
    by_body = Decontaminator.from_eval_files([str(bad)], text_key="body", on_bad_line="skip")
    assert by_body.is_contaminated(WORDS13) and by_body.stats()["eval_paragraphs"] == 1


def test_empty_eval_set_flags_nothing(tmp_path):
    deco = Decontaminator.from_eval_files([_write_jsonl(tmp_path / "e.jsonl", ["short", ""])])
    assert deco.stats()["eval_paragraphs"] == 0
    assert not any(deco.is_contaminated(d["text"]) for d in iter_documents(50, seed=3))
