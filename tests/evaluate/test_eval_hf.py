"""evaluate() against Hugging Face ``CohereForCausalLM`` on the exported checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from megablocks_ablate.evaluate import EvalSuite, evaluate
from megablocks_ablate.evaluate.windows import document_windows
from megablocks_ablate.model.loading import load_model

transformers = pytest.importorskip("transformers")


def _hf_nll(hf_model, suite, domain, max_len, stride) -> tuple[float, int]:
    """Sum of NLL over the same windows, from the HF model's full logits in fp64."""
    s = suite.sets[domain]
    total, count = 0.0, 0
    for i in range(s.num_documents):
        seq = [suite.eod_id] + s.document(i).tolist()
        for c, a, b in document_windows(len(seq) - 1, max_len, stride):
            with torch.no_grad():
                logits = hf_model(input_ids=torch.tensor([seq[c:b]])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            pos = torch.arange(a - c, b - c)
            total -= float(logp[pos, torch.tensor(seq[a + 1 : b + 1])].sum())
            count += b - a
    return total, count


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, eval_dir, sp_model_path, tmp_path_factory):
    """(HF model loaded from the exported checkpoint, our model, the eval suite)."""
    from megablocks_ablate.model.hf import export_hf

    hf_dir = str(tmp_path_factory.mktemp("hf") / "model")
    export_hf(tiny_checkpoint, hf_dir)
    hf_model = transformers.CohereForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model, _ = load_model(tiny_checkpoint)
    suite = EvalSuite.load(eval_dir, sp_model_path, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return hf_model, model, suite


@pytest.mark.parametrize("stride", [None, 8])
def test_same_perplexity_as_hf_cohere(exported, stride):
    hf_model, model, suite = exported
    L = model.cfg.max_seq_len
    ours = evaluate(model, suite, stride=stride)
    for domain, r in ours.items():
        nll, count = _hf_nll(hf_model, suite, domain, L, stride or L)
        assert r.tokens == count
        hf_ppl = math.exp(nll / count)
        assert abs(r.perplexity - hf_ppl) < 1e-4, (domain, r.perplexity, hf_ppl)
        assert r.bits_per_byte == pytest.approx(nll / math.log(2) / r.bytes, rel=1e-6)
