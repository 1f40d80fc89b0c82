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
  SwiGLU MLP's parameter count equal to a 4x GELU MLP's.
* ``head_dim = d_model // n_heads``; ``n_kv_heads`` defaults to ``n_heads`` (no GQA).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from megablocks_ablate.config import Config, doc
from megablocks_ablate.errors import ConfigError

if TYPE_CHECKING:  # torch is imported lazily so configs load without it
    from megablocks_ablate.model.transformer import Transformer

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


def _round_up(x: int, multiple: int) -> int:
    return ((x + multiple - 1) // multiple) * multiple


@dataclass
class ModelConfig(Config):
    """Shape and options of the PaLM-style parallel-block decoder (maps onto HF Cohere)."""

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
        "SwiGLU hidden width in features (default: 8/3*d_model rounded up to 128)", None
    )
    max_seq_len: int = doc("longest sequence in tokens (RoPE positions)", 2048)
    rope_theta: float = doc("RoPE base frequency (theta)", 10000.0)
    qk_norm: bool = doc(
        "normalise queries and keys per head before RoPE (Cohere use_qk_norm)", False
    )
    tie_embeddings: bool = doc("share the input embedding and the output projection", True)
    norm: Literal["layernorm", "rmsnorm"] = doc(
        "block norm: layernorm (no bias; exportable to HF Cohere) or rmsnorm", "layernorm"
    )
    norm_eps: float = doc("norm epsilon (added to the variance)", 1e-5)
    init_std: float = doc("std of the normal init of embeddings and projections", 0.02)
    scaled_init: bool = doc("scale output projections' init by 1/sqrt(2*n_layers)", True)
    logit_scale: float = doc("multiply the logits by this (Cohere logit_scale)", 1.0)
    activation_checkpointing: bool = doc("recompute each block in backward to save memory", False)
    compile: bool = doc("torch.compile each block (slower start, faster steps)", False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden is None:
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

    # ---- derived sizes -------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        return _round_up(self.vocab_size, self.vocab_multiple)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def in_proj_dim(self) -> int:
        """Rows of the fused input projection: q, k, v, SwiGLU gate, SwiGLU up."""
        return self.q_dim + 2 * self.kv_dim + 2 * self.mlp_hidden

    def block_params(self) -> int:
        d = self.d_model
        n = d * self.in_proj_dim + self.q_dim * d + self.mlp_hidden * d + d
        if self.qk_norm:
            n += (self.n_heads + self.n_kv_heads) * self.head_dim
        return n

    def num_params(self, embeddings: bool = True) -> int:
        """Distinct parameters (a tied output projection counts once).

        ``embeddings=False`` leaves out the input embedding, and the output projection
        when untied: the "non-embedding" count of scaling-law papers.
        """
        body = self.n_layers * self.block_params() + self.d_model  # + final norm
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
