"""Indexed dataset (.bin/.idx): round trip, byte layout, concatenation, abort, corruption, CLI."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings

import numpy as np
import pytest

from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.data import indexed
from megablocks_ablate.data.indexed import (
    CODE_OF_DTYPE,
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
    check_token_range,
    concat_indexed,
    validate_indexed,
)
from megablocks_ablate.errors import DataFormatError


def random_docs(seed: int, n: int, high: int) -> list[np.ndarray]:
    """Documents of varied lengths, including 0 and 1, with ids in [0, high)."""
    rng = np.random.default_rng(seed)
    lengths = [0, 1, *rng.integers(0, 40, size=n - 2)]
    return [rng.integers(0, high, size=k) for k in lengths]


def write_docs(prefix: str, docs, dtype) -> None:
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny blocks so spilling and blockwise checks cross many block boundaries."""
    monkeypatch.setattr(indexed, "_BLOCK", 5)


def test_dtype_codes_and_best_dtype():
    assert {c: d.name for c, d in DTYPE_CODES.items()} == {
        1: "uint8",
        2: "int8",
        3: "int16",
        4: "int32",
        5: "int64",
        6: "float64",
        7: "float32",
        8: "uint16",
    }
    assert all(CODE_OF_DTYPE[d] == c for c, d in DTYPE_CODES.items())
    assert best_dtype(32000) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(50277 * 2) == np.int32


@pytest.mark.parametrize("dtype,high", [(np.uint16, 65536), (np.int32, 2**31 - 1)])
@pytest.mark.parametrize("as_list", [False, True])
def test_round_trip(tmp_path, dtype, high, as_list, small_blocks):
    docs = random_docs(0, 60, high)
    prefix = str(tmp_path / "rt")
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d.tolist() if as_list else d)
        assert w.num_sequences == len(docs) and w.num_tokens == sum(map(len, docs))
    with IndexedDataset(prefix) as ds:
        assert len(ds) == len(docs) and ds.num_documents == len(docs)
        assert ds.dtype == dtype and ds.num_tokens == sum(map(len, docs))
        for i, d in enumerate(docs):
            assert ds[i].dtype == dtype
            np.testing.assert_array_equal(ds[i], d)
        np.testing.assert_array_equal(ds[-1], docs[-1])
        np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))
        np.testing.assert_array_equal(ds.sequence_lengths, [len(d) for d in docs])
        assert not ds[5].flags.writeable  # zero-copy view of a read-only map
        k = 2 + int(np.argmax([len(d) for d in docs[2:]]))
        np.testing.assert_array_equal(ds.get(k, 3, 4), docs[k][3:7])
        np.testing.assert_array_equal(ds.get(k, 3), docs[k][3:])
        with pytest.raises(IndexError):
            ds[len(docs)]
        with pytest.raises(IndexError):
            ds.get(k, 1, len(docs[k]))
        clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers reopen by prefix
        assert len(clone) == len(ds) and np.array_equal(clone[k], docs[k])
        clone.close()
    assert validate_indexed(prefix) == {
        "sequences": len(docs),
        "documents": len(docs),
        "tokens": sum(map(len, docs)),
        "dtype": np.dtype(dtype).name,
    }
    assert sorted(os.listdir(tmp_path)) == ["rt.bin", "rt.idx"]  # no temp or spill files left


def test_multi_item_documents(tmp_path, small_blocks):
    docs = [[[1, 2, 3], [4], []], [], [[5, 6]], [[7], [8, 9], [10], [11], [12], [13, 14]]]
    prefix = str(tmp_path / "mi")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for doc in docs:
            for item in doc:
                w.add_item(item)
            w.end_document()
        w.add_document([15])
        assert w.num_documents == len(docs) + 1
    with IndexedDataset(prefix) as ds:
        items = [item for doc in docs for item in doc] + [[15]]
        assert [ds[i].tolist() for i in range(len(ds))] == items
        assert ds.document_indices.tolist() == [0, 3, 3, 4, 10, 11]
    with IndexedDatasetWriter(prefix, np.uint16) as w:  # finalize closes an open document
        w.add_item([1])
        w.add_item([2, 3])
    with IndexedDataset(prefix) as ds:
        assert ds.document_indices.tolist() == [0, 2] and ds.num_tokens == 3


def test_add_document_inside_open_document_raises(tmp_path):
    with pytest.raises(RuntimeError, match="end_document"):
        with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as w:
            w.add_item([1])
            w.add_document([2])
    assert os.listdir(tmp_path) == []


