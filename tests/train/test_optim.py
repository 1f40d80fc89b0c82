"""LR schedule values and the AdamW parameter groups."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megablocks_ablate.train.config import TrainConfig
from megablocks_ablate.train.optim import build_optimizer, lr_at, param_groups


def _cfg(*extra):
    # 11 steps: warmup 0..1, decay over steps 2..10
    return TrainConfig.load(
        None,
        [
            "seq_len=8",
            "global_batch_tokens=8",
            "micro_batch=1",
            "train_tokens=88",
            "optimizer.lr=1.0",
            "schedule.min_lr=0.1",
            "schedule.warmup_steps=2",
            *extra,
        ],
    )


def test_cosine_schedule_known_values():
    cfg = _cfg()
    assert cfg.train_steps == 11
    lrs = [lr_at(s, cfg) for s in range(11)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # linear warmup
    assert lrs[2] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.1)  # peak -> min at the end
    assert lrs[6] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))


def test_linear_constant_and_rewarming():
    lin = _cfg("schedule.decay=linear")
    assert lr_at(6, lin) == pytest.approx(0.55) and lr_at(10, lin) == pytest.approx(0.1)
    const = _cfg("schedule.decay=constant")
    assert lr_at(10, const) == 1.0
    # continued pretraining re-warms from the seed's final LR back to the peak
    rewarm = _cfg("schedule.warmup_start_lr=0.1", "schedule.warmup_steps=3")
    assert [round(lr_at(s, rewarm), 6) for s in range(3)] == [0.4, 0.7, 1.0]
    # warmup as a fraction of the run
    assert _cfg("schedule.warmup_steps=null", "schedule.warmup_fraction=0.5").warmup_steps() == 6


def test_param_groups_exclude_norms_from_weight_decay():
    from megablocks_ablate.model.config import ModelConfig

    model = ModelConfig.from_preset("tiny").build()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() == 1 for p in no_decay["params"]
    )
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = build_optimizer(model, TrainConfig().optimizer, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
