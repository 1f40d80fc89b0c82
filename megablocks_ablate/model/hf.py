"""Exact mapping between our checkpoints and Hugging Face causal LMs of three families.

One ``Transformer``, shaped by ``ModelConfig``'s family fields, covers all three; the
mapping is pure slicing, concatenation and (GPT-NeoX) a per-head regrouping, so export
followed by import is bitwise:

* ``CohereForCausalLM`` (the default, every preset): one LayerNorm without bias feeding
  attention and a SwiGLU MLP in parallel, interleaved RoPE, optional per-head QK
  LayerNorm (``use_qk_norm``), ``logit_scale``, tied embeddings. We fuse q/k/v/gate/up
  into one ``in_proj`` and both QK-norm weights into one ``qk_norm``.
* ``LlamaForCausalLM``: ``block: sequential``, ``norm: rmsnorm``, ``norms_per_block: 2``
  (``input_layernorm`` -> ``norm``, ``post_attention_layernorm`` -> ``mlp_norm``), SwiGLU,
  GQA, rotate-half RoPE (``rope_layout: half``), tied or untied; biases only when
  ``attention_bias`` and ``mlp_bias`` are both set (``bias``).
* ``GPTNeoXForCausalLM`` (Pythia): parallel (``use_parallel_residual``) or sequential,
  two LayerNorms with bias, GELU MLP, biases everywhere, partial rotate-half RoPE
  (``rotary_pct`` -> ``rotary_fraction``); ``query_key_value`` rows are per head
  ``[q_h, k_h, v_h]`` and become our ``q | k | v`` rows; ``embed_in`` / ``embed_out``.

Exported ``config.json`` also carries our full model config and lineage under the
``"megablocks_ablate"`` key (transformers keeps unknown keys), which makes the round
trip exact for the fields HF has no name for (unpadded vocab size, init, ...).
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from megablocks_ablate.errors import ConfigError, DataFormatError
from megablocks_ablate.model.config import ModelConfig

HF_ARCH = "CohereForCausalLM"  # the default family (every preset)
OUR_KEY = "megablocks_ablate"

# Hugging Face architecture -> model_type, for every family import-hf reads and
# export-hf writes. Which one a config exports as follows from its family fields
# (:func:`hf_family`).
FAMILIES = {
    "CohereForCausalLM": "cohere",
    "LlamaForCausalLM": "llama",
    "GPTNeoXForCausalLM": "gpt_neox",
}
_ARCH_OF = {model_type: arch for arch, model_type in FAMILIES.items()}


def hf_family(cfg: ModelConfig) -> str:
    """The HF architecture ``cfg`` exports as, or ConfigError saying what does not fit.

    ``mlp: gelu`` is GPT-NeoX; SwiGLU in a sequential block is Llama; SwiGLU in a
    parallel block is Cohere (the default). Each family then fixes the other fields.
    """
    if cfg.mlp == "gelu":
        arch = "GPTNeoXForCausalLM"
        need = {
            "norm": "layernorm",
            "norm_bias": True,
            "norms_per_block": 2,
            "bias": True,
            "rope_layout": "half",
            "qk_norm": False,
            "logit_scale": 1.0,
            "n_kv_heads": cfg.n_heads,
        }
    elif cfg.block == "sequential":
        arch = "LlamaForCausalLM"
        need = {
            "norm": "rmsnorm",
            "norm_bias": False,
            "rope_layout": "half",
            "rotary_fraction": 1.0,
            "qk_norm": False,
            "logit_scale": 1.0,
        }
    else:
        arch = HF_ARCH
        if cfg.norm != "layernorm":
            raise ConfigError(
                f"norm: Hugging Face Cohere models use layernorm, this model uses {cfg.norm!r}; "
                "it cannot be exported as CohereForCausalLM"
            )
        need = {
            "norm_bias": False,
            "norms_per_block": 1,
            "bias": False,
            "rope_layout": "interleaved",
            "rotary_fraction": 1.0,
        }
    for name, want in need.items():
        if getattr(cfg, name) != want:
            raise ConfigError(
                f"{name}: {arch} needs {name}={want!r}, this model has {getattr(cfg, name)!r}; "
                f"it cannot be exported (families: {', '.join(FAMILIES)})"
            )
    return arch


def _detect_family(hf: dict, where: str) -> str:
    """The model_type (``cohere``, ``llama``, ``gpt_neox``) of an HF ``config.json``."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    if not archs and hf.get("model_type") in _ARCH_OF:
        return hf["model_type"]
    name = archs[0] if archs else hf.get("model_type")
    raise ConfigError(
        f"{where}: unsupported architecture {name!r} (model_type={hf.get('model_type')!r}); "
        f"import-hf reads {', '.join(FAMILIES)}"
    )