def parse_idx_independently(path: str):
    """Read an .idx straight from the Megatron layout with struct (not our parser)."""
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    (n,) = struct.unpack_from("<Q", raw, 18)
    (d,) = struct.unpack_from("<Q", raw, 26)
    off = 34
    lengths = list(struct.unpack_from(f"<{n}i", raw, off))
    off += 4 * n
    pointers = list(struct.unpack_from(f"<{n}q", raw, off))
    off += 8 * n
    doc_idx = list(struct.unpack_from(f"<{d}q", raw, off))
    off += 8 * d
    assert off == len(raw), "no trailing bytes"
    return version, code, lengths, pointers, doc_idx


@pytest.mark.parametrize("dtype,code,fmt", [(np.uint16, 8, "H"), (np.int32, 4, "i")])
def test_byte_layout(tmp_path, dtype, code, fmt, small_blocks):
    docs = [[3, 1, 4], [], [1], [5, 9, 2, 6, 5], [35000 if fmt == "H" else 70000, 0]]
    prefix = str(tmp_path / "layout")
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs[:3]:
            w.add_document(d)
        w.add_item(docs[3])
        w.add_item(docs[4])
        w.end_document()
    version, got_code, lengths, pointers, doc_idx = parse_idx_independently(prefix + ".idx")
    size = struct.calcsize("<" + fmt)
    assert version == 1 and got_code == code
    assert lengths == [3, 0, 1, 5, 2]
    assert pointers == [0, 3 * size, 3 * size, 4 * size, 9 * size]
    assert doc_idx == [0, 1, 2, 3, 5]
    with open(prefix + ".bin", "rb") as f:
        assert f.read() == b"".join(struct.pack(f"<{len(d)}{fmt}", *d) for d in docs)


def test_concat_equals_single_write(tmp_path, small_blocks):
    docs = random_docs(1, 40, 30000)
    parts = [docs[:7], docs[7:8], [], docs[8:]]
    prefixes = []
    for k, part in enumerate(parts):
        prefixes.append(str(tmp_path / f"part{k}"))
        write_docs(prefixes[-1], part, np.uint16)
    write_docs(str(tmp_path / "whole"), docs, np.uint16)
    concat_indexed(prefixes, str(tmp_path / "cat"))
    for ext in (".idx", ".bin"):
        with open(tmp_path / f"cat{ext}", "rb") as a, open(tmp_path / f"whole{ext}", "rb") as b:
            assert a.read() == b.read()


def test_concat_keeps_multi_item_documents(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with IndexedDatasetWriter(a, np.int32) as w:
        w.add_item([1])
        w.add_item([2])
        w.end_document()
    with IndexedDatasetWriter(b, np.int32) as w:
        w.add_document([3])
        w.add_item([4])
        w.add_item([5])
        w.end_document()
    concat_indexed([a, b], str(tmp_path / "c"))
    with IndexedDataset(str(tmp_path / "c")) as ds:
        assert ds.document_indices.tolist() == [0, 2, 3, 5]
        assert [ds[i].tolist() for i in range(len(ds))] == [[1], [2], [3], [4], [5]]


def test_concat_rejects_mixed_dtypes(tmp_path):
    write_docs(str(tmp_path / "u16"), [[1, 2]], np.uint16)
    write_docs(str(tmp_path / "i32"), [[1, 2]], np.int32)
    with pytest.raises(DataFormatError, match=r"i32\.idx has dtype int32; expected uint16"):
        concat_indexed([str(tmp_path / "u16"), str(tmp_path / "i32")], str(tmp_path / "out"))
    assert not (tmp_path / "out.idx").exists() and not (tmp_path / "out.bin").exists()


def test_writer_aborts_on_exception(tmp_path, small_blocks):
    prefix = str(tmp_path / "sub" / "aborted")
    with pytest.raises(KeyError):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for d in random_docs(2, 30, 100):  # enough to spill lengths to temp files
                w.add_document(d)
            raise KeyError("boom")
    assert os.listdir(tmp_path / "sub") == []


def test_writer_replaces_existing_dataset(tmp_path):
    prefix = str(tmp_path / "r")
    write_docs(prefix, [[1, 2, 3]] * 4, np.uint16)
    write_docs(prefix, [[7]], np.uint16)
    with IndexedDataset(prefix) as ds:
        assert len(ds) == 1 and ds[0].tolist() == [7]


@pytest.mark.parametrize(
    "tokens,dtype,message",
    [
        ([1, 65536], np.uint16, r"token id 65536 outside the uint16 range \[0, 65535\]"),
        ([-1, 3], np.uint16, r"token id -1 outside the uint16 range"),
        (
            np.array([255, 256], dtype=np.int32),
            np.uint8,
            r"token id 256 outside the uint8 range \[0, 255\]",
        ),
        (
            np.array([2**31], dtype=np.int64),
            np.int32,
            r"token id 2147483648 outside the int32 range",
        ),
        ([1.5, 2.0], np.uint16, r"dtype float64; expected integer token ids"),
        ([[1, 2]], np.uint16, r"shape \(1, 2\); expected a 1-D sequence"),
    ],
)
def test_writer_rejects_tokens_that_do_not_fit(tmp_path, tokens, dtype, message):
    prefix = str(tmp_path / "bad")
    with pytest.raises(
        DataFormatError, match=re.escape(prefix + ".bin: sequence 1") + ".*" + message
    ):
        with IndexedDatasetWriter(prefix, dtype) as w:
            w.add_document([0])
            w.add_document(tokens)
    assert os.listdir(tmp_path) == []


def test_writer_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(DataFormatError, match="token dtype uint32 is not supported"):
        IndexedDatasetWriter(str(tmp_path / "x"), np.uint32)


# --- corruption: each case names the file and what is wrong --------------------------

DOCS = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]  # N = 4, D = 5, 10 uint16 tokens
N, D = 4, 5
LEN_OFF, PTR_OFF, DOC_OFF = 34, 34 + 4 * N, 34 + 12 * N


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


