"""export-hf ships a tokenizer that transformers loads with OUR ids and vocabulary size.

SentencePiece models are rebuilt as a ``tokenizer.json`` (data/hf_tokenizer.py): the
``tokenizer.model`` + LlamaTokenizer route of transformers 5 gives other ids for
newlines, indentation and runs of spaces, and one id more than the model has.
"""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch
import transformers  # a dev dependency

from megablocks_ablate.checkpoint import Lineage, load_model_checkpoint, save_model_checkpoint
from megablocks_ablate.data.hf_tokenizer import PROBE_TEXTS
from megablocks_ablate.data.tokenizer import load_tokenizer, tokenizer_record, train_sentencepiece
from megablocks_ablate.errors import TokenizerError
from megablocks_ablate.model import ModelConfig
from megablocks_ablate.model.hf import export_hf

SAMPLE = "def f(x):\n\treturn  x  # ünïcødé 中文\n\n\n    end"


@pytest.fixture(scope="module", params=["sp-bpe", "sp-unigram", "hf-bytelevel"])
def tokenizer_path(request, tiny_corpus, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tok")
    if request.param.startswith("sp-"):
        return train_sentencepiece(
            [tiny_corpus], str(d / "tok"), 512, model_type=request.param.split("-")[1]
        )
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with open(tiny_corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok.train_from_iterator(
        texts + [SAMPLE],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>", "<|padding|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    # a BOS-adding post-processor (Llama 3 style): our encode never applies it, and
    # neither may the exported tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    path = str(d / "tokenizer.json")
    tok.save(path)
    return path


def _checkpoint(path, vocab_size: int, seed: int = 0, **lineage) -> str:
    torch.manual_seed(seed)
    model = ModelConfig.from_preset(
        "tiny", [f"vocab_size={vocab_size}", "max_seq_len=128", "init_std=0.1"]
    ).build()
    save_model_checkpoint(
        str(path), model.state_dict(), model.cfg.to_dict(), Lineage(kind="unit", **lineage)
    )
    return str(path)


def _recorded(path, tok, seed: int = 0) -> str:
    return _checkpoint(
        path,
        tok.vocab_size,
        seed,
        tokens_seen=100,
        tokenizer_fingerprint=tok.fingerprint,
        extra={"tokenizer": tokenizer_record(tok.path, tok.fingerprint)},
    )


def test_transformers_gets_our_ids_vocab_and_decoding(tokenizer_path, tmp_path):
    ours = load_tokenizer(tokenizer_path)
    out = str(tmp_path / "hf")
    export_hf(_recorded(tmp_path / "ckpt", ours), out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ids = ours.encode(SAMPLE)
    assert theirs(SAMPLE)["input_ids"] == ids  # default add_special_tokens: still no BOS
    assert theirs.encode(SAMPLE, add_special_tokens=False) == ids
    assert len(theirs) == ours.vocab_size
    assert theirs.decode(ids) == ours.decode(ids)
    for text in PROBE_TEXTS:
        assert theirs.encode(text) == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text)), text
    assert theirs.bos_token_id is None
    assert theirs.eos_token_id == ours.eod_id
    hf_cfg = json.load(open(os.path.join(out, "config.json")))
    assert hf_cfg["eos_token_id"] == ours.eod_id and hf_cfg["bos_token_id"] is None
    config = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert config["megablocks_ablate_fingerprint"] == ours.fingerprint
    if ours.kind == "sentencepiece":
        # the original travels too (import-hf, SentencePiece users)
        with open(tokenizer_path, "rb") as f:
            assert open(os.path.join(out, "tokenizer.model"), "rb").read() == f.read()
    else:  # what our encode ignores is dropped; the ids, hence the fingerprint, stay
        assert load_tokenizer(out).fingerprint == ours.fingerprint
        assert json.load(open(os.path.join(out, "tokenizer.json")))["post_processor"] is None


def test_sentencepiece_whitespace_is_what_we_see_not_llamas(tmp_path, tiny_corpus):
    """Our train_sentencepiece keeps SentencePiece's default normalization (nmt_nfkc,
    extra whitespace removed): the exported tokenizer must do exactly the same."""
    ours = load_tokenizer(train_sentencepiece([tiny_corpus], str(tmp_path / "tok"), 512))
    out = str(tmp_path / "hf")
    export_hf(_recorded(tmp_path / "ckpt", ours), out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.decode(theirs.encode(SAMPLE)) == "def f(x): return x # ünïcødé 中文 end"
    # a literal control piece in text is characters to SentencePiece, not the EOS id
    assert theirs.encode("x</s>y") == ours.encode("x</s>y")
    assert ours.eod_id not in theirs.encode("x</s>y")


def test_merged_checkpoint_exports_the_inputs_tokenizer(tmp_path, tiny_corpus):
    from megablocks_ablate.merge.file_merge import merge_checkpoints
    from megablocks_ablate.merge.spec import MergeSpec

    ours = load_tokenizer(train_sentencepiece([tiny_corpus], str(tmp_path / "tok"), 512))
    a = _recorded(tmp_path / "a", ours, seed=1)
    b = _recorded(tmp_path / "b", ours, seed=2)
    spec = MergeSpec.from_dict({"checkpoints": {"a": a, "b": b}, "uniform": True}, source="t")
    merged = str(tmp_path / "merged")
    lineage = merge_checkpoints(spec, merged, allow_different_seed=True, show_progress=False)
    assert lineage.extra["tokenizer"] == {
        "path": os.path.abspath(ours.path),
        "fingerprint": ours.fingerprint,
    }
    out = str(tmp_path / "hf")
    export_hf(merged, out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.encode(SAMPLE) == ours.encode(SAMPLE)


def test_merge_of_old_checkpoints_finds_tokenizer_through_parents(tmp_path, tiny_corpus):
    """Checkpoints written before records were kept: a bare path on the inputs only."""
    ours = load_tokenizer(train_sentencepiece([tiny_corpus], str(tmp_path / "tok"), 512))
    unit = _checkpoint(
        tmp_path / "unit",
        ours.vocab_size,
        tokenizer_fingerprint=ours.fingerprint,
        extra={"tokenizer": ours.path},  # the old string form
    )
    state, config, _ = load_model_checkpoint(unit)
    merged = str(tmp_path / "merged")
    save_model_checkpoint(
        merged,
        state,
        config,
        Lineage(kind="merged", units=["u"], tokenizer_fingerprint=ours.fingerprint, parents=[unit]),
    )
    export_hf(merged, str(tmp_path / "hf"))
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.json")


def test_gone_tokenizer_is_weights_only_with_a_warning(tmp_path, tiny_corpus, caplog):
    ours = load_tokenizer(train_sentencepiece([tiny_corpus], str(tmp_path / "tok"), 512))
    ckpt = _recorded(tmp_path / "ckpt", ours)
    os.remove(ours.path)
    with caplog.at_level(logging.WARNING):
        export_hf(ckpt, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf" / "tokenizer.json")
    assert "without a tokenizer" in caplog.text and "gone" in caplog.text


def test_tokenizer_other_than_the_models_is_refused(tmp_path, tiny_corpus):
    ours = load_tokenizer(train_sentencepiece([tiny_corpus], str(tmp_path / "tok"), 512))
    other = train_sentencepiece([tiny_corpus], str(tmp_path / "other"), 400)
    ckpt = _recorded(tmp_path / "ckpt", ours)
    with pytest.raises(TokenizerError, match="tokenizer fingerprint"):
        export_hf(ckpt, str(tmp_path / "hf"), tokenizer=other)
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.integration
def test_lm_eval_harness_scores_the_export_like_our_evaluate(tmp_path, tiny_corpus):
    """lm-evaluation-harness's HF backend on the exported model: the summed
    log-likelihood of a document (``loglikelihood_rolling``) is minus our NLL sum.

    Needs ``pip install "lm-eval[hf]"`` (in the ``dev`` extra; it pulls accelerate and
    peft, and leaves an installed torch alone). No download: the document is local and
    the harness is called through its Python API (``HFLM.loglikelihood_rolling``).
    Both score every token of the document given the EOD id alone (lm-eval's prefix
    token is the EOS when the tokenizer has no BOS, as ours has not), in one window
    (the document is shorter than the model's 128 positions).
    """
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from megablocks_ablate.evaluate import EvalSuite, evaluate
    from megablocks_ablate.model.loading import load_model

    tok = load_tokenizer(train_sentencepiece([tiny_corpus], str(tmp_path / "tok"), 512))
    ckpt = _recorded(tmp_path / "ckpt", tok)
    out = str(tmp_path / "hf")
    export_hf(ckpt, out)
    with open(tiny_corpus, encoding="utf-8") as f:
        text = json.loads(f.readline())["text"][:300]
    n = len(tok.encode(text))
    assert 10 < n < 128
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": text}) + "\n")

    model, _ = load_model(ckpt)
    suite = EvalSuite.load(
        [f"doc={docs}"], tok.path, cache_dir=str(tmp_path / "cache"), text_key="text"
    )
    ours = evaluate(model, suite)["doc"]
    assert ours.tokens == n

    lm = HFLM(pretrained=out, device="cpu", batch_size=1, dtype="float32")
    assert lm.prefix_token_id == tok.eod_id
    (ll,) = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True
    )
    assert math.isfinite(ll)
    assert -ll == pytest.approx(ours.nll_sum, rel=1e-3)
