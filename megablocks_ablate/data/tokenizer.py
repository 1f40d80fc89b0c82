"""Tokenizers: one interface over SentencePiece ``.model`` files and Hugging Face
``tokenizers`` JSON files, with an end-of-document (EOD) id and a fingerprint.

Every tokenized file this project writes records :meth:`Tokenizer.describe`, so data,
checkpoints and evaluations made with different vocabularies are never mixed. The
**fingerprint** is a sha256 over a canonical JSON form of everything that decides
which ids a text maps to (kind, every piece with its id, the normalizer /
pre-tokenizer / model settings, the EOD id). It does not depend on the file's path,
mtime or training provenance, so the same tokenizer gives the same fingerprint on
every machine; see ``docs/tokenizers.md``.

Preprocess calls :meth:`Tokenizer.encode_batch` from many worker processes, so each
call is single-threaded: SentencePiece gets ``num_threads=1`` and Hugging Face
``tokenizers`` is kept off its own thread pool (``TOKENIZERS_PARALLELISM=false``).
Parallelism comes from the processes, which then scale cleanly.
"""

from __future__ import annotations

import abc
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from megablocks_ablate.errors import ConfigError, DataFormatError, MBAError, TokenizerError
from megablocks_ablate.utils.hashing import sha256_json

# Must be set before `tokenizers` first runs a batch: its rayon pool would otherwise
# oversubscribe the cores already used by our worker processes (and warn on fork).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FINGERPRINT_VERSION = 1

# Tried in order when a Hugging Face tokenizer is loaded without an explicit EOD token.
HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")

# SentencePiece ids used by `train_sentencepiece` (BOS is disabled: documents are
# separated by EOD only, as in Megatron's GPT data pipeline).
SP_PAD_ID, SP_UNK_ID, SP_EOS_ID = 0, 1, 2


