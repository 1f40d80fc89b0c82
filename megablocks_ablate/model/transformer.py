"""The decoder: one module for every family, shaped by :class:`ModelConfig`.

By default (every preset) a PaLM-style parallel block that maps one to one onto HF
``CohereForCausalLM``: one norm feeds attention and MLP, added in parallel::

    h = Norm(x)
    q, k, v, gate_up = split(h @ W_in.T)         # one fused input GEMM
    a = Attn(RoPE(QKNorm(q)), RoPE(QKNorm(k)), v)
    x = x + a @ W_attn_out.T + SwiGLU(gate_up) @ W_mlp_out.T

The family fields generalise it (``model/hf.py`` maps Llama and GPT-NeoX onto them):

* ``norms_per_block: 2`` -- attention reads ``Norm(x)``, the MLP ``MlpNorm(x)``
  (GPT-NeoX's parallel block); ``block: sequential`` -- ``x += Attn(Norm(x))`` then
  ``x += MLP(MlpNorm(x))`` (Llama). The input projection stays one matrix (rows
  q|k|v|mlp_in); when its two halves read different inputs it is two GEMMs on row slices.
* ``mlp: gelu`` -- ``gelu(h @ W_mlp_in.T + b)`` instead of SwiGLU; ``bias`` -- biases on
  ``in_proj``, ``attn_out`` and ``mlp_out``; ``norm_bias`` -- LayerNorm with bias.
* ``rope_layout: half`` -- channel ``i`` pairs with ``i + rotary_dim/2`` (rotate-half)
  instead of ``(2i, 2i+1)``; ``rotary_fraction`` -- only the first ``rotary_dim`` channels
  of each head rotate.

Output projections are initialised with std ``init_std / sqrt(2 * n_layers)``, biases
with zeros. Norm, RoPE, the MLP activation and the fused output projection +
cross-entropy go through :mod:`megablocks_ablate.kernels.dispatch` (Triton on CUDA
where a kernel covers the case, PyTorch references elsewhere). A plain ``nn.Module``:
no distributed code here.

The in-projection gradient (``MBA_INPROJ_GRAD``, :func:`dispatch.configured_inproj_grad`):
under ``autograd`` (default) the splits of the projection's output (``qk | v | mlp_in``,
then q/k after RoPE) are ``Tensor.split`` and their backwards ``cat``s; under ``buffer``
the block splits through :func:`megablocks_ablate.kernels.inproj_grad.split`, and the
RoPE, SwiGLU and GELU backwards write straight into one gradient buffer that goes to the
GEMM's backward as it is (attention's ``dv``, and ``dqk`` behind ``qk_norm``, are copied
into their slices). With two norms only the attention half (``qk | v``) is split this
way; the MLP half has its own GEMM and no split. Not under ``torch.compile`` (which
plans its own buffers) nor without grad (nothing to assemble).

Activation checkpointing (:func:`checkpointed_blocks`): ``none`` keeps every block's
activations for backward; ``full`` recomputes every block's forward in backward
(only its input is kept); ``selective`` recomputes every other block (0, 2, 4, ...):
about half of ``full``'s memory saving for about half its extra compute. The policy is
set by the trainer (:meth:`Transformer.set_activation_checkpointing`, from the train
config's ``activation_checkpointing``); a model built on its own follows the
deprecated ``ModelConfig.activation_checkpointing`` flag (``true``: ``full``).

Parameter names (``state_dict``)::

    embed.weight                  [padded_vocab, d_model]
    layers.{i}.norm.weight        [d_model]                  (.bias: norm_bias)
    layers.{i}.mlp_norm.weight    [d_model]                  (norms_per_block=2; .bias: norm_bias)
    layers.{i}.in_proj.weight     [q_dim + 2*kv_dim + mlp_in_dim, d_model]  rows: q|k|v|gate|up
                                                             (gelu: q|k|v|hidden; .bias: bias)
    layers.{i}.qk_norm.weight     [n_heads + n_kv_heads, head_dim]            (qk_norm only)
    layers.{i}.attn_out.weight    [d_model, q_dim]           (.bias: bias)
    layers.{i}.mlp_out.weight     [d_model, mlp_hidden]      (.bias: bias)
    norm.weight                   [d_model]                  (.bias: norm_bias)
    lm_head.weight                [padded_vocab, d_model]                     (untied only)

Labels are aligned with the inputs (``labels[:, t]`` is the target at position ``t``;
the data pipeline does the shift) and ``-100`` marks positions that do not count.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.kernels import dispatch, inproj_grad
from megablocks_ablate.kernels.cross_entropy import IGNORE_INDEX
from megablocks_ablate.kernels.rope import rope_tables

if TYPE_CHECKING:  # the config builds the model (ModelConfig.build), not the reverse
    from megablocks_ablate.model.config import ModelConfig

CHECKPOINTING_POLICIES = ("none", "selective", "full")


def checkpointed_blocks(policy: str, n_layers: int) -> frozenset[int]:
    """Indices of the blocks whose forward is recomputed in backward under ``policy``:
    none, every block (``full``) or the even ones (``selective``: 0, 2, 4, ...)."""
    if policy not in CHECKPOINTING_POLICIES:
        raise ConfigError(
            f"activation_checkpointing: expected one of {list(CHECKPOINTING_POLICIES)}, "
            f"got {policy!r}"
        )
    step = {"none": 0, "selective": 2, "full": 1}[policy]
    return frozenset(range(0, n_layers, step)) if step else frozenset()


class Norm(nn.Module):
    """LayerNorm (bias optional) or RMSNorm over the last dim; weight of shape ``shape``."""

    def __init__(self, shape, eps: float, kind: str, device=None, dtype=None, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.eps, self.kind = eps, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.norm(x, self.weight, self.eps, self.kind, bias=self.bias)


class Block(nn.Module):
    """One decoder block: parallel (``x + Attn + MLP``) or sequential, 1 or 2 norms.

    With one norm feeding both halves (the default) the input projection is one GEMM.
    """

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.norm = Norm(d, cfg.norm_eps, cfg.norm, device, dtype, bias=cfg.norm_bias)
        self.mlp_norm = (
            Norm(d, cfg.norm_eps, cfg.norm, device, dtype, bias=cfg.norm_bias)
            if cfg.norms_per_block == 2
            else None
        )
        self.in_proj = nn.Linear(d, cfg.in_proj_dim, bias=cfg.bias, device=device, dtype=dtype)
        self.qk_norm = (
            Norm(
                (cfg.n_heads + cfg.n_kv_heads, cfg.head_dim), cfg.norm_eps, cfg.norm, device, dtype
            )
            if cfg.qk_norm
            else None
        )
        self.attn_out = nn.Linear(cfg.q_dim, d, bias=cfg.bias, device=device, dtype=dtype)
        self.mlp_out = nn.Linear(cfg.mlp_hidden, d, bias=cfg.bias, device=device, dtype=dtype)

    def _attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        # torch.split's backward is a single cat, cheaper than slicing three times.
        qk, v = qkv.split([cfg.q_dim + cfg.kv_dim, cfg.kv_dim], dim=-1)
        # q and k sit side by side: normalise and rotate them as one [.., H + KV, hd] tensor.
        qk = qk.unflatten(-1, (cfg.n_heads + cfg.n_kv_heads, cfg.head_dim))
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        qk = dispatch.rope(qk, cos, sin, layout=cfg.rope_layout)
        q, k = qk.split([cfg.n_heads, cfg.n_kv_heads], dim=2)
        a = dispatch.attention(q, k, v.unflatten(-1, (cfg.n_kv_heads, cfg.head_dim)))
        return self.attn_out(a.flatten(-2))

    def _attention_slots(
        self,
        qk: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        qk_slot: inproj_grad.GradSlot,
    ) -> torch.Tensor:
        """:meth:`_attention` on the views of :func:`inproj_grad.split`
        (``MBA_INPROJ_GRAD=buffer``)."""
        cfg = self.cfg
        grad_into: inproj_grad.GradSlot | None = qk_slot
        if self.qk_norm is not None:  # the norm's backward writes its own dqk: copied
            qk, grad_into = self.qk_norm(qk), None
        q, k = dispatch.rope_pair(
            qk, cos, sin, cfg.n_heads, layout=cfg.rope_layout, grad_into=grad_into
        )
        a = dispatch.attention(q, k, v)
        return self.attn_out(a.flatten(-2))

    def _mlp(
        self, mlp_in: torch.Tensor, grad_into: inproj_grad.GradSlot | None = None
    ) -> torch.Tensor:
        if self.cfg.mlp == "swiglu":
            return self.mlp_out(dispatch.swiglu(mlp_in, grad_into))
        return self.mlp_out(dispatch.gelu(mlp_in, grad_into))

    def _parts(self, with_mlp: bool) -> list[inproj_grad.Part]:
        """The in-projection output's pieces: ``qk`` and ``v`` as heads, then ``mlp_in``."""
        cfg = self.cfg
        qk, n_kv = cfg.q_dim + cfg.kv_dim, cfg.kv_dim // cfg.head_dim
        parts: list[inproj_grad.Part] = [
            (0, qk, (cfg.n_heads + n_kv, cfg.head_dim)),
            (qk, qk + cfg.kv_dim, (n_kv, cfg.head_dim)),
        ]
        if with_mlp:
            parts.append((qk + cfg.kv_dim, qk + cfg.kv_dim + cfg.mlp_in_dim, None))
        return parts

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        sizes = [cfg.q_dim + 2 * cfg.kv_dim, cfg.mlp_in_dim]
        buffer = (
            torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and dispatch.configured_inproj_grad() == "buffer"
        )
        if self.mlp_norm is None:  # one norm, parallel: one fused input GEMM
            y = self.in_proj(self.norm(x))
            if buffer:
                (qk, v, mlp_in), (qk_slot, _, mlp_slot) = inproj_grad.split(y, self._parts(True))
                a = self._attention_slots(qk, v, cos, sin, qk_slot)
                return x + (a + self._mlp(mlp_in, mlp_slot))
            qkv, mlp_in = y.split(sizes, dim=-1)
            return x + (self._attention(qkv, cos, sin) + self._mlp(mlp_in))
        w_attn, w_mlp = self.in_proj.weight.split(sizes, dim=0)
        b_attn, b_mlp = (
            (None, None) if self.in_proj.bias is None else self.in_proj.bias.split(sizes)
        )
        qkv = F.linear(self.norm(x), w_attn, b_attn)
        if buffer:  # the attention half only: the MLP half is its own GEMM, no split
            (qk, v), (qk_slot, _) = inproj_grad.split(qkv, self._parts(False))
            a = self._attention_slots(qk, v, cos, sin, qk_slot)
        else:
            a = self._attention(qkv, cos, sin)
        if cfg.block == "sequential":
            x = x + a
            return x + self._mlp(F.linear(self.mlp_norm(x), w_mlp, b_mlp))
        return x + (a + self._mlp(F.linear(self.mlp_norm(x), w_mlp, b_mlp)))


