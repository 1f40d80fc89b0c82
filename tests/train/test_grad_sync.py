"""Gradient sync per micro batch (``train/parallel.py`` :func:`micro_batch_sync`, used
by the trainer's step): FSDP2 reduce-scatters on the last micro batch, or on every one
with ``distributed.fsdp_reduce_every_micro_batch`` (HSDP's all-reduce still on the last
only); DDP skips the all-reduce but on the last. The collectives themselves and the
equal results are checked on 2 gloo ranks in ``test_parallel.py`` (the worker's
``_check_micro_batches``) and through the trainer in ``test_distributed.py``."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from megablocks_ablate.train import parallel as par
from megablocks_ablate.train.config import TrainConfig
from megablocks_ablate.train.distributed import DistEnv
from megablocks_ablate.train.trainer import Trainer


class _Recorder(torch.nn.Module):
    """Stands for a wrapped model (FSDP2's or DDP's gradient-sync methods): records the
    calls made on it, forward included; its loss is a plain function of one weight."""

    def __init__(self, kind: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls: list = []
        if kind == "fsdp":
            self.set_requires_gradient_sync = lambda v: self.calls.append(("sync", v))
            self.set_requires_all_reduce = lambda v: self.calls.append(("all_reduce", v))
        elif kind == "ddp":
            self.no_sync = lambda: self.calls.append("no_sync") or contextlib.nullcontext()

    def forward(self, ids, labels):
        self.calls.append("forward")
        return self.w * ids.float().mean()


@pytest.mark.parametrize(
    "kind, every, expected",
    [
        ("fsdp", False, [("sync", False), ("sync", True)]),
        # HSDP: reduce-scatter every time, all-reduce the summed shards at the end
        (
            "fsdp",
            True,
            [("sync", True), ("all_reduce", False), ("sync", True), ("all_reduce", True)],
        ),
        ("ddp", False, ["no_sync"]),
        ("plain", False, []),
        ("plain", True, []),  # one process: nothing to synchronise
    ],
)
def test_micro_batch_sync(kind, every, expected):
    model = _Recorder(kind)
    for last in (False, True):
        with par.micro_batch_sync(model, last, every):
            pass
    assert model.calls == expected


@pytest.mark.parametrize("every", [False, True])
def test_the_trainer_step_sets_sync_before_each_micro_batch(tmp_path, every):
    """One optimizer step of 2 micro batches: the sync is set before each forward, as
    ``fsdp_reduce_every_micro_batch`` says; the gradient is the mean over both."""
    cfg = TrainConfig.load(
        None,
        [
            f"out_dir={tmp_path}",
            "seq_len=8",
            "global_batch_tokens=32",  # 4 sequences: 2 micro batches of 2 on one rank
            "micro_batch=2",
            "train_tokens=32",
            "device=cpu",
            "grad_clip=0",
            "distributed.parallel=fsdp",
            f"distributed.fsdp_reduce_every_micro_batch={str(every).lower()}",
        ],
    )
    model = _Recorder("fsdp")
    batches = iter([np.full((2, 9), 2, np.int32), np.full((2, 9), 4, np.int32)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    check = Trainer(cfg, DistEnv())._step_runner(model)(batches, optimizer, 1)
    sync = [("sync", True), ("all_reduce", False)] if every else [("sync", False)]
    last = [("sync", True), ("all_reduce", True)] if every else [("sync", True)]
    assert model.calls == [*sync, "forward", *last, "forward"]
    assert check.finite and check.loss == pytest.approx(3.0)  # mean of 2 and 4
    assert model.w.item() == pytest.approx(1.0 - 3.0)  # SGD step on the mean gradient