class Tokenizer(abc.ABC):
    """Text -> token ids, with an EOD id appended per document.

    ``encode``/``encode_batch`` never add BOS, EOS or any other special token;
    ``encode_document`` appends exactly one ``eod_id``.
    """

    kind: str
    path: str
    # Set by subclasses' __init__ (which must accept ``(path, eod_token, _data=bytes)``).
    _vocab_size: int
    _eod_id: int
    _fingerprint: str
    _eod_token: str | None
    _data: bytes

    @property
    def vocab_size(self) -> int:
        """Size of the id space (largest id + 1); decides the index dtype."""
        return self._vocab_size

    @property
    def eod_id(self) -> int:
        """Id appended after every document."""
        return self._eod_id

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the vocabulary and every setting that changes ids."""
        return self._fingerprint

    def __getstate__(self) -> dict:  # workers get the file's bytes, not a re-read of the path
        return {"path": self.path, "eod_token": self._eod_token, "data": self._data}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["eod_token"], _data=state["data"])  # type: ignore[misc]

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no EOD)."""

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, single-threaded fast path (no EOD)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``."""

    @abc.abstractmethod
    def id_to_token(self, i: int) -> str:
        """The vocabulary entry (piece / token string) of id ``i``."""

    def encode_document(self, text: str) -> list[int]:
        """Ids of one document followed by ``eod_id``."""
        ids = self.encode(text)
        ids.append(self.eod_id)
        return ids

    def describe(self) -> dict:
        """JSON-able record for manifests and checkpoints."""
        return {
            "kind": self.kind,
            "path": self.path,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "fingerprint": self.fingerprint,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"eod_id={self.eod_id}, fingerprint={self.fingerprint[:12]}...)"
        )


# --------------------------------------------------------------------------- SentencePiece
# SentencePiece stores its model as a `ModelProto` protobuf. We read the few fields the
# fingerprint needs straight from the wire format (a dozen lines) rather than depend
# on the protobuf runtime. Field numbers are from sentencepiece_model.proto.
_MP_PIECES, _MP_TRAINER, _MP_NORMALIZER, _MP_DENORMALIZER = 1, 2, 3, 5
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
# TrainerSpec fields that the *encoder/decoder* reads (the rest only steer training):
# model_type, split_digits, treat_whitespace_as_suffix, allow_whitespace_only_pieces,
# byte_fallback, unk_surface, pretokenization_delimiter.
_TRAINER_ENCODE_FIELDS = {
    3: "model_type",
    25: "split_digits",
    24: "treat_whitespace_as_suffix",
    26: "allow_whitespace_only_pieces",
    35: "byte_fallback",
    44: "unk_surface",
    53: "pretokenization_delimiter",
}
# NormalizerSpec: name, precompiled_charsmap, add_dummy_prefix, remove_extra_whitespaces,
# escape_whitespaces (field 6, normalization_rule_tsv, is a training-time file path).
_NORMALIZER_FIELDS = {
    1: "name",
    2: "precompiled_charsmap",
    3: "add_dummy_prefix",
    4: "remove_extra_whitespaces",
    5: "escape_whitespaces",
}


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; raises ValueError."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(buf) or field == 0:
            raise ValueError("truncated or malformed message")
        yield field, wire, value


def _proto_scalar(value: Any) -> Any:
    """JSON-able, platform-independent form of a raw protobuf value."""
    return value.hex() if isinstance(value, (bytes, bytearray)) else value


def _sentencepiece_canonical(model_proto: bytes) -> dict:
    """Canonical content of a SentencePiece model: pieces in id order + encode settings."""
    pieces: list[list] = []
    trainer: dict[str, Any] = {}
    normalizer: dict[str, Any] = {}
    denormalizer: dict[str, Any] = {}
    for field, _, value in _proto_fields(model_proto):
        if field == _MP_PIECES:
            text, score, ptype = "", 0.0, 1  # proto defaults; type 1 = NORMAL
            for f, _, v in _proto_fields(value):
                if f == _PIECE_TEXT:
                    text = v.decode("utf-8")
                elif f == _PIECE_SCORE:
                    score = struct.unpack("<f", v)[0]
                elif f == _PIECE_TYPE:
                    ptype = v
            pieces.append([text, score, ptype])
        elif field == _MP_TRAINER:
            for f, _, v in _proto_fields(value):
                if f in _TRAINER_ENCODE_FIELDS:
                    trainer[_TRAINER_ENCODE_FIELDS[f]] = _proto_scalar(v)
        elif field in (_MP_NORMALIZER, _MP_DENORMALIZER):
            target = normalizer if field == _MP_NORMALIZER else denormalizer
            for f, _, v in _proto_fields(value):
                if f in _NORMALIZER_FIELDS:
                    target[_NORMALIZER_FIELDS[f]] = _proto_scalar(v)
    if not pieces:
        raise ValueError("no vocabulary pieces")
    return {
        "pieces": pieces,
        "trainer": trainer,
        "normalizer": normalizer,
        "denormalizer": denormalizer,
    }


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` (BPE or unigram). EOD is the model's EOS unless
    ``eod_token`` names another piece."""

    kind = "sentencepiece"

    def __init__(self, path: str, eod_token: str | None = None, *, _data: bytes | None = None):
        import sentencepiece as spm

        self.path = os.fspath(path)
        self._eod_token = eod_token
        what = "a SentencePiece model (.model protobuf)"
        try:
            data = _data if _data is not None else _read_bytes(self.path)
        except OSError as e:
            raise TokenizerError(f"{self.path}: cannot read {what}: {e.strerror or e}") from None
        self._data = data
        try:
            canonical = _sentencepiece_canonical(data)
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except (ValueError, RuntimeError, OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{self.path}: not {what}: {e}") from None
        self._vocab_size = int(self._sp.get_piece_size())

        if eod_token is not None:
            eod = int(self._sp.piece_to_id(eod_token))
            if self._sp.id_to_piece(eod) != eod_token:
                raise TokenizerError(
                    f"{self.path}: eod_token {eod_token!r} is not a piece of "
                    f"this SentencePiece model"
                )
        else:
            eod = int(self._sp.eos_id())
            if eod < 0:
                raise TokenizerError(
                    f"{self.path}: this SentencePiece model has no EOS piece "
                    f"(eos_id=-1); pass eod_token (--eod-token) naming the "
                    f"piece that ends a document"
                )
        self._eod_id = eod
        self._fingerprint = sha256_json(
            {"version": FINGERPRINT_VERSION, "kind": self.kind, "model": canonical, "eod_id": eod}
        )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread per call: parallelism comes from preprocess worker processes.
        return self._sp.encode(list(texts), out_type=int, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_token(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


# --------------------------------------------------------------------------- Hugging Face
# Parts of tokenizer.json that decide ids. Truncation/padding are turned off (we
# tokenize whole documents); post_processor is not applied (no special tokens added);
# the decoder only affects decode().
_HF_ID_KEYS = ("normalizer", "pre_tokenizer", "model", "added_tokens")
_HF_ADDED_TOKEN_KEYS = ("id", "content", "special", "single_word", "lstrip", "rstrip", "normalized")


def _hf_canonical(spec: dict) -> dict:
    """The id-deciding part of a tokenizer.json, normalized across library versions."""
    out = {k: spec.get(k) for k in _HF_ID_KEYS}
    model = dict(out["model"] or {})
    # Newer `tokenizers` save BPE merges as ["a", "b"] pairs, older as "a b" strings.
    merges = model.get("merges")
    if isinstance(merges, list):
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    out["model"] = model
    out["added_tokens"] = [
        {k: t.get(k) for k in _HF_ADDED_TOKEN_KEYS} for t in (out["added_tokens"] or [])
    ]
    return out


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` JSON file (e.g. GPT-NeoX-20B's ``tokenizer.json``).

    Encoding adds no special tokens (the post-processor's BOS etc. are not applied);
    EOD is ``eod_token`` or the first of :data:`HF_EOD_CANDIDATES` in the vocabulary.
    """

    kind = "hf"

    def __init__(self, path: str, eod_token: str | None = None, *, _data: str | None = None):
        from tokenizers import Tokenizer as _HFTok

        self.path = os.fspath(path)
        self._eod_token = eod_token
        what = "a Hugging Face tokenizers JSON file (tokenizer.json)"
        try:
            text = _data if _data is not None else _read_bytes(self.path).decode("utf-8")
        except OSError as e:
            raise TokenizerError(f"{self.path}: cannot read {what}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise TokenizerError(f"{self.path}: not {what}: not UTF-8 text") from None
        self._data = text
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{self.path}: not {what}: invalid JSON ({e})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise TokenizerError(
                f"{self.path}: not {what}: no 'model' object "
                f"(tokenizer_config.json and vocab.json are not enough)"
            )
        try:
            tok = _HFTok.from_str(text)
        except Exception as e:  # the Rust side raises a plain Exception
            raise TokenizerError(f"{self.path}: not {what}: {e}") from None
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"{self.path}: {what} has an empty vocabulary")
        self._vocab_size = max(vocab.values()) + 1

        if eod_token is not None:
            if eod_token not in vocab:
                raise TokenizerError(
                    f"{self.path}: eod_token {eod_token!r} is not in the vocabulary"
                )
        else:
            eod_token = next((t for t in HF_EOD_CANDIDATES if t in vocab), None)
            if eod_token is None:
                raise TokenizerError(
                    f"{self.path}: no end-of-document token found (looked for "
                    f"{', '.join(HF_EOD_CANDIDATES)}); pass eod_token (--eod-token) naming "
                    f"the token that ends a document"
                )
        self._eod_id = int(vocab[eod_token])
        self._fingerprint = sha256_json(
            {
                "version": FINGERPRINT_VERSION,
                "kind": self.kind,
                "model": _hf_canonical(spec),
                "eod_id": self._eod_id,
            }
        )
        # encode_batch_fast (tokenizers >= 0.20) skips offset tracking we never use.
        self._batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, i: int) -> str:
        token = self._tok.id_to_token(int(i))
        if token is None:
            raise TokenizerError(f"{self.path}: id {i} is not in the vocabulary")
        return token


# --------------------------------------------------------------------------- loading
def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load_tokenizer(path: str | os.PathLike, eod_token: str | None = None) -> Tokenizer:
    """Load ``*.model`` (SentencePiece), ``*.json`` (HF tokenizers), or a directory
    holding ``tokenizer.json`` (preferred) or ``tokenizer.model``."""
    path = os.fspath(path)
    expected = (
        "expected a SentencePiece .model file, a Hugging Face tokenizer.json, "
        "or a directory containing one"
    )
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return load_tokenizer(candidate, eod_token)
        raise TokenizerError(
            f"{path}: directory has no tokenizer.json or tokenizer.model; {expected}"
        )
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: no such tokenizer file; {expected}")
    if path.endswith(".model"):
        return SentencePieceTokenizer(path, eod_token)
    if path.endswith(".json"):
        return HFTokenizer(path, eod_token)
    raise TokenizerError(f"{path}: unknown tokenizer file type; {expected}")


# --------------------------------------------------------------------------- training
def _iter_sample_texts(files: list[str], text_key: str) -> Iterator[str]:
    """Documents of the inputs: JSONL records' ``text_key``, or lines of .txt files."""
    from megablocks_ablate.data.jsonl import iter_jsonl, open_binary

    for path in files:
        base = path[:-3] if path.endswith(".gz") else path
        base = base[:-4] if base.endswith(".zst") else base
        if base.endswith(".txt"):
            with open_binary(path) as fh:
                for raw in fh:
                    yield raw.decode("utf-8", errors="replace")
        else:
            for _, rec in iter_jsonl(path, text_key=text_key, on_bad_line="skip"):
                yield rec[text_key]


def _sample_sentences(text: str, max_bytes: int) -> Iterator[str]:
    """Lines of a document, long ones cut at spaces so SentencePiece does not drop them."""
    for line in text.splitlines():
        line = line.strip()
        while len(line.encode("utf-8")) > max_bytes:
            head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
            cut = head.rfind(" ")
            cut = cut if cut > 0 else len(head)
            yield line[:cut]
            line = line[cut:].lstrip()
        if line:
            yield line


_MAX_SENTENCE_BYTES = 4096  # longer sample lines are cut (SentencePiece drops them)


def _check_train_args(model_type: str, vocab_size: int) -> None:
    """Refuse a model type other than bpe/unigram and a vocabulary under 8 pieces."""
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type: expected 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size < 8:
        raise TokenizerError(f"vocab_size: expected at least 8, got {vocab_size}")


def _write_sample(files: list[str], text_key: str, max_documents: int | None, sample: str) -> int:
    """Write the training sample, one sentence a line; return the documents it holds."""
    n_docs = n_lines = 0
    with open(sample, "w", encoding="utf-8") as out:
        for text in _iter_sample_texts(files, text_key):
            if max_documents is not None and n_docs >= max_documents:
                break
            n_docs += 1
            for sentence in _sample_sentences(text, _MAX_SENTENCE_BYTES):
                out.write(sentence + "\n")
                n_lines += 1
    if n_lines == 0:
        raise DataFormatError(
            f"{', '.join(files)}: no text to train a tokenizer on (text key {text_key!r})"
        )
    return n_docs


def _run_trainer(
    spm,
    sample: str,
    tmp_prefix: str,
    *,
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    byte_fallback: bool,
    num_threads: int,
    seed: int,
    n_docs: int,
) -> None:
    """Train SentencePiece on ``sample`` into ``<tmp_prefix>.model/.vocab`` (seeded)."""
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            input=sample,
            model_prefix=tmp_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            pad_id=SP_PAD_ID,
            unk_id=SP_UNK_ID,
            bos_id=-1,
            eos_id=SP_EOS_ID,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerError(
            f"training a {vocab_size}-piece {model_type} SentencePiece "
            f"model on {n_docs} documents failed: {e}"
        ) from None


def train_sentencepiece(
    inputs: list[str] | str,
    out_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    text_key: str = "text",
    max_documents: int | None = 200_000,
    character_coverage: float = 0.9999,
    byte_fallback: bool = True,
    num_threads: int = 2,
    seed: int = 0,
) -> str:
    """Train a SentencePiece model on the first ``max_documents`` documents of
    ``inputs`` (JSONL, .gz/.zst ok, or plain .txt) and write ``<out_prefix>.model`` and
    ``.vocab`` atomically. Ids: pad 0, unk 1, EOS/EOD ``</s>`` 2, no BOS. Deterministic
    for the same inputs and arguments. Returns the ``.model`` path."""
    import sentencepiece as spm

    from megablocks_ablate.data.jsonl import expand_inputs

    _check_train_args(model_type, vocab_size)
    files = expand_inputs(inputs)
    out_prefix = os.fspath(out_prefix)
    if out_prefix.endswith(".model"):
        out_prefix = out_prefix[: -len(".model")]
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(out_dir, exist_ok=True)

    # Train inside a temp dir beside the output (same filesystem), then rename:
    # an interrupted run leaves no half-written model behind.
    work = tempfile.mkdtemp(prefix=".spm-train.", dir=out_dir)
    try:
        sample = os.path.join(work, "sample.txt")
        n_docs = _write_sample(files, text_key, max_documents, sample)
        tmp_prefix = os.path.join(work, "tok")
        _run_trainer(
            spm,
            sample,
            tmp_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            num_threads=num_threads,
            seed=seed,
            n_docs=n_docs,
        )
        from megablocks_ablate.utils.atomic import commit_tmp

        commit_tmp(tmp_prefix + ".vocab", out_prefix + ".vocab")
        commit_tmp(tmp_prefix + ".model", out_prefix + ".model")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_prefix + ".model"


# --------------------------------------------------------------------------- lineage records
# A checkpoint records its tokenizer under ``lineage.extra["tokenizer"]`` as
# ``{"path": <absolute path>, "fingerprint": <fingerprint>}``. Older checkpoints (and
# ``import-hf``) wrote a bare path string, some a full ``describe()``; all are read.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def tokenizer_record(
    path: str | os.PathLike, fingerprint: str | None, base: str | None = None
) -> dict:
    """The lineage record of a tokenizer file: ``{"path": absolute, "fingerprint"}``.

    A relative ``path`` is taken relative to the working directory when it exists
    there, else relative to ``base`` (e.g. the manifest's directory) when it exists
    there."""
    path = os.fspath(path)
    if (
        not os.path.isabs(path)
        and not os.path.exists(path)
        and base is not None
        and os.path.exists(os.path.join(base, path))
    ):
        path = os.path.join(base, path)
    return {"path": os.path.abspath(path), "fingerprint": fingerprint}


def recorded_tokenizer(extra: Any) -> dict | None:
    """``extra["tokenizer"]`` of a lineage as ``{"path", "fingerprint"}`` (fingerprint
    None when the record is a bare path), or None when there is no usable record."""
    rec = extra.get("tokenizer") if isinstance(extra, dict) else None
    if isinstance(rec, str) and rec:
        return {"path": rec, "fingerprint": None}
    if isinstance(rec, dict) and isinstance(rec.get("path"), str) and rec["path"]:
        fp = rec.get("fingerprint")
        return {"path": rec["path"], "fingerprint": fp if isinstance(fp, str) else None}
    return None


def inherited_tokenizer_record(extras: Iterable[Any], fingerprint: str | None) -> dict | None:
    """The record a merge of checkpoints with these lineage ``extras`` carries: the
    first input's record whose fingerprint is ``fingerprint`` (or unknown), with the
    fingerprint filled in."""
    for extra in extras:
        rec = recorded_tokenizer(extra)
        if rec is not None and rec["fingerprint"] in (None, fingerprint):
            return {"path": rec["path"], "fingerprint": fingerprint or rec["fingerprint"]}
    return None


def _candidates(path: str) -> list[str]:
    """``path``, then the other tokenizer file beside an exported/imported one (an HF
    export ships tokenizer.json and the original tokenizer.model)."""
    out = [path]
    if os.path.basename(path) in _TOKENIZER_FILES:
        d = os.path.dirname(path)
        out += [os.path.join(d, n) for n in _TOKENIZER_FILES if n != os.path.basename(path)]
    return out


def find_recorded_tokenizer(lineage, directory: str, read_lineage=None, max_depth: int = 8):
    """The tokenizer a checkpoint's lineage records, checked against its fingerprint.

    ``lineage`` is the checkpoint's :class:`~megablocks_ablate.checkpoint.Lineage` (its
    ``extra``, ``parents`` and ``tokenizer_fingerprint`` are read). Looked up in order:
    the record's path (and, for a ``tokenizer.json``/``tokenizer.model``, the other of
    the two beside it); then, when ``read_lineage(parent_dir)`` is given, the records of
    the parents (merges and continued runs written before records were kept), nearest
    first. Returns the tokenizer. Raises TokenizerError when recorded files exist but
    none has the expected fingerprint, ConfigError when no recorded file exists.
    """
    expected = lineage.tokenizer_fingerprint
    queue, seen, reasons = [(lineage, directory, 0)], {os.path.abspath(directory)}, []
    mismatch: str | None = None
    unreadable: TokenizerError | None = None
    while queue:
        lin, where, depth = queue.pop(0)
        rec = recorded_tokenizer(lin.extra)
        want = expected or (rec or {}).get("fingerprint")
        if rec is None:
            reasons.append(f"{where}/lineage.json records no tokenizer")
        else:
            for cand in _candidates(rec["path"]):
                if not os.path.exists(cand):
                    continue
                try:
                    tok = load_tokenizer(cand)
                except TokenizerError as e:  # unreadable: the next candidate may serve
                    unreadable = unreadable or e
                    continue
                if want is None or tok.fingerprint == want:
                    return tok
                mismatch = mismatch or (
                    f"tokenizer {cand} (recorded by {where}/lineage.json) has tokenizer "
                    f"fingerprint {tok.fingerprint[:16]}..., but {directory} was trained with "
                    f"{want[:16]}...: the file changed since; pass --tokenizer with the "
                    "model's tokenizer"
                )
            if not os.path.exists(rec["path"]):
                reasons.append(f"{where}/lineage.json records {rec['path']}, which is gone")
        if read_lineage is not None and depth < max_depth:
            for parent in lin.parents:
                key = os.path.abspath(parent)
                if key in seen or not os.path.isdir(parent):
                    continue
                seen.add(key)
                try:
                    queue.append((read_lineage(parent), parent, depth + 1))
                except MBAError:
                    continue
    if mismatch is not None:
        raise TokenizerError(mismatch)
    if unreadable is not None:
        raise unreadable
    raise ConfigError(f"tokenizer: {'; '.join(reasons)}; pass --tokenizer")
