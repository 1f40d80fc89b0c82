"""Tokenizer layer: SentencePiece and HF `tokenizers` JSON behind one interface."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

from megablocks_ablate.data.tokenizer import (
    HF_EOD_CANDIDATES,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from megablocks_ablate.errors import TokenizerError

TEXTS = [
    "The partition of a corpus into base units.",
    "Seed model, unit models, and a merged model.",
    "",
    "Perplexity of the macro average is 12.5 on held-out text.",
]
ASCII_TEXT = "Parameter averages of unit models predict mixture perplexity."


# --------------------------------------------------------------------------- SentencePiece
def test_sentencepiece_load_and_describe(sp_model_path):
    tok = load_tokenizer(sp_model_path)
    assert isinstance(tok, SentencePieceTokenizer)
    d = tok.describe()
    assert d == {
        "kind": "sentencepiece",
        "path": sp_model_path,
        "vocab_size": 512,
        "eod_id": 2,
        "fingerprint": tok.fingerprint,
    }
    assert json.loads(json.dumps(d)) == d
    assert len(tok.fingerprint) == 64 and int(tok.fingerprint, 16) >= 0
    assert tok.decode([tok.eod_id]) == "" and tok._sp.id_to_piece(tok.eod_id) == "</s>"


def test_sentencepiece_deterministic_across_instances(sp_model_path):
    a, b = load_tokenizer(sp_model_path), load_tokenizer(sp_model_path)
    assert a.fingerprint == b.fingerprint
    for t in TEXTS:
        assert a.encode(t) == b.encode(t)
    ids = a.encode(ASCII_TEXT)
    assert ids and all(0 <= i < a.vocab_size for i in ids)


def test_encode_and_fingerprint_equal_in_subprocess(sp_model_path):
    tok = load_tokenizer(sp_model_path)
    code = (
        "import json, sys\n"
        "from megablocks_ablate.data.tokenizer import load_tokenizer\n"
        "import os\n"
        "t = load_tokenizer(sys.argv[1])\n"
        "print(json.dumps([t.fingerprint, t.encode(sys.argv[2]),\n"
        "                  os.environ.get('TOKENIZERS_PARALLELISM')]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    out = subprocess.run(
        [sys.executable, "-c", code, sp_model_path, ASCII_TEXT],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    fingerprint, ids, parallelism = json.loads(out)
    assert fingerprint == tok.fingerprint
    assert ids == tok.encode(ASCII_TEXT)
    # Importing the module keeps HF tokenizers off its own thread pool in workers.
    assert parallelism == "false"


def test_fingerprint_independent_of_path(sp_model_path, tmp_path):
    copy = tmp_path / "elsewhere.model"
    copy.write_bytes(open(sp_model_path, "rb").read())
    assert load_tokenizer(str(copy)).fingerprint == load_tokenizer(sp_model_path).fingerprint


def test_encode_document_batch_decode(sp_model_path):
    tok = load_tokenizer(sp_model_path)
    doc = tok.encode_document(ASCII_TEXT)
    assert doc[-1] == tok.eod_id and doc[:-1] == tok.encode(ASCII_TEXT)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch([]) == []
    assert tok.decode(tok.encode(ASCII_TEXT)) == ASCII_TEXT
    assert tok.eod_id not in tok.encode(ASCII_TEXT)


def test_pickle_round_trip(sp_model_path):
    tok = load_tokenizer(sp_model_path)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint == tok.fingerprint and clone.encode_batch(TEXTS) == tok.encode_batch(
        TEXTS
    )


def test_sentencepiece_eod_token_override(sp_model_path):
    tok = load_tokenizer(sp_model_path, eod_token="<pad>")
    assert tok.eod_id == 0
    assert tok.fingerprint != load_tokenizer(sp_model_path).fingerprint  # EOD id is hashed
    with pytest.raises(TokenizerError, match="not a piece"):
        load_tokenizer(sp_model_path, eod_token="<no-such-piece>")


@pytest.fixture(scope="module")
def trained_models(tiny_corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    a = train_sentencepiece([tiny_corpus], str(d / "a" / "tok"), vocab_size=400, num_threads=1)
    b = train_sentencepiece([tiny_corpus], str(d / "b" / "tok"), vocab_size=400, num_threads=1)
    c = train_sentencepiece([tiny_corpus], str(d / "c" / "tok"), vocab_size=450, num_threads=1)
    return a, b, c


def test_train_sentencepiece(trained_models, sp_model_path):
    a, b, c = trained_models
    assert a.endswith(os.path.join("a", "tok.model")) and os.path.isfile(a[:-6] + ".vocab")
    assert not [f for f in os.listdir(os.path.dirname(a)) if f.startswith(".")]  # no temp left
    ta, tb, tc = (load_tokenizer(p) for p in trained_models)
    assert (ta.vocab_size, tc.vocab_size) == (400, 450)
    assert ta.eod_id == 2 and ta._sp.pad_id() == 0 and ta._sp.unk_id() == 1
    assert ta._sp.bos_id() == -1
    # Same corpus and settings in another directory: identical vocabulary and fingerprint
    # (the model file itself differs: it records the temp input path).
    assert ta.fingerprint == tb.fingerprint
    assert ta.encode(ASCII_TEXT) == tb.encode(ASCII_TEXT)
    # A different vocabulary: a different fingerprint.
    assert len({ta.fingerprint, tc.fingerprint, load_tokenizer(sp_model_path).fingerprint}) == 3


def test_train_from_plain_text_unigram(tiny_corpus, tmp_path):
    import gzip

    sample = tmp_path / "sample.txt.gz"
    with open(tiny_corpus, encoding="utf-8") as f, gzip.open(sample, "wt", encoding="utf-8") as out:
        for line in f:
            out.write(json.loads(line)["text"].replace("\n", " ") + "\n")
    path = train_sentencepiece(
        [str(sample)],
        str(tmp_path / "out" / "uni.model"),
        vocab_size=420,
        model_type="unigram",
        max_documents=300,
        num_threads=1,
    )
    assert path == str(tmp_path / "out" / "uni.model")
    tok = load_tokenizer(path)
    assert (tok.vocab_size, tok.eod_id) == (420, 2)
    assert tok.decode(tok.encode(ASCII_TEXT)) == ASCII_TEXT


def test_sample_sentences_cut_long_lines():
    from megablocks_ablate.data.tokenizer import _sample_sentences

    # 15000 bytes of words, then 10000 bytes of 2-byte characters with no space.
    long_line = " ".join(["word"] * 3000) + " " + "é" * 5000
    pieces = list(_sample_sentences("short line\n\n" + long_line, max_bytes=4096))
    assert pieces[0] == "short line"
    assert all(0 < len(p.encode()) <= 4096 for p in pieces)
    assert "".join(pieces[1:]).replace(" ", "") == long_line.replace(" ", "")  # nothing lost
    words = [p for p in pieces[1:] if "word" in p]
    assert len(words) == 4 and all(p.split(" ")[-1] == "word" for p in words[:-1])  # cut at spaces


def test_train_sentencepiece_errors(tiny_corpus, tmp_path):
    with pytest.raises(TokenizerError, match="vocab"):
        train_sentencepiece([tiny_corpus], str(tmp_path / "t"), vocab_size=100_000, num_threads=1)
    with pytest.raises(TokenizerError, match="model_type"):
        train_sentencepiece([tiny_corpus], str(tmp_path / "t"), vocab_size=400, model_type="wordy")
    assert os.listdir(tmp_path) == []  # failed training leaves nothing behind


# --------------------------------------------------------------------------- Hugging Face
def _write_hf_tokenizer(path, special_tokens=("<|endoftext|>",)) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([ASCII_TEXT, *TEXTS] * 3, trainer)
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory) -> str:
    return _write_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tokenizer.json")


def test_hf_load_eod_and_encode(hf_path):
    tok = load_tokenizer(hf_path)
    assert isinstance(tok, HFTokenizer) and tok.kind == "hf"
    assert tok.eod_id == tok._tok.token_to_id("<|endoftext|>") == 0
    assert tok.vocab_size == tok._tok.get_vocab_size(with_added_tokens=True)
    ids = tok.encode(ASCII_TEXT)
    assert tok.eod_id not in ids and tok.decode(ids) == ASCII_TEXT
    assert tok.encode_document(ASCII_TEXT) == ids + [tok.eod_id]
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    # The directory form finds tokenizer.json.
    assert load_tokenizer(os.path.dirname(hf_path)).fingerprint == tok.fingerprint


def test_hf_fingerprint_stable_and_sensitive(hf_path, tmp_path):
    a, b = load_tokenizer(hf_path), load_tokenizer(hf_path)
    assert a.fingerprint == b.fingerprint
    assert pickle.loads(pickle.dumps(a)).fingerprint == a.fingerprint
    # Same content re-serialized (key order, indentation, another name): same fingerprint.
    spec = json.load(open(hf_path, encoding="utf-8"))
    moved = tmp_path / "renamed.json"
    moved.write_text(json.dumps(dict(reversed(list(spec.items())))), encoding="utf-8")
    assert load_tokenizer(str(moved)).fingerprint == a.fingerprint
    # One vocabulary entry renamed: a different fingerprint.
    vocab = spec["model"]["vocab"]
    victim = max(vocab, key=vocab.get)
    vocab["zzz-new-piece"] = vocab.pop(victim)
    spec["model"]["merges"] = [
        m
        for m in spec["model"]["merges"]
        if "".join(m if isinstance(m, list) else m.split(" ")) != victim
    ]
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(spec), encoding="utf-8")
    assert load_tokenizer(str(changed)).fingerprint != a.fingerprint


def test_hf_fingerprint_same_for_old_merges_format(hf_path, tmp_path):
    # Older `tokenizers` save BPE merges as "a b" strings, newer as ["a", "b"] pairs.
    spec = json.load(open(hf_path, encoding="utf-8"))
    merges = spec["model"]["merges"]
    assert merges and isinstance(merges[0], list)
    spec["model"]["merges"] = [" ".join(m) for m in merges]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(spec), encoding="utf-8")
    a, b = load_tokenizer(hf_path), load_tokenizer(str(old))
    assert b.fingerprint == a.fingerprint
    assert b.encode_batch(TEXTS) == a.encode_batch(TEXTS)


def test_hf_missing_eod_needs_eod_token(tmp_path):
    path = _write_hf_tokenizer(tmp_path / "tokenizer.json", special_tokens=("<sep>",))
    with pytest.raises(TokenizerError, match="eod_token") as e:
        load_tokenizer(path)
    assert path in str(e.value) and HF_EOD_CANDIDATES[0] in str(e.value)
    tok = load_tokenizer(path, eod_token="<sep>")
    assert tok.eod_id == tok._tok.token_to_id("<sep>")
    assert tok.encode_document("hi")[-1] == tok.eod_id
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(path, eod_token="<|endoftext|>")


# --------------------------------------------------------------------------- bad files
@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.model", b"\x0a\x05short", "SentencePiece"),
        ("bad.model", b"not a protobuf at all \xff\xfe", "SentencePiece"),
        ("empty.model", b"", "SentencePiece"),
        ("config.json", b'{"model_max_length": 2048}', "tokenizer.json"),
        ("broken.json", b'{"model": {"type": "BPE", "vocab": ', "invalid JSON"),
        ("weird.json", b'{"model": {"type": "Nope"}}', "tokenizer.json"),
        ("vocab.txt", b"a\nb\n", "expected a SentencePiece .model"),
    ],
)
def test_bad_files_name_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(str(path))
    assert str(path) in str(e.value) and expected in str(e.value)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        load_tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))


# --------------------------------------------------------------------------- CLI
def test_cli_train_info_encode(tiny_corpus, tmp_path, capsys):
    from megablocks_ablate.cli import main

    out = tmp_path / "cli" / "tok"
    rc = main(
        [
            "tokenizer",
            "train",
            "--input",
            tiny_corpus,
            "--vocab-size",
            "400",
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    model_path, fp_line = capsys.readouterr().out.strip().splitlines()
    assert model_path == str(out) + ".model"
    tok = load_tokenizer(model_path)
    assert fp_line == f"fingerprint {tok.fingerprint}"

    assert main(["tokenizer", "info", model_path]) == 0
    assert json.loads(capsys.readouterr().out) == tok.describe()

    assert main(["tokenizer", "encode", model_path, ASCII_TEXT, "--document"]) == 0
    assert json.loads(capsys.readouterr().out) == tok.encode_document(ASCII_TEXT)

    bad = tmp_path / "bad.model"
    bad.write_bytes(b"junk")
    assert main(["tokenizer", "info", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


# ---- lineage records: extra["tokenizer"] ---------------------------------------------------
def test_tokenizer_record_forms_old_and_new(tmp_path, monkeypatch):
    from megablocks_ablate.data.tokenizer import recorded_tokenizer, tokenizer_record

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tok.model").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    # relative paths: the working directory's if it exists there, else the base's
    assert tokenizer_record("data/tok.model", "fp") == {
        "path": str(tmp_path / "data" / "tok.model"),
        "fingerprint": "fp",
    }
    rec = tokenizer_record("tok.model", "fp", base=str(tmp_path / "data"))
    assert rec["path"] == str(tmp_path / "data" / "tok.model")
    # read: the record, a describe(), an old bare path; nothing usable -> None
    assert recorded_tokenizer({"tokenizer": rec}) == rec
    describe = {"kind": "sentencepiece", "path": "/t.model", "vocab_size": 8, "fingerprint": "f"}
    assert recorded_tokenizer({"tokenizer": describe}) == {"path": "/t.model", "fingerprint": "f"}
    assert recorded_tokenizer({"tokenizer": "/t.model"}) == {
        "path": "/t.model",
        "fingerprint": None,
    }
    for extra in ({}, {"tokenizer": ""}, {"tokenizer": {"fingerprint": "f"}}, None, []):
        assert recorded_tokenizer(extra) is None


def test_inherited_record_takes_first_input_with_the_fingerprint():
    from megablocks_ablate.data.tokenizer import inherited_tokenizer_record

    extras = [{}, {"tokenizer": {"path": "/x", "fingerprint": "other"}}, {"tokenizer": "/t"}]
    assert inherited_tokenizer_record(extras, "fp") == {"path": "/t", "fingerprint": "fp"}
    assert inherited_tokenizer_record([{}], "fp") is None


def test_find_recorded_tokenizer_walks_parents_and_checks_fingerprint(sp_model_path, tmp_path):
    from types import SimpleNamespace

    from megablocks_ablate.data.tokenizer import find_recorded_tokenizer
    from megablocks_ablate.errors import ConfigError

    fp = load_tokenizer(sp_model_path).fingerprint

    def lin(extra=None, parents=(), fingerprint=fp):
        return SimpleNamespace(
            extra=extra or {}, parents=list(parents), tokenizer_fingerprint=fingerprint
        )

    unit = tmp_path / "unit"
    unit.mkdir()
    lineages = {str(unit): lin({"tokenizer": sp_model_path})}
    merged = lin(parents=[str(unit)])
    assert find_recorded_tokenizer(merged, "m", lineages.__getitem__).fingerprint == fp
    with pytest.raises(ConfigError, match="records no tokenizer.*pass --tokenizer"):
        find_recorded_tokenizer(merged, "m")  # parents not read
    gone = lin({"tokenizer": str(tmp_path / "gone.model")})
    with pytest.raises(ConfigError, match="gone"):
        find_recorded_tokenizer(gone, "g")
    wrong = lin({"tokenizer": sp_model_path}, fingerprint="ab" * 32)
    with pytest.raises(TokenizerError, match="tokenizer fingerprint.*abababab"):
        find_recorded_tokenizer(wrong, "w")


def test_find_recorded_tokenizer_uses_the_matching_file_of_an_hf_export(sp_model_path, tmp_path):
    """import-hf of our export records tokenizer.json; the lineage holds the SentencePiece
    fingerprint, which the tokenizer.model beside it has."""
    from types import SimpleNamespace

    from megablocks_ablate.data.hf_tokenizer import write_hf_tokenizer
    from megablocks_ablate.data.tokenizer import find_recorded_tokenizer

    tok = load_tokenizer(sp_model_path)
    write_hf_tokenizer(tok, str(tmp_path))
    with open(sp_model_path, "rb") as f:
        (tmp_path / "tokenizer.model").write_bytes(f.read())
    lineage = SimpleNamespace(
        extra={"tokenizer": str(tmp_path / "tokenizer.json")},
        parents=[],
        tokenizer_fingerprint=tok.fingerprint,
    )
    found = find_recorded_tokenizer(lineage, "imported")
    assert found.kind == "sentencepiece" and found.fingerprint == tok.fingerprint
