"""AdamW and the learning-rate schedule.

Weight decay applies to matrices (and the embedding) but not to 1-D norm weights,
the usual practice for transformers. The schedule is a pure function of the step, so
a resumed run needs nothing but the step to continue it exactly.
"""

from __future__ import annotations

import math

import torch

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.train.config import OptimizerConfig, TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of a run of ``cfg.train_steps``.

    Linear warmup from ``warmup_start_lr`` to ``optimizer.lr`` over the warmup steps
    (step 0 already takes one warmup increment, so no step runs at exactly 0), then
    cosine or linear decay reaching ``min_lr`` at the last step, or constant.
    """
    peak, sch = cfg.optimizer.lr, cfg.schedule
    total, warm = cfg.train_steps, cfg.warmup_steps()
    if step < warm:
        return sch.warmup_start_lr + (peak - sch.warmup_start_lr) * (step + 1) / warm
    if sch.decay == "constant":
        return peak
    span = max(total - 1 - warm, 1)
    progress = min(max(step - warm, 0) / span, 1.0)
    if sch.decay == "linear":
        return peak + (sch.min_lr - peak) * progress
    return sch.min_lr + 0.5 * (peak - sch.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed (dim >= 2) and not decayed (norm weights)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, device: torch.device):
    """AdamW: torch's fused kernel on CUDA, foreach on CPU; apex FusedAdam when asked."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.impl == "apex":
        try:
            from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError("optimizer.impl: apex is not installed (use auto or torch)") from None
        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