# ---- config ---------------------------------------------------------------------------


def to_hf_config(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, token_ids: dict | None = None
) -> dict:
    """The ``config.json`` of the equivalent HF model (Cohere, Llama or GPT-NeoX)."""
    arch = hf_family(cfg)
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(token_ids or {})}
    if arch == HF_ARCH:
        return {
            "architectures": [HF_ARCH],
            "model_type": "cohere",
            "vocab_size": cfg.padded_vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.mlp_hidden,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "initializer_range": cfg.init_std,
            "layer_norm_eps": cfg.norm_eps,
            "logit_scale": cfg.logit_scale,
            "tie_word_embeddings": cfg.tie_embeddings,
            "use_qk_norm": cfg.qk_norm,
            "attention_bias": False,
            "attention_dropout": 0.0,
            # transformers >= 5 reads rope_parameters; older versions read rope_theta.
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "torch_dtype": str(dtype).removeprefix("torch."),
            "use_cache": True,
            **ids,
        }
    common = {
        "architectures": [arch],
        "model_type": FAMILIES[arch],
        "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if arch == "LlamaForCausalLM":
        return {
            **common,
            "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps,
            "attention_bias": cfg.bias,
            "mlp_bias": cfg.bias,
            "pretraining_tp": 1,
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            **ids,
        }
    return {  # GPT-NeoX; rotary_pct / rotary_emb_base are the names before transformers 5
        **common,
        "hidden_act": "gelu",
        "layer_norm_eps": cfg.norm_eps,
        "use_parallel_residual": cfg.block == "parallel",
        "attention_bias": True,
        "hidden_dropout": 0.0,
        "rotary_pct": cfg.rotary_fraction,
        "rotary_emb_base": cfg.rope_theta,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.rotary_fraction,
        },
        **ids,
    }


def _rope_of(hf: dict, where: str) -> dict:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        kind = rope.get("rope_type", rope.get("type"))
        raise DataFormatError(f"{where}: rope_type {kind!r} is not supported (default only)")
    return rope


def from_hf_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our config for an HF ``config.json`` (ours verbatim when it was exported by us)."""
    family = _detect_family(hf, where)
    ours = (hf.get(OUR_KEY) or {}).get("model")
    if ours is not None:
        cfg = ModelConfig.from_dict(ours, _path=f"{where}:{OUR_KEY}.model")
        if (
            cfg.padded_vocab_size != hf.get("vocab_size")
            or cfg.d_model != hf.get("hidden_size")
            or FAMILIES[hf_family(cfg)] != family
        ):
            raise DataFormatError(
                f"{where}: {OUR_KEY}.model disagrees with the {family} fields (edited after export?)"
            )
        return cfg
    try:
        vocab = int(hf["vocab_size"])
        rope = _rope_of(hf, where)
        heads = int(hf["num_attention_heads"])
        shape = dict(
            vocab_size=vocab,
            vocab_multiple=128 if vocab % 128 == 0 else 1,
            d_model=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=heads,
            mlp_hidden=int(hf["intermediate_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
        if family == "cohere":
            return _cohere_config(hf, rope, shape, where)
        if family == "llama":
            return _llama_config(hf, rope, shape, where)
        return _gpt_neox_config(hf, rope, shape, where)
    except KeyError as e:
        raise DataFormatError(f"{where}: missing field {e.args[0]!r}") from None


def _cohere_config(hf: dict, rope: dict, shape: dict, where: str) -> ModelConfig:
    if hf.get("attention_bias"):
        raise DataFormatError(
            f"{where}: attention_bias=true is not supported (our model has no biases)"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise DataFormatError(
            f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu only)"
        )
    return ModelConfig(
        **shape,
        n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        qk_norm=bool(hf.get("use_qk_norm", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps") or 1e-5),
        logit_scale=float(hf.get("logit_scale") if hf.get("logit_scale") is not None else 1.0),
    )


def _llama_config(hf: dict, rope: dict, shape: dict, where: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise DataFormatError(
            f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu only)"
        )
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise DataFormatError(
            f"{where}: attention_bias={hf.get('attention_bias')} with mlp_bias="
            f"{hf.get('mlp_bias')} is not supported (biases on all linear layers or none)"
        )
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * shape["n_heads"] != shape["d_model"]:
        raise DataFormatError(
            f"{where}: head_dim={head_dim} is not hidden_size / num_attention_heads "
            f"({shape['d_model']} / {shape['n_heads']}); not supported"
        )
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise DataFormatError(f"{where}: partial_rotary_factor is not supported for Llama")
    return ModelConfig(
        **shape,
        n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps") or 1e-6),
        block="sequential",
        norms_per_block=2,
        bias=bool(hf.get("attention_bias", False)),
        rope_layout="half",
    )


def _gpt_neox_config(hf: dict, rope: dict, shape: dict, where: str) -> ModelConfig:
    if hf.get("hidden_act", "gelu") != "gelu":
        raise DataFormatError(
            f"{where}: hidden_act {hf['hidden_act']!r} is not supported (gelu only)"
        )
    if not hf.get("attention_bias", True):
        raise DataFormatError(
            f"{where}: attention_bias=false is not supported (GPT-NeoX's MLP has biases, "
            "so the attention must too)"
        )
    return ModelConfig(
        **shape,
        n_kv_heads=shape["n_heads"],
        rope_theta=float(rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps") or 1e-5),
        block="parallel" if hf.get("use_parallel_residual", True) else "sequential",
        norms_per_block=2,
        norm_bias=True,
        mlp="gelu",
        bias=True,
        # transformers' own default when neither key is present is 0.25
        rotary_fraction=float(rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))),
        rope_layout="half",
    )


# ---- weights --------------------------------------------------------------------------


def _pre(i: int) -> str:
    return f"model.layers.{i}."


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names/layout -> the HF family's (slices of the fused tensors)."""
    arch = hf_family(cfg)
    if arch == "GPTNeoXForCausalLM":
        out = _to_gpt_neox(state, cfg)
    else:
        out = _to_cohere_or_llama(state, cfg, llama=arch == "LlamaForCausalLM")
    return {k: v.contiguous() for k, v in out.items()}


