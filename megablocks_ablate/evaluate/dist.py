"""The little of ``torch.distributed`` evaluation needs beyond the process-group init
(which is :func:`megablocks_ablate.train.distributed.init_distributed`, shared with the
trainer): rank and size of a group, a barrier, and where collective buffers live."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world(group=None) -> tuple[int, int]:
    """This process's rank and the group size (``(0, 1)`` without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def barrier(group=None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group)


def comm_device(group=None) -> torch.device:
    """Where collective buffers must live: CUDA for NCCL, CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
