"""Streaming JSONL reading: compression formats, line numbers, bad-line policy, errors."""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from megablocks_ablate.corpora.synthetic import iter_documents, write_corpus
from megablocks_ablate.data.jsonl import BadLineCounter, expand_inputs, iter_jsonl, iter_raw_lines
from megablocks_ablate.errors import DataFormatError


@pytest.mark.parametrize("ext", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_reads_every_format_in_order(tmp_path, ext):
    path = write_corpus(str(tmp_path / f"c.{ext}"), n_docs=50, seed=3)
    got = list(iter_jsonl(path))
    assert [rec for _, rec in got] == list(iter_documents(50, seed=3))
    assert [n for n, _ in got] == list(range(1, 51))


def test_multi_frame_zstd_reads_all_frames(tmp_path):
    a = write_corpus(str(tmp_path / "a.jsonl.zst"), n_docs=20, seed=1)
    b = write_corpus(str(tmp_path / "b.jsonl.zst"), n_docs=30, seed=2)
    both = tmp_path / "ab.jsonl.zst"
    both.write_bytes(open(a, "rb").read() + open(b, "rb").read())
    ids = [rec["id"] for _, rec in iter_jsonl(str(both))]
    assert ids == [d["id"] for d in iter_documents(20, seed=1)] + [
        d["id"] for d in iter_documents(30, seed=2)
    ]


def test_line_numbers_count_blank_lines(tmp_path):
    p = tmp_path / "gaps.jsonl"
    p.write_bytes(b'{"text": "a"}\n\n   \n{"text": "b"}\r\n\n{"text": "c"}')  # no final newline
    assert [(n, r["text"]) for n, r in iter_jsonl(str(p))] == [(1, "a"), (4, "b"), (6, "c")]


BAD_LINES = {
    "invalid_json": (b'{"text": "oops"', "invalid JSON"),
    "missing_text": (b'{"body": "no text key"}', "missing text key 'text'"),
    "bad_utf8": (b'{"text": "caf\xe9"}', "not valid UTF-8"),
    "not_an_object": (b'["text", "a list"]', "expected a JSON object"),
    "text_not_a_string": (b'{"text": 42}', "is not a string"),
}


def _file_with_bad_line(tmp_path, bad: bytes) -> str:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "good 1"}\n{"text": "good 2"}\n' + bad + b'\n{"text": "good 3"}\n')
    return str(p)


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_error_names_file_and_line(tmp_path, reason):
    bad, words = BAD_LINES[reason]
    path = _file_with_bad_line(tmp_path, bad)
    with pytest.raises(DataFormatError) as exc:
        list(iter_jsonl(path))
    assert f"{path}:3:" in str(exc.value)
    assert words in str(exc.value)


def test_skip_counts_each_reason(tmp_path):
    p = tmp_path / "many.jsonl"
    lines = (
        [b'{"text": "ok"}']
        + [bad for bad, _ in BAD_LINES.values()]
        + [BAD_LINES["invalid_json"][0], b'{"text": "ok again"}']
    )
    p.write_bytes(b"\n".join(lines) + b"\n")
    counter = BadLineCounter()
    got = [(n, r["text"]) for n, r in iter_jsonl(str(p), on_bad_line="skip", bad_lines=counter)]
    assert got == [(1, "ok"), (len(lines), "ok again")]
    assert counter.counts == {
        "invalid_json": 2,
        "missing_text": 1,
        "bad_utf8": 1,
        "not_an_object": 1,
        "text_not_a_string": 1,
    }
    assert counter.total == 6


def test_custom_text_key(tmp_path):
    p = tmp_path / "k.jsonl"
    p.write_text(json.dumps({"body": "x", "text": 1}) + "\n")
    assert [r["body"] for _, r in iter_jsonl(str(p), text_key="body")] == ["x"]


