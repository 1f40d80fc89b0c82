"""Our tokenizers as Hugging Face ``tokenizer.json`` files that give the same ids.

``transformers`` reads a SentencePiece ``tokenizer.model`` through its own converter,
which assumes Llama's settings: it ignores the model's normalizer (``nmt_nfkc``,
collapsing of extra whitespace), so newlines, tabs and runs of spaces come out as
different ids, and it may add pieces (2049 ids for a 2048-piece model). An exported
model must instead carry a ``tokenizer.json`` that reproduces *our* ids exactly:

- :func:`sentencepiece_to_hf_json` rebuilds a SentencePiece model with the
  ``tokenizers`` library: its precompiled normalizer and whitespace handling, a
  Metaspace pre-tokenizer for the dummy prefix, the BPE merges implied by the piece
  scores (or the unigram scores), byte fallback, and the control pieces as special
  tokens; no post-processor (no BOS/EOS added);
- :func:`hf_json_for_export` takes a ``tokenizer.json`` as is, minus what our
  ``encode`` never applies (post-processor, truncation, padding);
- :func:`write_hf_tokenizer` writes ``tokenizer.json``, ``tokenizer_config.json`` and
  ``special_tokens_map.json`` and checks, on a probe text of code, whitespace and
  non-ASCII characters, that the written file gives exactly our ids.
"""

from __future__ import annotations

import json
import os

from megablocks_ablate.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    _sentencepiece_canonical,
)
from megablocks_ablate.errors import TokenizerError

# SentencePiece piece types (sentencepiece_model.proto) and TrainerSpec model types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2
_NEVER = -1e9  # unigram score of pieces SentencePiece never matches in text

# Checked after every conversion: code, indentation, blank lines, non-ASCII text.
PROBE_TEXTS = (
    "def f(x):\n\treturn  x  # ünïcødé 中文\n\n\n    end",
    "  Leading and trailing spaces  \n",
    "Tabs\tand\u00a0no-break\u3000spaces, 1234567890 ½ ﬁ Ｆｕｌｌ ｗｉｄｔｈ.",
    "emoji 🙂👍🏽, Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト。",
    "{\n  \"key\": [1, 2, 3],\n  'x' => $y;\n}\r\n",
    "a literal ▁ and ▁▁x in text",
    "",
)


def _sp_merges(pieces: list[list]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-ordered BPE: for each normal piece,
    from the highest score down, every split into two pieces of the vocabulary."""
    vocab = {p[0]: i for i, p in enumerate(pieces) if p[2] in (_NORMAL, _USER_DEFINED)}
    order = sorted(
        (i for i, p in enumerate(pieces) if p[2] == _NORMAL and len(p[0]) > 1),
        key=lambda i: (-pieces[i][1], i),
    )
    merges: list[tuple[str, str]] = []
    for i in order:
        text = pieces[i][0]
        splits = [
            (text[:k], text[k:])
            for k in range(1, len(text))
            if text[:k] in vocab and text[k:] in vocab
        ]
        splits.sort(key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
        merges.extend(splits)
    return merges


def sentencepiece_to_hf_json(tok: SentencePieceTokenizer) -> str:
    """A ``tokenizer.json`` (text) that encodes and decodes like SentencePiece model
    ``tok``; TokenizerError for settings it cannot reproduce."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    spec = _sentencepiece_canonical(tok._data)
    pieces, trainer, norm = spec["pieces"], spec["trainer"], spec["normalizer"]
    model_type = trainer.get("model_type", _UNIGRAM)
    byte_fallback = bool(trainer.get("byte_fallback", 0))
    add_dummy_prefix = bool(norm.get("add_dummy_prefix", 1))
    remove_extra_ws = bool(norm.get("remove_extra_whitespaces", 1))
    unsupported = [
        name
        for name, on in (
            ("treat_whitespace_as_suffix", trainer.get("treat_whitespace_as_suffix", 0)),
            ("split_digits", trainer.get("split_digits", 0) and model_type == _UNIGRAM),
            ("pretokenization_delimiter", trainer.get("pretokenization_delimiter")),
            ("escape_whitespaces=false", not norm.get("escape_whitespaces", 1)),
            ("denormalizer", spec["denormalizer"].get("precompiled_charsmap")),
        )
        if on
    ]
    if model_type not in (_UNIGRAM, _BPE):
        unsupported.append(f"model_type={model_type}")
    if unsupported:
        raise TokenizerError(
            f"{tok.path}: cannot convert this SentencePiece model to a Hugging Face "
            f"tokenizer.json ({', '.join(unsupported)} not supported)"
        )
    unk_id = next((i for i, p in enumerate(pieces) if p[2] == _UNKNOWN), None)
    unk = pieces[unk_id][0] if unk_id is not None else None
    if model_type == _BPE:
        vocab = {p[0]: i for i, p in enumerate(pieces)}
        model = models.BPE(
            vocab, _sp_merges(pieces), unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback
        )
    else:
        # SentencePiece's lattice holds normal and user-defined pieces only: the others
        # (control, unknown, byte, unused) must never match text here either.
        model = models.Unigram(
            [(p[0], p[1] if p[2] in (_NORMAL, _USER_DEFINED) else _NEVER) for p in pieces],
            unk_id=unk_id,
            byte_fallback=byte_fallback,
        )
    hf = HFTok(model)

    steps = []
    charsmap = norm.get("precompiled_charsmap")
    if charsmap:
        steps.append(normalizers.Precompiled(bytes.fromhex(charsmap)))
    if remove_extra_ws:  # SentencePiece collapses runs of spaces and trims both ends
        steps += [
            normalizers.Replace(Regex(" {2,}"), " "),
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
        ]
    if steps:
        hf.normalizer = normalizers.Sequence(steps)
    hf.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always" if add_dummy_prefix else "never", split=True
    )
    dec = [decoders.Replace("▁", " ")]
    if byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(dec)
    hf.add_special_tokens(
        [
            AddedToken(p[0], special=True, normalized=False)
            for p in pieces
            if p[2] in (_CONTROL, _UNKNOWN)
        ]
    )
    user = [AddedToken(p[0], normalized=False) for p in pieces if p[2] == _USER_DEFINED]
    if user:
        hf.add_tokens(user)
    return hf.to_str()