class Transformer(nn.Module):
    """Decoder-only LM: embedding, ``n_layers`` blocks, final norm, output projection."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, device, dtype) for _ in range(cfg.n_layers))
        self.norm = Norm(cfg.d_model, cfg.norm_eps, cfg.norm, device, dtype, bias=cfg.norm_bias)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else nn.Linear(
                cfg.d_model, cfg.padded_vocab_size, bias=False, device=device, dtype=dtype
            )
        )
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # None: follow the config's (deprecated) boolean; see set_activation_checkpointing
        self.activation_checkpointing: str | None = None
        self.reset_parameters()
        if cfg.compile:  # (the trainer's blocks: train/parallel.py build_model, apply_compile)
            for block in self.layers:
                block.compile()

    # ---- init ------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; output projections scaled by 1/sqrt(2 n_layers);
        biases zero, norm weights one."""
        cfg = self.cfg
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_init else cfg.init_std
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        for block in self.layers:
            nn.init.normal_(block.in_proj.weight, std=cfg.init_std)
            nn.init.normal_(block.attn_out.weight, std=out_std)
            nn.init.normal_(block.mlp_out.weight, std=out_std)
            for linear in (block.in_proj, block.attn_out, block.mlp_out):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        for module in self.modules():
            if isinstance(module, Norm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ---- activation checkpointing ------------------------------------------------------
    def set_activation_checkpointing(self, policy: str) -> None:
        """Recompute blocks in backward by ``policy`` (none | selective | full; see the
        module doc). Parameter names and the state dict do not change."""
        checkpointed_blocks(policy, len(self.layers))  # validates the name
        self.activation_checkpointing = policy

    def checkpointing_policy(self) -> str:
        """The policy in force: the one set, else ``full`` when the config's flag is on."""
        if self.activation_checkpointing is not None:
            return self.activation_checkpointing
        return "full" if self.cfg.activation_checkpointing else "none"

    # ---- pieces ----------------------------------------------------------------------
    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin ``[max_seq_len, rotary_dim/2]``, cached per device.

        Not buffers: ``model.to(bfloat16)`` would round them, and they would clutter
        the state dict that merges average.
        """
        tables = self._rope.get(device)
        if tables is None:
            tables = rope_tables(
                self.cfg.max_seq_len, self.cfg.rotary_dim, self.cfg.rope_theta, device
            )
            self._rope[device] = tables
        return tables

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states ``[batch, seq, d_model]``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.cfg.max_seq_len:
            raise ConfigError(
                f"max_seq_len: sequence of {input_ids.shape[1]} tokens exceeds "
                f"the model's max_seq_len={self.cfg.max_seq_len}"
            )
        cos, sin = self.rope_tables(input_ids.device)
        x = self.embed(input_ids)
        recompute = (
            checkpointed_blocks(self.checkpointing_policy(), len(self.layers))
            if self.training and torch.is_grad_enabled()
            else frozenset()
        )
        for i, block in enumerate(self.layers):
            if i in recompute:  # non-reentrant: composes with FSDP2's hooks on the block
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.norm(x)

    # ---- API used by the trainer and the evaluator -------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, padded_vocab]`` (scaled by ``logit_scale``), or, given
        ``labels``, the mean cross-entropy over non-ignored positions through the
        chunked fused output projection (the full logits are never built)."""
        h = self.hidden_states(input_ids)
        if labels is None:
            logits = F.linear(h, self.output_weight)
            return logits * self.cfg.logit_scale if self.cfg.logit_scale != 1.0 else logits
        return dispatch.linear_cross_entropy(
            h.flatten(0, 1),
            self.output_weight,
            labels.flatten(),
            logit_scale=self.cfg.logit_scale,
            reduction="mean",
        )

    def per_token_nll(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """fp32 negative log-likelihood ``[batch, seq]`` of ``labels`` (0 where ``-100``)."""
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        h = self.hidden_states(input_ids)
        nll = dispatch.linear_cross_entropy(
            h.flatten(0, 1),
            self.output_weight,
            labels.flatten(),
            logit_scale=self.cfg.logit_scale,
            reduction="none",
            ignore_index=IGNORE_INDEX,
        )
        return nll.view(labels.shape)

    def num_params(self) -> int:
        """Distinct parameters of this module (tied weights once)."""
        return sum(p.numel() for p in self.parameters())
