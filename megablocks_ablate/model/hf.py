"""Exact mapping between our checkpoints and Hugging Face ``CohereForCausalLM``.

Cohere's decoder is the same architecture as ours: one LayerNorm without bias feeding
attention and a SwiGLU MLP in parallel, interleaved RoPE, optional per-head QK
LayerNorm (``use_qk_norm``), ``logit_scale`` and tied embeddings. Only the layout
differs: we fuse q/k/v/gate/up into one ``in_proj`` and both QK-norm weights into one
``qk_norm``; Cohere keeps them apart. The mapping is pure slicing and concatenation,
so export followed by import is bitwise.

Exported ``config.json`` also carries our full model config and lineage under the
``"megablocks_ablate"`` key (transformers keeps unknown keys), which makes the round
trip exact for the fields Cohere has no name for (unpadded vocab size, init, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import torch

from megablocks_ablate.errors import ConfigError, DataFormatError, NonFiniteError
from megablocks_ablate.model.config import ModelConfig

HF_ARCH = "CohereForCausalLM"
OUR_KEY = "megablocks_ablate"


# ---- config ---------------------------------------------------------------------------


def to_hf_config(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, token_ids: dict | None = None
) -> dict:
    """The ``config.json`` of an equivalent ``CohereForCausalLM``."""
    if cfg.norm != "layernorm":
        raise ConfigError(
            f"norm: Hugging Face Cohere models use layernorm, this model uses {cfg.norm!r}; "
            "it cannot be exported as CohereForCausalLM"
        )
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(token_ids or {})}
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


def from_hf_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our config for a Cohere ``config.json`` (ours verbatim when it was exported by us)."""
    if hf.get("model_type") != "cohere" and HF_ARCH not in (hf.get("architectures") or []):
        raise DataFormatError(
            f"{where}: not a Cohere model (model_type={hf.get('model_type')!r}, "
            f"architectures={hf.get('architectures')!r}); expected {HF_ARCH}"
        )
    ours = (hf.get(OUR_KEY) or {}).get("model")
    if ours is not None:
        cfg = ModelConfig.from_dict(ours, _path=f"{where}:{OUR_KEY}.model")
        if cfg.padded_vocab_size != hf.get("vocab_size") or cfg.d_model != hf.get("hidden_size"):
            raise DataFormatError(
                f"{where}: {OUR_KEY}.model disagrees with the Cohere fields (edited after export?)"
            )
        return cfg
    try:
        vocab = int(hf["vocab_size"])
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise DataFormatError(
                f"{where}: rope_type {rope['rope_type']!r} is not supported (default only)"
            )
        if hf.get("attention_bias"):
            raise DataFormatError(
                f"{where}: attention_bias=true is not supported (our model has no biases)"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise DataFormatError(
                f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu only)"
            )
        return ModelConfig(
            vocab_size=vocab,
            vocab_multiple=128 if vocab % 128 == 0 else 1,
            d_model=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=int(hf["num_attention_heads"]),
            n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            mlp_hidden=int(hf["intermediate_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            qk_norm=bool(hf.get("use_qk_norm", False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            norm="layernorm",
            norm_eps=float(hf.get("layer_norm_eps") or 1e-5),
            init_std=float(hf.get("initializer_range", 0.02)),
            logit_scale=float(hf.get("logit_scale") if hf.get("logit_scale") is not None else 1.0),
        )
    except KeyError as e:
        raise DataFormatError(f"{where}: missing field {e.args[0]!r}") from None


# ---- weights --------------------------------------------------------------------------


def _pre(i: int) -> str:
    return f"model.layers.{i}."


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names/layout -> Cohere's (slices of the fused tensors)."""
    sizes = [cfg.q_dim, cfg.kv_dim, cfg.kv_dim, cfg.mlp_hidden, cfg.mlp_hidden]
    out = {
        "model.embed_tokens.weight": _get(state, "embed.weight"),
        "model.norm.weight": _get(state, "norm.weight"),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _get(state, "lm_head.weight")
    for i in range(cfg.n_layers):
        p, hp = f"layers.{i}.", _pre(i)
        q, k, v, gate, up = _get(state, p + "in_proj.weight").split(sizes, dim=0)
        out.update(
            {
                hp + "input_layernorm.weight": _get(state, p + "norm.weight"),
                hp + "self_attn.q_proj.weight": q,
                hp + "self_attn.k_proj.weight": k,
                hp + "self_attn.v_proj.weight": v,
                hp + "self_attn.o_proj.weight": _get(state, p + "attn_out.weight"),
                hp + "mlp.gate_proj.weight": gate,
                hp + "mlp.up_proj.weight": up,
                hp + "mlp.down_proj.weight": _get(state, p + "mlp_out.weight"),
            }
        )
        if cfg.qk_norm:
            qn, kn = _get(state, p + "qk_norm.weight").split([cfg.n_heads, cfg.n_kv_heads], dim=0)
            out[hp + "self_attn.q_norm.weight"] = qn
            out[hp + "self_attn.k_norm.weight"] = kn
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(
    hf: dict[str, torch.Tensor], cfg: ModelConfig, where: str = "model.safetensors"
) -> dict[str, torch.Tensor]:
    """Cohere's names/layout -> ours; every expected tensor must be present with its shape."""

    def get(name: str, shape: tuple) -> torch.Tensor:
        t = _get(hf, name, where)
        if tuple(t.shape) != tuple(shape):
            raise DataFormatError(
                f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
            )
        return t

    d, v = cfg.d_model, cfg.padded_vocab_size
    out = {
        "embed.weight": get("model.embed_tokens.weight", (v, d)),
        "norm.weight": get("model.norm.weight", (d,)),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight", (v, d))
    for i in range(cfg.n_layers):
        p, hp = f"layers.{i}.", _pre(i)
        out[p + "norm.weight"] = get(hp + "input_layernorm.weight", (d,))
        out[p + "in_proj.weight"] = torch.cat(
            [
                get(hp + "self_attn.q_proj.weight", (cfg.q_dim, d)),
                get(hp + "self_attn.k_proj.weight", (cfg.kv_dim, d)),
                get(hp + "self_attn.v_proj.weight", (cfg.kv_dim, d)),
                get(hp + "mlp.gate_proj.weight", (cfg.mlp_hidden, d)),
                get(hp + "mlp.up_proj.weight", (cfg.mlp_hidden, d)),
            ],
            dim=0,
        )
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
    return out


def _get(state: dict, name: str, where: str = "checkpoint") -> torch.Tensor:
    try:
        return state[name]
    except KeyError:
        raise DataFormatError(f"{where}: missing tensor {name!r}") from None


def _refuse_non_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """NonFiniteError naming the first floating-point tensor that holds NaN/inf."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int(t.numel() - torch.isfinite(t).sum())
            raise NonFiniteError(
                f"{where}: tensor {name!r} has {bad} non-finite values (NaN/inf); refusing "
                "to export a model whose training diverged"
            )


# ---- directories ----------------------------------------------------------------------


def _tokenizer_files(path: str, out_dir: str) -> dict:
    """Copy a tokenizer next to the exported weights; return the special-token ids."""
    from megablocks_ablate.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    eos = tok.eod_id
    if path.endswith(".json"):
        shutil.copyfile(path, os.path.join(out_dir, "tokenizer.json"))
        cls = "PreTrainedTokenizerFast"
    else:  # SentencePiece model: transformers converts it on load
        shutil.copyfile(path, os.path.join(out_dir, "tokenizer.model"))
        cls = "LlamaTokenizer"
    eos_token = None
    with contextlib.suppress(Exception):  # decoding a control piece may be unsupported
        eos_token = tok.decode([eos]) or None
    tcfg = {
        "tokenizer_class": cls,
        "model_max_length": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "megablocks_ablate_fingerprint": tok.fingerprint,
    }
    if eos_token:
        tcfg["eos_token"] = eos_token
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tcfg, f, indent=2)
    return {"eos_token_id": eos, "bos_token_id": None, "pad_token_id": None}


def export_hf(ckpt_dir: str, out_dir: str, tokenizer: str | None = None) -> str:
    """Write ``out_dir`` loadable by ``CohereForCausalLM.from_pretrained``.

    Tokenizer files are added when ``tokenizer`` is given or the checkpoint's lineage
    records an existing one (``lineage.extra["tokenizer"]``).
    """
    from safetensors.torch import save_file

    from megablocks_ablate.checkpoint import load_model_checkpoint, staged_checkpoint_dir
    from megablocks_ablate.utils.outputs import write_marker

    state, cfg_dict, lineage = load_model_checkpoint(ckpt_dir)
    cfg = ModelConfig.from_dict(cfg_dict, _path=os.path.join(ckpt_dir, "config.json"))
    _refuse_non_finite(state, os.path.join(ckpt_dir, "model.safetensors"))
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise ConfigError(f"tokenizer: {tokenizer} does not exist")
    recorded = lineage.extra.get("tokenizer")
    if tokenizer is None and isinstance(recorded, str) and os.path.isfile(recorded):
        tokenizer = recorded  # a recorded path that is gone means: weights only
    dtype = next(iter(state.values())).dtype
    hf_state = to_hf_state_dict(state, cfg)
    with staged_checkpoint_dir(out_dir) as tmp:
        ids = _tokenizer_files(tokenizer, tmp) if tokenizer else {}
        hf_cfg = to_hf_config(cfg, dtype, ids)
        hf_cfg[OUR_KEY] = {"model": cfg.to_dict(), "lineage": lineage.to_dict()}
        save_file(hf_state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_cfg, f, indent=2)
            f.write("\n")
        # the marker lists what the export consists of, so a later --overwrite replaces
        # exactly these files and nothing a user added beside them
        write_marker(tmp, "hf-export", os.listdir(tmp))
    return out_dir


def _read_hf_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.path.join(hf_dir, shard)))
        return state
    if any(
        os.path.isfile(os.path.join(hf_dir, n))
        for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
    ):
        raise DataFormatError(
            f"{hf_dir}: only pickle weights (pytorch_model.bin); convert them to "
            "safetensors first (we never unpickle untrusted files)"
        )
    raise DataFormatError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def import_hf(hf_dir: str, out_ckpt: str) -> str:
    """Read a Cohere directory (ours or anyone's) into a checkpoint of kind ``imported``."""
    from megablocks_ablate.checkpoint import Lineage, save_model_checkpoint

    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise DataFormatError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hf_cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{cfg_path}: invalid JSON ({e})") from None
    cfg = from_hf_config(hf_cfg, cfg_path)
    state = from_hf_state_dict(_read_hf_weights(hf_dir), cfg, where=hf_dir)
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
    )
    save_model_checkpoint(out_ckpt, state, cfg.to_dict(), lineage)
    return out_ckpt