def hf_json_for_export(tok: HFTokenizer) -> str:
    """``tok``'s ``tokenizer.json`` without the parts our ``encode`` never applies
    (post-processor: no BOS/EOS added; truncation; padding)."""
    spec = json.loads(tok._data)
    spec.update(post_processor=None, truncation=None, padding=None)
    return json.dumps(spec, ensure_ascii=False)


def to_hf_json(tok: Tokenizer) -> str:
    """The ``tokenizer.json`` text that gives ``tok``'s ids."""
    if isinstance(tok, SentencePieceTokenizer):
        return sentencepiece_to_hf_json(tok)
    if isinstance(tok, HFTokenizer):
        return hf_json_for_export(tok)
    raise TokenizerError(f"{tok.path}: no Hugging Face form for a {type(tok).__name__}")


def check_same_ids(tok: Tokenizer, hf_json: str, texts=PROBE_TEXTS) -> None:
    """TokenizerError unless ``hf_json`` encodes every text like ``tok`` and has its
    id space."""
    from tokenizers import Tokenizer as HFTok

    hf = HFTok.from_str(hf_json)
    # SentencePiece never reads "</s>" in text as the control piece (split_special_tokens)
    hf.encode_special_tokens = isinstance(tok, SentencePieceTokenizer)
    size = max(hf.get_vocab(with_added_tokens=True).values()) + 1
    if size != tok.vocab_size:
        raise TokenizerError(
            f"{tok.path}: the Hugging Face form has {size} ids, ours {tok.vocab_size}"
        )
    for text in texts:
        ours, theirs = tok.encode(text), hf.encode(text, add_special_tokens=False).ids
        if ours != theirs:
            raise TokenizerError(
                f"{tok.path}: the Hugging Face form encodes {text[:40]!r} differently "
                f"(ours {ours[:12]}..., theirs {theirs[:12]}...); not exported"
            )


def write_hf_tokenizer(tok: Tokenizer, out_dir: str) -> dict:
    """Write ``tokenizer.json`` (checked to give our ids), ``tokenizer_config.json`` and
    ``special_tokens_map.json`` into ``out_dir``; return the special-token ids for the
    model's ``config.json``."""
    text = to_hf_json(tok)
    check_same_ids(tok, text)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(text)
    special = {"eos_token": tok.id_to_token(tok.eod_id)}
    ids = {"eos_token_id": tok.eod_id, "bos_token_id": None, "pad_token_id": None}
    if isinstance(tok, SentencePieceTokenizer):
        for name, i in (("unk_token", tok._sp.unk_id()), ("pad_token", tok._sp.pad_id())):
            if i >= 0:
                special[name] = tok.id_to_token(i)
                if name == "pad_token":
                    ids["pad_token_id"] = i
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # SentencePiece reads "</s>" in text as characters, never as the control piece
        "split_special_tokens": isinstance(tok, SentencePieceTokenizer),
        "megablocks_ablate_fingerprint": tok.fingerprint,
        "megablocks_ablate_kind": tok.kind,
        **special,
    }
    for name, obj in (("tokenizer_config.json", tcfg), ("special_tokens_map.json", special)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return ids