def _to_cohere_or_llama(state: dict, cfg: ModelConfig, llama: bool) -> dict[str, torch.Tensor]:
    sizes = [cfg.q_dim, cfg.kv_dim, cfg.kv_dim, cfg.mlp_hidden, cfg.mlp_hidden]
    out = {
        "model.embed_tokens.weight": _get(state, "embed.weight"),
        "model.norm.weight": _get(state, "norm.weight"),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _get(state, "lm_head.weight")
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    names += ["mlp.gate_proj", "mlp.up_proj"]
    for i in range(cfg.n_layers):
        p, hp = f"layers.{i}.", _pre(i)
        out[hp + "input_layernorm.weight"] = _get(state, p + "norm.weight")
        if llama:
            out[hp + "post_attention_layernorm.weight"] = _get(state, p + "mlp_norm.weight")
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            parts = _get(state, f"{p}in_proj.{suffix}").split(sizes, dim=0)
            out.update({f"{hp}{n}.{suffix}": t for n, t in zip(names, parts)})
            out[f"{hp}self_attn.o_proj.{suffix}"] = _get(state, f"{p}attn_out.{suffix}")
            out[f"{hp}mlp.down_proj.{suffix}"] = _get(state, f"{p}mlp_out.{suffix}")
        if cfg.qk_norm:
            qn, kn = _get(state, p + "qk_norm.weight").split([cfg.n_heads, cfg.n_kv_heads], dim=0)
            out[hp + "self_attn.q_norm.weight"] = qn
            out[hp + "self_attn.k_norm.weight"] = kn
    return out


def _neox_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Our q | k | v rows -> GPT-NeoX's ``query_key_value`` rows, per head ``[q_h, k_h, v_h]``."""
    heads = [t.unflatten(0, (cfg.n_heads, cfg.head_dim)) for t in (q, k, v)]
    return torch.stack(heads, dim=1).flatten(0, 2)


def _to_gpt_neox(state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    d = cfg.d_model
    out = {
        "gpt_neox.embed_in.weight": _get(state, "embed.weight"),
        "gpt_neox.final_layer_norm.weight": _get(state, "norm.weight"),
        "gpt_neox.final_layer_norm.bias": _get(state, "norm.bias"),
    }
    if not cfg.tie_embeddings:
        out["embed_out.weight"] = _get(state, "lm_head.weight")
    for i in range(cfg.n_layers):
        p, hp = f"layers.{i}.", f"gpt_neox.layers.{i}."
        for suffix in ("weight", "bias"):
            q, k, v, mlp_in = _get(state, f"{p}in_proj.{suffix}").split([d, d, d, cfg.mlp_hidden])
            out.update(
                {
                    f"{hp}input_layernorm.{suffix}": _get(state, f"{p}norm.{suffix}"),
                    f"{hp}post_attention_layernorm.{suffix}": _get(state, f"{p}mlp_norm.{suffix}"),
                    f"{hp}attention.query_key_value.{suffix}": _neox_qkv(q, k, v, cfg),
                    f"{hp}attention.dense.{suffix}": _get(state, f"{p}attn_out.{suffix}"),
                    f"{hp}mlp.dense_h_to_4h.{suffix}": mlp_in,
                    f"{hp}mlp.dense_4h_to_h.{suffix}": _get(state, f"{p}mlp_out.{suffix}"),
                }
            )
    return out


def from_hf_state_dict(
    hf: dict[str, torch.Tensor], cfg: ModelConfig, where: str = "model.safetensors"
) -> dict[str, torch.Tensor]:
    """The HF family's names/layout -> ours; every expected tensor must be present with its
    shape (tensors we have no use for, such as old GPT-NeoX attention masks, are ignored)."""

    def get(name: str, shape: tuple) -> torch.Tensor:
        t = _get(hf, name, where)
        if tuple(t.shape) != tuple(shape):
            raise DataFormatError(
                f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
            )
        return t

    arch = hf_family(cfg)
    if arch == "GPTNeoXForCausalLM":
        return _from_gpt_neox(hf, cfg, get)
    llama = arch == "LlamaForCausalLM"
    d, v = cfg.d_model, cfg.padded_vocab_size
    out = {
        "embed.weight": get("model.embed_tokens.weight", (v, d)),
        "norm.weight": get("model.norm.weight", (d,)),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight", (v, d))
    rows = [
        ("self_attn.q_proj", cfg.q_dim),
        ("self_attn.k_proj", cfg.kv_dim),
        ("self_attn.v_proj", cfg.kv_dim),
        ("mlp.gate_proj", cfg.mlp_hidden),
        ("mlp.up_proj", cfg.mlp_hidden),
    ]
    for i in range(cfg.n_layers):
        p, hp = f"layers.{i}.", _pre(i)
        out[p + "norm.weight"] = get(hp + "input_layernorm.weight", (d,))
        if llama:
            out[p + "mlp_norm.weight"] = get(hp + "post_attention_layernorm.weight", (d,))
        out[p + "in_proj.weight"] = torch.cat(
            [get(f"{hp}{n}.weight", (r, d)) for n, r in rows], dim=0
        )
        if cfg.bias:
            out[p + "in_proj.bias"] = torch.cat([get(f"{hp}{n}.bias", (r,)) for n, r in rows])
        if cfg.qk_norm:
            out[p + "qk_norm.weight"] = torch.cat(
                [
                    get(hp + "self_attn.q_norm.weight", (cfg.n_heads, cfg.head_dim)),
                    get(hp + "self_attn.k_norm.weight", (cfg.n_kv_heads, cfg.head_dim)),
                ],
                dim=0,
            )
        out[p + "attn_out.weight"] = get(hp + "self_attn.o_proj.weight", (d, cfg.q_dim))
        out[p + "mlp_out.weight"] = get(hp + "mlp.down_proj.weight", (d, cfg.mlp_hidden))
        if cfg.bias:
            out[p + "attn_out.bias"] = get(hp + "self_attn.o_proj.bias", (d,))
            out[p + "mlp_out.bias"] = get(hp + "mlp.down_proj.bias", (d,))
    return out


def _from_gpt_neox(hf: dict, cfg: ModelConfig, get) -> dict[str, torch.Tensor]:
    d, v, m, H, hd = cfg.d_model, cfg.padded_vocab_size, cfg.mlp_hidden, cfg.n_heads, cfg.head_dim
    out = {
        "embed.weight": get("gpt_neox.embed_in.weight", (v, d)),
        "norm.weight": get("gpt_neox.final_layer_norm.weight", (d,)),
        "norm.bias": get("gpt_neox.final_layer_norm.bias", (d,)),
    }
    if not cfg.tie_embeddings:
        # transformers >= 5 may save the output projection as lm_head (it loads both)
        name = "embed_out.weight" if "embed_out.weight" in hf else "lm_head.weight"
        out["lm_head.weight"] = get(name, (v, d))
    for i in range(cfg.n_layers):
        p, hp = f"layers.{i}.", f"gpt_neox.layers.{i}."
        for suffix, tail in (("weight", (d,)), ("bias", ())):
            # query_key_value rows are per head [q_h, k_h, v_h]: regroup into q | k | v
            qkv = get(f"{hp}attention.query_key_value.{suffix}", (3 * d, *tail))
            q, k, vv = qkv.unflatten(0, (H, 3, hd)).unbind(1)
            out[f"{p}norm.{suffix}"] = get(f"{hp}input_layernorm.{suffix}", (d,))
            out[f"{p}mlp_norm.{suffix}"] = get(f"{hp}post_attention_layernorm.{suffix}", (d,))
            out[f"{p}in_proj.{suffix}"] = torch.cat(
                [
                    q.flatten(0, 1),
                    k.flatten(0, 1),
                    vv.flatten(0, 1),
                    get(f"{hp}mlp.dense_h_to_4h.{suffix}", (m, *tail)),
                ],
                dim=0,
            )
            dense, down = ((d, d), (d, m)) if suffix == "weight" else ((d,), (d,))
            out[f"{p}attn_out.{suffix}"] = get(f"{hp}attention.dense.{suffix}", dense)
            out[f"{p}mlp_out.{suffix}"] = get(f"{hp}mlp.dense_4h_to_h.{suffix}", down)
    return out


def _get(state: dict, name: str, where: str = "checkpoint") -> torch.Tensor:
    try:
        return state[name]
    except KeyError:
        raise DataFormatError(f"{where}: missing tensor {name!r}") from None


# ---- directories ----------------------------------------------------------------------


def _tokenizer_files(path: str, out_dir: str, fingerprint: str | None = None) -> dict:
    """Write the tokenizer beside the exported weights; return the special-token ids.

    ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``, which
    ``transformers.AutoTokenizer`` loads with our vocabulary size and our ids (checked
    on a probe text; see :mod:`megablocks_ablate.data.hf_tokenizer`), plus, for a
    SentencePiece model, the original as ``tokenizer.model``. A tokenizer whose
    fingerprint is not the model's (``fingerprint``, when known) is refused.
    """
    from megablocks_ablate.data.hf_tokenizer import write_hf_tokenizer
    from megablocks_ablate.data.tokenizer import SentencePieceTokenizer, load_tokenizer
    from megablocks_ablate.errors import TokenizerError

    tok = load_tokenizer(path)
    if fingerprint is not None and tok.fingerprint != fingerprint:
        raise TokenizerError(
            f"tokenizer {path} has tokenizer fingerprint {tok.fingerprint[:16]}..., but the "
            f"model was trained with {fingerprint[:16]}... (lineage.json "
            "tokenizer_fingerprint): export with the model's tokenizer"
        )
    ids = write_hf_tokenizer(tok, out_dir)
    if isinstance(tok, SentencePieceTokenizer):  # for import-hf and SentencePiece users
        shutil.copyfile(tok.path, os.path.join(out_dir, "tokenizer.model"))
    return ids


def _recorded_tokenizer(lineage, ckpt_dir: str) -> str | None:
    """The tokenizer file the checkpoint's lineage (or a parent's) records; None, with a
    warning, when none is recorded or the recorded file is gone."""
    import logging

    from megablocks_ablate.checkpoint import read_checkpoint_meta
    from megablocks_ablate.data.tokenizer import find_recorded_tokenizer

    try:
        tok = find_recorded_tokenizer(
            lineage, ckpt_dir, read_lineage=lambda d: read_checkpoint_meta(d)[1]
        )
    except ConfigError as e:
        logging.getLogger(__name__).warning(
            f"{ckpt_dir}: exporting the weights without a tokenizer ({e}; pass --tokenizer "
            "to ship one)"
        )
        return None
    return tok.path


def export_hf(ckpt_dir: str, out_dir: str, tokenizer: str | None = None) -> str:
    """Write ``out_dir`` loadable by ``AutoModelForCausalLM.from_pretrained`` (the family
    :func:`hf_family` names: Cohere, Llama or GPT-NeoX).

    The tokenizer is always shipped (see :func:`_tokenizer_files`): ``tokenizer`` when
    given, else the one the checkpoint's lineage records (``lineage.extra["tokenizer"]``;
    a merged checkpoint without a record: its inputs'). A recorded tokenizer that is
    gone means weights only, with a warning; one whose fingerprint is not the model's
    is an error.
    """
    from safetensors.torch import save_file

    from megablocks_ablate.checkpoint import (
        check_finite_state,
        load_model_checkpoint,
        staged_checkpoint_dir,
    )
    from megablocks_ablate.model.loading import check_weights_match_config
    from megablocks_ablate.utils.outputs import write_marker

    state, cfg_dict, lineage = load_model_checkpoint(ckpt_dir)
    cfg = ModelConfig.from_dict(cfg_dict, _path=os.path.join(ckpt_dir, "config.json"))
    with torch.device("meta"):
        check_weights_match_config(state, cfg.build(), ckpt_dir)
    check_finite_state(
        state,
        os.path.join(ckpt_dir, "model.safetensors"),
        "refusing to export a model whose training diverged",
    )
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ConfigError(f"tokenizer: {tokenizer} does not exist")
    if tokenizer is None:
        tokenizer = _recorded_tokenizer(lineage, ckpt_dir)
    dtype = next(iter(state.values())).dtype
    hf_state = to_hf_state_dict(state, cfg)
    with staged_checkpoint_dir(out_dir) as tmp:
        ids = _tokenizer_files(tokenizer, tmp, lineage.tokenizer_fingerprint) if tokenizer else {}
        hf_cfg = to_hf_config(cfg, dtype, ids)
        # the lineage's relative paths recorded relative to the export (utils/paths.py)
        lineage_rec = lineage.to_dict(recorded_in=os.path.join(out_dir, "config.json"))
        hf_cfg[OUR_KEY] = {"model": cfg.to_dict(), "lineage": lineage_rec}
        save_file(hf_state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_cfg, f, indent=2)
            f.write("\n")
        # the marker lists what the export consists of, so a later --overwrite replaces
        # exactly these files and nothing a user added beside them
        write_marker(tmp, "hf-export", os.listdir(tmp))
    return out_dir


def import_hf(hf_dir: str, out_ckpt: str) -> str:
    """Read a Cohere, Llama or GPT-NeoX directory (ours or anyone's) into a checkpoint of
    kind ``imported``; any other architecture is a ConfigError naming the supported ones.
    Its weight files are read by :func:`~megablocks_ablate.model.hf_files.read_hf_weights`
    (shards confined to ``hf_dir``, every tensor finite)."""
    from megablocks_ablate.checkpoint import Lineage, save_model_checkpoint
    from megablocks_ablate.model.hf_files import read_hf_weights

    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise DataFormatError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hf_cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{cfg_path}: invalid JSON ({e})") from None
    cfg = from_hf_config(hf_cfg, cfg_path)
    state = from_hf_state_dict(read_hf_weights(hf_dir), cfg, where=hf_dir)
    previous = (hf_cfg.get(OUR_KEY) or {}).get("lineage") or {}
    extra = {"source": os.path.abspath(hf_dir)}
    tok = next(
        (
            os.path.join(hf_dir, n)
            for n in ("tokenizer.json", "tokenizer.model")
            if os.path.isfile(os.path.join(hf_dir, n))
        ),
        None,
    )
    if tok:
        extra["tokenizer"] = os.path.abspath(tok)
    if previous:
        extra["exported_lineage"] = previous
    lineage = Lineage(
        kind="imported",
        seed_hash=previous.get("seed_hash"),
        units=list(previous.get("units", [])),
        weights=list(previous.get("weights", [])),
        tokens_seen=int(previous.get("tokens_seen", 0)),
        tokenizer_fingerprint=previous.get("tokenizer_fingerprint"),
        parents=[os.path.abspath(hf_dir)],
        extra=extra,
        trained_seq_len=_imported_seq_len(previous, cfg.max_seq_len),
    )
    save_model_checkpoint(out_ckpt, state, cfg.to_dict(), lineage)
    return out_ckpt


def _imported_seq_len(previous: dict, max_position_embeddings: int) -> int:
    """The trained length an imported model records: what our own export's lineage
    recorded (``trained_seq_len``, or the trainer's older ``extra.seq_len``), else the
    Hugging Face config's ``max_position_embeddings`` (the context its authors declare)."""
    for value in (previous.get("trained_seq_len"), (previous.get("extra") or {}).get("seq_len")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, max_position_embeddings)
    return max_position_embeddings