def test_rejects_unknown_policy(tmp_path):
    p = tmp_path / "k.jsonl"
    p.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="on_bad_line"):
        list(iter_jsonl(str(p), on_bad_line="ignore"))


@pytest.mark.parametrize("ext", ["jsonl.gz", "jsonl.zst"])
def test_truncated_stream_is_a_format_error(tmp_path, ext):
    full = write_corpus(str(tmp_path / f"full.{ext}"), n_docs=200, seed=4)
    data = open(full, "rb").read()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    # Even when skipping bad lines, a cut stream must not pass for a shorter corpus.
    with pytest.raises(DataFormatError, match="truncated") as exc:
        list(iter_jsonl(str(cut), on_bad_line="skip"))
    assert str(cut) in str(exc.value)


@pytest.mark.parametrize("ext", ["jsonl.gz", "jsonl.zst"])
def test_raw_lines_of_a_truncated_stream_raise_a_format_error(tmp_path, ext):
    """iter_raw_lines (what preprocess reads with) names the file, never EOFError."""
    full = write_corpus(str(tmp_path / f"full.{ext}"), n_docs=200, seed=4)
    data = open(full, "rb").read()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataFormatError, match="truncated or corrupt compressed stream") as exc:
        list(iter_raw_lines(str(cut)))
    assert str(exc.value).startswith(f"{cut}: ") and "\n" not in str(exc.value)
    with pytest.raises(DataFormatError, match="no such file"):
        list(iter_raw_lines(str(tmp_path / "absent.jsonl.gz")))


@pytest.mark.parametrize("ext", ["jsonl.gz", "jsonl.zst"])
def test_corrupt_stream_is_a_format_error(tmp_path, ext):
    full = write_corpus(str(tmp_path / f"full.{ext}"), n_docs=200, seed=4)
    data = bytearray(open(full, "rb").read())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0x5A
    bad = tmp_path / f"bad.{ext}"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataFormatError) as exc:
        list(iter_jsonl(str(bad), on_bad_line="skip"))
    assert str(bad) in str(exc.value)


def test_not_gzip_at_all(tmp_path):
    p = tmp_path / "plain_named.jsonl.gz"
    p.write_text('{"text": "x"}\n')
    with pytest.raises(DataFormatError, match="plain_named.jsonl.gz"):
        list(iter_jsonl(str(p)))


def test_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="no such file"):
        list(iter_jsonl(str(tmp_path / "absent.jsonl")))


def test_gzip_text_roundtrip_with_unicode(tmp_path):
    p = tmp_path / "u.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "naïve café — ß"}, ensure_ascii=False) + "\n")
    assert [r["text"] for _, r in iter_jsonl(str(p))] == ["naïve café — ß"]


def test_empty_zstd_file_has_no_records(tmp_path):
    p = tmp_path / "empty.jsonl.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(b""))
    assert list(iter_jsonl(str(p))) == []


def test_expand_inputs_order_sort_and_dedup(tmp_path):
    for name in ["b.jsonl", "a.jsonl", "c.jsonl.gz"]:
        (tmp_path / name).write_text("")
    (tmp_path / "dir.jsonl").mkdir()  # directories never match
    files = expand_inputs([str(tmp_path / "c.jsonl.gz"), str(tmp_path / "*.jsonl")])
    assert files == [str(tmp_path / n) for n in ["c.jsonl.gz", "a.jsonl", "b.jsonl"]]
    assert expand_inputs(str(tmp_path / "a.jsonl")) == [str(tmp_path / "a.jsonl")]
    assert expand_inputs([str(tmp_path / "a.jsonl")] * 2) == [str(tmp_path / "a.jsonl")]


@pytest.mark.parametrize("pattern", ["*.zst", "nothing.jsonl", "sub/**/*.jsonl"])
def test_expand_inputs_errors_on_no_match(tmp_path, pattern):
    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(DataFormatError, match="no such file") as exc:
        expand_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / pattern)])
    assert pattern in str(exc.value)
