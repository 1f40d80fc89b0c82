"""Model configuration: the parallel-block decoder's shape, and what it costs.

Presets live as YAML in ``configs/model/<name>.yaml`` (``tiny``, ``demo``, ``130m``,
``1.1b``)::

    cfg = ModelConfig.from_preset("130m", ["n_layers=6"])
    model = cfg.build()
    cfg.num_params(), cfg.flops_per_token(seq_len=2048)

Derived sizes (stated once, here):

* ``padded_vocab_size``: ``vocab_size`` rounded up to a multiple of ``vocab_multiple``
  (128 by default, so 50277 GPT-NeoX tokens -> 50304 rows).
* ``mlp_hidden`` (SwiGLU hidden width) when left empty: ``8/3 * d_model`` rounded UP
  to a multiple of 128 (768 -> 2048, 2048 -> 5504, 128 -> 384). The 8/3 keeps the
  SwiGLU MLP's parameter count equal to a 4x GELU MLP's (``mlp: gelu``: ``4 * d_model``).
* ``rotary_dim = int(head_dim * rotary_fraction)`` channels of each head are rotated.
* ``head_dim = d_model // n_heads``; ``n_kv_heads`` defaults to ``n_heads`` (no GQA).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from megablocks_ablate.config import Config, doc, shipped_preset_dir
from megablocks_ablate.errors import ConfigError

if TYPE_CHECKING:  # torch is imported lazily so configs load without it
    from megablocks_ablate.model.transformer import Transformer

PRESET_DIR = shipped_preset_dir("model")  # megablocks_ablate/configs/model/, package data


def _round_up(x: int, multiple: int) -> int:
    return ((x + multiple - 1) // multiple) * multiple


@dataclass
class ModelConfig(Config):
    """Shape and options of the decoder: a PaLM-style parallel block by default (HF Cohere);
    the family fields (``block`` ... ``rope_layout``) also describe Llama and GPT-NeoX."""

    preset_dir = PRESET_DIR  # not a field: where `base: <name>` finds model presets

    vocab_size: int = doc(
        "tokenizer vocabulary size in tokens (padded up by vocab_multiple)", 50277
    )
    vocab_multiple: int = doc(
        "pad the embedding rows (vocabulary entries) to a multiple of this", 128
    )
    d_model: int = doc("residual stream width (features per token)", 768)
    n_layers: int = doc("number of parallel blocks (layers)", 12)
    n_heads: int = doc("attention (query) heads; head_dim = d_model // n_heads", 12)
    n_kv_heads: int | None = doc(
        "key/value heads for grouped-query attention (default: n_heads)", None
    )
    mlp_hidden: int | None = doc(
        "MLP hidden width in features (default: swiglu 8/3*d_model rounded up to 128, "
        "gelu 4*d_model)",
        None,
    )
    max_seq_len: int = doc("longest sequence in tokens (RoPE positions)", 2048)
    rope_theta: float = doc("RoPE base frequency (theta)", 10000.0)
    qk_norm: bool = doc(
        "normalise queries and keys per head before RoPE (Cohere use_qk_norm)", False
    )
    tie_embeddings: bool = doc("share the input embedding and the output projection", True)
    norm: Literal["layernorm", "rmsnorm"] = doc(
        "block norm: layernorm (Cohere, GPT-NeoX; see norm_bias) or rmsnorm (Llama)",
        "layernorm",
    )
    norm_eps: float = doc("norm epsilon (added to the variance)", 1e-5)
    # ---- family fields (Llama, GPT-NeoX/Pythia); defaults are the Cohere-style block ----
    block: Literal["parallel", "sequential"] = doc(
        "block wiring: parallel (x + Attn(.) + MLP(.), Cohere, GPT-NeoX) or sequential "
        "(x += Attn(Norm(x)); x += MLP(Norm2(x)), Llama)",
        "parallel",
    )
    norms_per_block: int = doc(
        "norms per block: 1 (one norm feeds attention and MLP) or 2 (attention and MLP "
        "each have their own: GPT-NeoX, Llama; sequential blocks need 2)",
        1,
    )
    norm_bias: bool = doc("norms carry a bias (GPT-NeoX LayerNorm; layernorm only)", False)
    mlp: Literal["swiglu", "gelu"] = doc(
        "MLP: swiglu (silu(gate) * up) or gelu (exact erf GELU, one input matrix: GPT-NeoX)",
        "swiglu",
    )
    bias: bool = doc("biases on every linear layer but the output projection (GPT-NeoX)", False)
    rotary_fraction: float = doc(
        "fraction of each head's channels that RoPE rotates (GPT-NeoX rotary_pct); "
        "the rest pass through",
        1.0,
    )
    rope_layout: Literal["interleaved", "half"] = doc(
        "RoPE channel pairing: interleaved (2i, 2i+1; Cohere) or half (i, i + rotary_dim/2; "
        "Llama, GPT-NeoX rotate_half)",
        "interleaved",
    )
    init_std: float = doc("std of the normal init of embeddings and projections", 0.02)
    scaled_init: bool = doc("scale output projections' init by 1/sqrt(2*n_layers)", True)
    logit_scale: float = doc("multiply the logits by this (Cohere logit_scale)", 1.0)
    activation_checkpointing: bool = doc(
        "deprecated: use the train config's activation_checkpointing (none|selective|full); "
        "true here means full. Kept so checkpoints' config.json and run keys stay as they were",
        False,
    )
    compile: bool = doc("torch.compile each block (slower start, faster steps)", False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden is None:
            if self.mlp == "gelu":
                self.mlp_hidden = 4 * self.d_model
            else:
                self.mlp_hidden = _round_up(math.ceil(8 * self.d_model / 3), 128)
        super().__post_init__()

    def validate(self) -> None:
        for name in (
            "vocab_size",
            "vocab_multiple",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "mlp_hidden",
            "max_seq_len",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads: must divide d_model={self.d_model}, got {self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(
                f"n_heads: head_dim d_model/n_heads must be even for RoPE, got {self.head_dim}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_kv_heads: must divide n_heads={self.n_heads}, got {self.n_kv_heads}"
            )
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            raise ConfigError("norm_eps, init_std and rope_theta must be positive")
        if self.norms_per_block not in (1, 2):
            raise ConfigError(f"norms_per_block: must be 1 or 2, got {self.norms_per_block}")
        if self.block == "sequential" and self.norms_per_block != 2:
            raise ConfigError("norms_per_block: sequential blocks need 2 (one before each half)")
        if self.norm_bias and self.norm != "layernorm":
            raise ConfigError(f"norm_bias: only layernorm has a bias, norm is {self.norm!r}")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ConfigError(f"rotary_fraction: must be in (0, 1], got {self.rotary_fraction}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigError(
                f"rotary_fraction: rotary_dim = int(head_dim * rotary_fraction) must be even "
                f"and >= 2, got {self.rotary_dim} (head_dim={self.head_dim})"
            )

    # Family fields at their defaults are left out of to_dict(): a checkpoint's
    # config.json and a run's content key (registry) stay what they were before these
    # fields existed. from_dict() fills them back in.
    _FAMILY_DEFAULTS: ClassVar[dict] = {
        "block": "parallel",
        "norms_per_block": 1,
        "norm_bias": False,
        "mlp": "swiglu",
        "bias": False,
        "rotary_fraction": 1.0,
        "rope_layout": "interleaved",
    }

    def to_dict(self) -> dict:
        d = super().to_dict()
        for name, default in self._FAMILY_DEFAULTS.items():
            if name in d and d[name] == default:
                del d[name]
        return d

    # ---- derived sizes -------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        return _round_up(self.vocab_size, self.vocab_multiple)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Leading channels of each head that RoPE rotates: ``int(head_dim * rotary_fraction)``."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def mlp_in_dim(self) -> int:
        """Rows of the MLP's input matrix: gate and up (swiglu) or the hidden layer (gelu)."""
        return (2 if self.mlp == "swiglu" else 1) * self.mlp_hidden

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def in_proj_dim(self) -> int:
        """Rows of the input projection: q, k, v, then SwiGLU gate and up (or GELU hidden)."""
        return self.q_dim + 2 * self.kv_dim + self.mlp_in_dim

    def block_params(self) -> int:
        d = self.d_model
        n = d * self.in_proj_dim + self.q_dim * d + self.mlp_hidden * d
        n += self.norms_per_block * d * (2 if self.norm_bias else 1)
        if self.bias:
            n += self.in_proj_dim + 2 * d  # in_proj, attn_out and mlp_out biases
        if self.qk_norm:
            n += (self.n_heads + self.n_kv_heads) * self.head_dim
        return n

    def num_params(self, embeddings: bool = True) -> int:
        """Distinct parameters (a tied output projection counts once).

        ``embeddings=False`` leaves out the input embedding, and the output projection
        when untied: the "non-embedding" count of scaling-law papers.
        """
        final_norm = self.d_model * (2 if self.norm_bias else 1)
        body = self.n_layers * self.block_params() + final_norm
        table = self.padded_vocab_size * self.d_model
        if not embeddings:
            return body
        return body + table * (1 if self.tie_embeddings else 2)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, forward + backward, attention included.

        ``6 * N_matmul + 12 * n_layers * q_dim * seq_len`` (PaLM, appendix B) where
        ``N_matmul = num_params(embeddings=False) + padded_vocab * d_model``: every
        weight that is multiplied (the output projection always is, tied or not; the
        input embedding is a lookup and costs nothing). The attention term counts the
        full (non-causal) QK^T and AV products, as PaLM's MFU does.
        """
        t = self.max_seq_len if seq_len is None else seq_len
        n_matmul = self.num_params(embeddings=False) + self.padded_vocab_size * self.d_model
        return 6 * n_matmul + 12 * self.n_layers * self.q_dim * t

    # ---- construction --------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str | os.PathLike, overrides: Iterable[str] = ()) -> ModelConfig:
        """Load ``configs/model/<name>.yaml`` (or a YAML path) plus ``key=value`` overrides."""
        return cls.load_preset(PRESET_DIR, name, overrides, what="model preset")

    def build(self, device=None, dtype=None) -> Transformer:
        """Instantiate the model with freshly initialised weights."""
        from megablocks_ablate.model.transformer import Transformer

        return Transformer(self, device=device, dtype=dtype)
