"""Tiny Hugging Face models of each supported family, and mergekit's linear arithmetic
as a torch reference (the tests of merge/hf_merge.py and merge/mergekit_config.py).

Imported by those tests (``from hf_fixtures import ...``); transformers is a dev
dependency, mergekit is not needed (the reference restates its documented steps).
"""

from __future__ import annotations

import json
import os

import torch
import transformers
import yaml

SHAPE = dict(
    vocab_size=200,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
FAMILIES = {
    "cohere": lambda: transformers.CohereConfig(
        **SHAPE, num_key_value_heads=2, use_qk_norm=True, logit_scale=0.5
    ),
    "llama": lambda: transformers.LlamaConfig(
        **SHAPE, num_key_value_heads=2, tie_word_embeddings=False
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SHAPE),
}
TOKENIZER = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}}}


def write_hf_models(
    root: str,
    family: str,
    n: int = 3,
    dtype: torch.dtype = torch.float32,
    shard: bool = False,
    dtypes: list[torch.dtype] | None = None,
) -> list[str]:
    """``n`` models of ``family`` saved by transformers (safetensors) under ``root``,
    each with every parameter perturbed by its own seed (so norms and biases differ
    too) and the same tokenizer.json; ``shard``: saved in several shards with an index;
    ``dtypes``: one dtype per model (else ``dtype`` for all). Returns the directories."""
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model = model.to((dtypes or [dtype] * n)[i])
        path = os.path.join(root, f"{family}_{i}")
        model.save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            json.dump(TOKENIZER, f)
        paths.append(path)
    return paths


def read_hf_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def mergekit_config(path, models, weights, **top) -> str:
    """Write a mergekit linear config (``top``: dtype, out_dtype, parameters...)."""
    d = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights)],
        **top,
    }
    path.write_text(yaml.safe_dump(d))
    return str(path)


def mergekit_linear(
    tensors: list[torch.Tensor],
    weights: list[float],
    normalize: bool = True,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """mergekit 0.1.5's linear method, restated: inputs converted to ``dtype`` (else
    promoted to a common dtype), an fp32 accumulator from zero gaining
    ``addcmul_(x_i, w_i)`` per input (fp32 weights; torch fuses it into an FMA),
    divided by the fp32 sum of the weights when normalizing, converted back to the
    inputs' dtype and then to ``out_dtype``."""
    common = dtype
    if common is None:
        common = tensors[0].dtype
        for t in tensors[1:]:
            common = torch.promote_types(common, t.dtype)
    xs = [t.to(common) for t in tensors]
    w = torch.tensor(weights, dtype=torch.float32)
    acc = torch.zeros(xs[0].shape, dtype=torch.float32)
    for x, c in zip(xs, w.unbind(0)):
        acc.addcmul_(x, c)
    if normalize:
        acc.div_(w.sum())
    out = acc.to(common)
    return out.to(out_dtype) if out_dtype is not None else out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads and the sign of zero included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
