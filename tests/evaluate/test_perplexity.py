"""evaluate(): perplexity / bits per byte against brute-force references (evaluate/perplexity.py)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from megablocks_ablate.errors import ConfigError, NonFiniteError, TokenizerError
from megablocks_ablate.evaluate import EvalSuite, evaluate
from megablocks_ablate.evaluate.perplexity import DomainResult


@pytest.fixture(scope="module")
def suite(eval_dir, sp_model_path, tmp_path_factory):
    return EvalSuite.load(eval_dir, sp_model_path, cache_dir=str(tmp_path_factory.mktemp("cache")))


def _fp64_logp(model64, contexts: list[list[int]]) -> torch.Tensor:
    """log-probabilities ``[batch, T, V]`` from full fp64 logits (equal-length contexts)."""
    with torch.no_grad():
        logits = model64(torch.tensor(contexts, dtype=torch.long)).double()
    return torch.log_softmax(logits, dim=-1)


def _documents(suite, domain):
    s = suite.sets[domain]
    return [[suite.eod_id] + s.document(i).tolist() for i in range(s.num_documents)]


def _brute_force_chunks(model, suite, L) -> dict[str, float]:
    """Non-overlapping reference: labels ``[kL, (k+1)L)`` of ``s = [EOD] + doc`` are
    predicted from one forward over ``s[kL : (k+1)L]``; the last, partial chunk of a
    document from the last ``L`` inputs (full context, as lm-eval's rolling windows)."""
    model64 = copy.deepcopy(model).double()
    out = {}
    for domain in suite.sets:
        total = 0.0
        for seq in _documents(suite, domain):
            n = len(seq) - 1
            for k in range(0, n, L):
                end = min(k + L, n)
                c = max(0, end - L)
                logp = _fp64_logp(model64, [seq[c:end]])[0]
                total -= sum(float(logp[j - c, seq[j + 1]]) for j in range(k, end))
        out[domain] = total
    return out


def _brute_force_per_token(model, suite, domain, L) -> float:
    """Every label ``j`` predicted from its own forward over ``s[max(0, j + 1 - L) : j + 1]``."""
    model64 = copy.deepcopy(model).double()
    total = 0.0
    for seq in _documents(suite, domain):
        for j in range(len(seq) - 1):
            total -= float(_fp64_logp(model64, [seq[max(0, j + 1 - L) : j + 1]])[0, -1, seq[j + 1]])
    return total


def test_non_overlapping_equals_brute_force(tiny_model, suite):
    model = tiny_model(0)
    ref = _brute_force_chunks(model, suite, model.cfg.max_seq_len)
    got = evaluate(model, suite, batch_tokens=100)
    for domain, r in got.items():
        s = suite.sets[domain]
        assert r.tokens == s.num_tokens and r.documents == s.num_documents
        assert r.bytes == s.num_bytes
        assert r.nll_sum == pytest.approx(ref[domain], rel=2e-6)
        assert r.perplexity == pytest.approx(math.exp(ref[domain] / s.num_tokens), rel=2e-6)
        assert r.bits_per_byte == pytest.approx(ref[domain] / math.log(2) / s.num_bytes, rel=2e-6)


def test_sliding_window_stride_one_gives_every_token_full_context(tiny_model, suite):
    model = tiny_model(1)
    L = model.cfg.max_seq_len
    sub = suite.subset(["mixed"])
    ref = _brute_force_per_token(model, sub, "mixed", L)
    got = evaluate(model, sub, stride=1, batch_tokens=4096)["mixed"]
    assert got.nll_sum == pytest.approx(ref, rel=2e-6)
    assert got.tokens == sub.sets["mixed"].num_tokens
    # context matters for this model: non-overlapping windows score differently
    plain = evaluate(model, sub)["mixed"]
    assert plain.tokens == got.tokens
    assert abs(plain.nll_sum - got.nll_sum) > 1e-3 * got.nll_sum


def test_context_free_model_scores_the_same_for_any_stride(tiny_model, suite):
    """Known case: with attention switched off each prediction depends only on the
    current token, so every window layout gives the same sum (the bigram sum)."""
    model = tiny_model(2)
    with torch.no_grad():
        for block in model.layers:
            block.attn_out.weight.zero_()
    results = [evaluate(model, suite, stride=s) for s in (None, 8, 1)]
    model64 = copy.deepcopy(model).double()
    for domain in suite.sets:
        bigram = 0.0
        for seq in _documents(suite, domain):
            # each input token alone, as a batch of one-token sequences
            logp = _fp64_logp(model64, [[t] for t in seq[:-1]])[:, 0]
            bigram -= float(logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].sum())
        for r in results:
            assert r[domain].nll_sum == pytest.approx(bigram, rel=2e-6)