# case: (file to corrupt, corruption, expected message after the file name)
CORRUPTIONS = {
    "bad magic": (
        ".idx",
        lambda p: patch(p, 0, b"NOTMMIDX\x00"),
        r"bad magic b'NOTMMIDX\\x00'; expected",
    ),
    "version": (
        ".idx",
        lambda p: patch(p, 9, struct.pack("<Q", 2)),
        "unsupported version 2; expected 1",
    ),
    "dtype code": (
        ".idx",
        lambda p: patch(p, 17, b"\x09"),
        "unknown dtype code 9; expected one of 1=uint8",
    ),
    "short header": (
        ".idx",
        lambda p: truncate(p, 20),
        "truncated: 20 bytes, shorter than the 34-byte header",
    ),
    "truncated idx": (
        ".idx",
        lambda p: truncate(p, DOC_OFF + 8 * D - 3),
        f"truncated: it declares {N} sequences and {D} document indices, which need "
        f"{DOC_OFF + 8 * D} bytes, but the file has {DOC_OFF + 8 * D - 3} bytes",
    ),
    "huge count": (
        ".idx",
        lambda p: patch(p, 18, struct.pack("<Q", 2**40)),
        "truncated: it declares 1099511627776 sequences",
    ),
    "trailing bytes": (".idx", lambda p: append(p, b"\x00" * 5), "has 5 trailing bytes"),
    "docs start": (
        ".idx",
        lambda p: patch(p, DOC_OFF, struct.pack("<q", 1)),
        "document indices start at 1; expected 0",
    ),
    "docs end": (
        ".idx",
        lambda p: patch(p, DOC_OFF + 8 * (D - 1), struct.pack("<q", 3)),
        r"document indices end at 3; expected 4 \(the sequence count\)",
    ),
    "docs decrease": (
        ".idx",
        lambda p: patch(p, DOC_OFF + 16, struct.pack("<q", 0)),
        r"document indices decrease at position 2 \(1 then 0\)",
    ),
    "negative length": (
        ".idx",
        lambda p: patch(p, LEN_OFF + 8, struct.pack("<i", -1)),
        "sequence 2 has negative length -1",
    ),
    "pointer": (
        ".idx",
        lambda p: patch(p, PTR_OFF + 24, struct.pack("<q", 14)),
        "sequence 3 has pointer 14; expected byte offset 12",
    ),
    "length vs pointer": (
        ".idx",
        lambda p: patch(p, LEN_OFF, struct.pack("<i", 4)),
        "sequence 1 has pointer 6; expected byte offset 8",
    ),
    "truncated bin": (
        ".bin",
        lambda p: truncate(p, 18),
        r"has 18 bytes; expected 20 \(10 uint16 tokens .*truncated",
    ),
    "long bin": (
        ".bin",
        lambda p: append(p, b"\x00\x00"),
        "has 22 bytes; expected 20 .*longer than its index",
    ),
    # these name the file inside the sentence: {path} marks where
    "missing idx": (
        ".idx",
        os.unlink,
        "^index file {path} not found: an indexed dataset needs both",
    ),
    "missing bin": (".bin", os.unlink, "^data file {path} not found"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_is_reported(tmp_path, case):
    ext, corrupt, message = CORRUPTIONS[case]
    prefix = str(tmp_path / "c")
    write_docs(prefix, DOCS, np.uint16)
    corrupt(prefix + ext)
    path = re.escape(prefix + ext)
    pattern = message.format(path=path) if "{path}" in message else path + ".*" + message
    with pytest.raises(DataFormatError, match=pattern):
        IndexedDataset(prefix)
    with pytest.raises(DataFormatError, match=pattern):
        validate_indexed(prefix)


def test_decreasing_docs_across_blocks(tmp_path, small_blocks):
    prefix = str(tmp_path / "c")
    write_docs(prefix, [[k] for k in range(12)], np.uint16)
    n = 12
    # [0, 1, 2, 3, 4, 3, 6, ...]: the drop straddles the first block boundary
    patch(prefix + ".idx", 34 + 12 * n + 8 * 5, struct.pack("<q", 3))
    with pytest.raises(DataFormatError, match=r"decrease at position 5 \(4 then 3\)"):
        IndexedDataset(prefix)


# --- CLI ----------------------------------------------------------------------------


def test_cli_info_validate_concat(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_docs(a, [[1, 2, 3], [4]], np.uint16)
    write_docs(b, [[5, 6]], np.uint16)
    assert cli_main(["index", "info", a + ".idx"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sequences"] == 2 and info["tokens"] == 4 and info["dtype"] == "uint16"
    assert info["sequence_length"]["max"] == 3 and info["sequence_length"]["mean"] == 2.0

    assert cli_main(["index", "validate", a, b + ".bin"]) == 0
    assert cli_main(["index", "concat", "--out", str(tmp_path / "ab.idx"), a, b]) == 0
    with IndexedDataset(str(tmp_path / "ab")) as ds:
        assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3], [4], [5, 6]]

    truncate(b + ".bin", 2)
    capsys.readouterr()
    assert cli_main(["index", "validate", a, b]) == 2
    err = capsys.readouterr().err
    assert "b.bin has 2 bytes; expected 4" in err and "1 of 2 datasets invalid" in err
    assert cli_main(["index", "info", b]) == 2
    assert cli_main(["index", "concat", "--out", str(tmp_path / "x"), a, b]) == 2
    assert not (tmp_path / "x.idx").exists()


# --- token ids against a vocabulary ------------------------------------------------


def test_check_token_range_names_file_sequence_document_id_and_vocab(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "_TOKEN_CHUNK", 4)  # the bad id lies several chunks in
    prefix = str(tmp_path / "u")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document([1, 2, 3])
        w.add_document([])  # an empty document and sequence before the bad one
        w.add_item([4, 5])
        w.add_item([6, 7, 511, 600, 700])  # 600 is the first id >= 512
        w.end_document()
    check_token_range(prefix, 701)  # all ids fit a larger vocabulary
    want = (
        re.escape(prefix + ".bin") + r": sequence 3 \(document 2\) has token id 600 at "
        r"offset 3; the tokenizer's vocabulary has 512 ids \(valid ids are 0\.\.511\)"
    )
    with pytest.raises(DataFormatError, match=want):
        check_token_range(prefix, 512)
    with IndexedDataset(prefix) as ds:  # an open dataset is checked and left open
        with pytest.raises(DataFormatError, match=want):
            check_token_range(ds, 512)
        assert ds[0].tolist() == [1, 2, 3]
    with pytest.raises(DataFormatError, match=r"sequence 0 \(document 0\) has token id 1 "):
        validate_indexed(prefix, vocab_size=1)


def test_check_token_range_catches_negative_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "_TOKEN_CHUNK", 3)
    prefix = str(tmp_path / "s")
    write_docs(prefix, [[0, 1], [2, 3, -7, 9]], np.int32)
    with pytest.raises(
        DataFormatError, match=r"sequence 1 \(document 1\) has token id -7 at offset 2"
    ):
        check_token_range(prefix, 100)


def test_cli_validate_checks_ids_against_the_tokenizer(tmp_path, capsys, sp_model_path):
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    write_docs(good, [[1, 2, 511]], np.uint16)
    write_docs(bad, [[1, 2], [3, 512]], np.uint16)  # the tokenizer has 512 pieces
    assert cli_main(["index", "validate", good, bad]) == 0  # no vocabulary: not checked
    capsys.readouterr()
    assert cli_main(["index", "validate", "--tokenizer", sp_model_path, good, bad]) == 2
    out, err = capsys.readouterr()
    assert f"ok {good}: 1 sequences" in out and "ids < 512" in out
    assert f"error: {bad}.bin: sequence 1 (document 1) has token id 512" in err
    assert "vocabulary has 512 ids" in err and "1 of 2 datasets invalid" in err


def test_cli_validate_checks_a_manifests_units(tmp_path, capsys, tiny_corpus, sp_model_path):
    from megablocks_ablate.data.manifest import Manifest
    from megablocks_ablate.data.preprocess import PreprocessConfig, run_preprocess

    out = str(tmp_path / "data")
    cfg = PreprocessConfig(
        input=[tiny_corpus], out=out, tokenizer=sp_model_path, partition_by=["fos"]
    )
    m = run_preprocess(cfg)
    assert m.data["tokenizer"]["vocab_size"] == 512
    assert cli_main(["index", "validate", "--manifest", out]) == 0
    assert capsys.readouterr().out.count("ids < 512") == len(m.units) == 4
    unit = sorted(m.units)[2]
    bin_path = m.unit_prefix(unit) + ".bin"
    patch(bin_path, 2 * 5, struct.pack("<H", 40000))  # token 5 of sequence 0
    assert cli_main(["index", "validate", "--manifest", out]) == 2
    err = capsys.readouterr().err
    assert f"error: {bin_path}: sequence 0 (document 0) has token id 40000 at offset 5" in err
    assert "vocabulary has 512 ids" in err
    # a PREFIX with --manifest checks just that dataset against the manifest's vocabulary
    assert cli_main(["index", "validate", "--manifest", out, m.unit_prefix(unit)]) == 2
    assert (
        cli_main(["index", "validate", "--manifest", out, m.unit_prefix(sorted(m.units)[0])]) == 0
    )
    capsys.readouterr()
    assert cli_main(["index", "validate"]) == 2
    assert "give PREFIX(es) to check, or --manifest DIR" in capsys.readouterr().err
    assert cli_main(["index", "validate", "--manifest", str(tmp_path / "nowhere")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    assert Manifest.load(out).units == m.units


def test_cli_validate_checks_a_manifests_heldout_files(
    tmp_path, capsys, tiny_corpus, sp_model_path
):
    """`index validate --manifest` also checks every held-out file against its sha256."""
    from megablocks_ablate.data.preprocess import PreprocessConfig, run_preprocess

    out = str(tmp_path / "data")
    cfg = PreprocessConfig(
        input=[tiny_corpus],
        out=out,
        tokenizer=sp_model_path,
        partition_by=["fos"],
        heldout_fraction=0.2,
    )
    m = run_preprocess(cfg)
    files = m.heldout_files()
    assert files  # the tiny corpus gives each partition a held-out set
    assert cli_main(["index", "validate", "--manifest", out]) == 0
    text = capsys.readouterr().out
    assert text.count("sha256 as recorded") == len(files)
    what, rec = files[0]
    path = os.path.join(m.root, rec["path"])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"text": "changed after preprocessing"}\n')
    assert cli_main(["index", "validate", "--manifest", out]) == 2
    err = capsys.readouterr().err
    assert path in err and what in err and f"1 of {len(m.units) + len(files)} datasets" in err
    os.remove(path)
    assert cli_main(["index", "validate", "--manifest", out]) == 2
    assert f"{path}: missing ({what}" in capsys.readouterr().err


# --- compatibility with Megatron-LM core itself (when installed) --------------------


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def test_megatron_reads_our_files(tmp_path):
    mid = _megatron()
    prefix = str(tmp_path / "ours")
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for d in random_docs(3, 20, 100000):
            w.add_document(d)
        w.add_item([1, 2])
        w.add_item([3])
        w.end_document()
    ref = mid.IndexedDataset(prefix)
    with IndexedDataset(prefix) as ds:
        assert len(ref) == len(ds)
        np.testing.assert_array_equal(ref.document_indices, ds.document_indices)
        np.testing.assert_array_equal(ref.sequence_lengths, ds.sequence_lengths)
        for i in range(len(ds)):
            np.testing.assert_array_equal(ref[i], ds[i])


def test_we_read_megatron_files(tmp_path):
    mid = _megatron()
    import torch

    prefix = str(tmp_path / "theirs")
    docs = random_docs(4, 20, 60000)
    builder = mid.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.from_numpy(d))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    with IndexedDataset(prefix) as ds:
        assert ds.dtype == np.uint16 and len(ds) == len(docs)
        for i, d in enumerate(docs):
            np.testing.assert_array_equal(ds[i], d)