def test_uniform_model_has_perplexity_vocab(tiny_model, suite):
    """Known value: all-zero weights give uniform logits, so ppl = padded vocab exactly and
    bits per byte = tokens * log2(V) / bytes."""
    model = tiny_model(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    V = model.cfg.padded_vocab_size
    for domain, r in evaluate(model, suite).items():
        assert r.perplexity == pytest.approx(V, rel=1e-6)
        s = suite.sets[domain]
        assert r.bits_per_byte == pytest.approx(s.num_tokens * math.log2(V) / s.num_bytes, rel=1e-6)


def test_batching_does_not_change_results_and_state_is_restored(tiny_model, suite):
    model = tiny_model(3).train()
    a = evaluate(model, suite, batch_tokens=32)
    b = evaluate(model, suite, batch_tokens=4096)
    assert model.training  # evaluate restores the mode it found
    for d in a:
        assert a[d].nll_sum == pytest.approx(b[d].nll_sum, rel=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_shorter_max_len_and_argument_errors(tiny_model, suite):
    model = tiny_model(0)
    r16 = evaluate(model, suite, max_len=16)
    assert {d: r.tokens for d, r in r16.items()} == {d: s.num_tokens for d, s in suite.sets.items()}
    with pytest.raises(ConfigError, match="max_len"):
        evaluate(model, suite, max_len=64)
    with pytest.raises(ConfigError, match="stride"):
        evaluate(model, suite, stride=33)
    with pytest.raises(TokenizerError, match="tokenized with tokenizer"):
        evaluate(model, suite, tokenizer_fingerprint="0" * 64)
    with pytest.raises(ConfigError, match="tokenizer="):
        evaluate(model, ["x.jsonl"])


def test_nan_weights_are_an_error_naming_model_and_domains(tiny_model, suite):
    model = tiny_model(0)
    with torch.no_grad():
        model.get_parameter("layers.0.norm.weight")[0] = float("nan")
    with pytest.raises(
        NonFiniteError,
        match=r"runs/diverged: non-finite evaluation result on domains 'bio' \(NLL sum nan "
        r"over \d+ tokens\), 'cs' .*'mixed' .*weights hold NaN/inf or its training diverged",
    ):
        evaluate(model, suite, name="runs/diverged")
    with pytest.raises(NonFiniteError, match=r"^the model: .* on domain 'bio' \(NLL sum nan"):
        evaluate(model, _only(suite, "bio"))


def _only(suite, domain):
    return dataclasses.replace(suite, sets={domain: suite.sets[domain]}, _plans={})


def test_perplexity_that_overflows_is_inf_and_refused(tiny_model, suite):
    from megablocks_ablate.evaluate.perplexity import check_finite

    r = DomainResult("d", nll_sum=1e6, tokens=10, documents=1, bytes=100)
    assert r.perplexity == math.inf  # exp(1e5): was an OverflowError
    with pytest.raises(NonFiniteError, match=r"m: non-finite evaluation result on domain 'd'"):
        check_finite({"d": r}, "m")
    check_finite({"d": DomainResult("d", 700.0, 1, 1, 1)}, "m")  # exp(700) is finite
    model = tiny_model(0)
    with torch.no_grad():  # huge but finite logits: NLL finite, perplexity overflows
        model.get_parameter("norm.weight").mul_(1e7)
    with pytest.raises(NonFiniteError, match=r"m: .* domain 'bio' .*perplexity overflows"):
        evaluate(model, _only(suite, "bio"), name="m")
