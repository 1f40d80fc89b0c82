"""Weight averaging over the end of a run (``weight_average``): the run's ``final/``
model is an average of the weights it passed through, not the last step's.

Two kinds, both over the weights after each trained step from ``start_step`` on:

* ``tail``: their uniform mean (checkpoint averaging, as in LAWA / SWA);
* ``ema``: their exponential moving average, started at ``start_step`` from the
  weights then, ``avg <- decay * avg + (1 - decay) * weights`` after every later step.

A unit model trained on a small base unit ends where its last few noisy steps put it;
averaging takes out part of that noise before the units are merged (docs/fidelity.md
measures what it does to the merged proxy). Only parameters are averaged (buffers are
the model's own), in the parameters' dtype and placement: under DDP each rank keeps a
full copy, under FSDP2 its shard. A skipped (non-finite) step adds nothing.

Resumption is exact: a step checkpoint holds the average as full tensors
(``average.safetensors``, keyed like ``model.safetensors``, hashed with the rest) and
the number of steps it covers; a rollback restores both.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.train.config import WeightAverageConfig

NONE, EMA, TAIL = "none", "ema", "tail"


def start_step(cfg: WeightAverageConfig, total_steps: int) -> int:
    """The first step (1-based) whose weights the average takes: the step after
    ``start_fraction`` of the run (so always within it)."""
    return math.floor(cfg.start_fraction * total_steps) + 1


class WeightAverager:
    """The running average of ``module``'s parameters (the trained module itself, not a
    DDP wrapper; under FSDP2 its sharded parameters). ``enabled`` is False for ``kind:
    none``, and then nothing is averaged and :meth:`read` just reads."""

    def __init__(self, cfg: WeightAverageConfig, total_steps: int, module: torch.nn.Module):
        self.cfg = cfg
        self.enabled = cfg.kind != NONE
        self.first = start_step(cfg, total_steps)
        self.count = 0  # steps the average covers
        self._params = dict(module.named_parameters())
        self._avg: dict[str, torch.Tensor] = {}

    # ---- the average --------------------------------------------------------------------
    @torch.no_grad()
    def update(self, step: int) -> None:
        """Take the weights after optimizer step ``step`` (1-based; a trained step)."""
        if not self.enabled or step < self.first:
            return
        if self.count == 0:
            self._avg = {n: p.detach().clone() for n, p in self._params.items()}
        else:
            w = 1.0 / (self.count + 1) if self.cfg.kind == TAIL else 1.0 - self.cfg.ema_decay
            for n, p in self._params.items():
                self._avg[n].lerp_(p.detach(), w)
        self.count += 1

    def read(self, state_dict_fn: Callable[[], dict]) -> dict:
        """``state_dict_fn()`` (the model's state dict, by its own machinery: FSDP2
        gathers included) with the average in the model's parameters; the trained
        weights are back afterwards. Without averaging, just ``state_dict_fn()``. Every
        rank calls it together (a collective under FSDP2)."""
        if not self.enabled:
            return state_dict_fn()
        if self.count == 0:
            raise DataFormatError(
                f"weight_average: no step from step {self.first} on was averaged "
                "(every one was skipped as non-finite)"
            )
        with self._swapped_in():  # copies: a CPU state dict may alias the parameters
            return {k: v.detach().clone() for k, v in state_dict_fn().items()}

    @contextlib.contextmanager
    def _swapped_in(self) -> Iterator[None]:
        with torch.no_grad():
            trained = {n: p.detach().clone() for n, p in self._params.items()}
            for n, p in self._params.items():
                p.copy_(self._avg[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self._params.items():
                    p.copy_(trained[n])

    def restore(self, count: int, load_into_model: Callable[[], None]) -> None:
        """Restore a checkpoint's average covering ``count`` steps: ``load_into_model()``
        loads the saved average into the model (its state-dict machinery, on every
        rank), which is taken as the average; the trained weights are put back."""
        if not self.enabled:
            return
        self.count = int(count)
        self._avg = {}
        if not self.count:
            return
        with torch.no_grad():
            trained = {n: p.detach().clone() for n, p in self._params.items()}
        load_into_model()
        with torch.no_grad():
            self._avg = {n: p.detach().clone() for n, p in self._params.items()}
            for n, p in self._params.items():
                p.copy_(trained[n])

    # ---- records ------------------------------------------------------------------------
    def record(self) -> dict:
        """What the lineage and COMPLETE.json say about the average (empty: none)."""
        if not self.enabled:
            return {}
        rec = {"kind": self.cfg.kind, "start_step": self.first, "steps_averaged": self.count}
        if self.cfg.kind == EMA:
            rec["ema_decay"] = self.cfg.ema_decay
        return {"weight_average": rec}

    def trainer_state(self) -> dict:
        """The checkpoint's ``trainer_state.json`` entry (empty: none)."""
        return {"weight_average_steps": self.count} if self.enabled else {}

    def saved_count(self, trainer_state: dict, has_average: bool, where: str) -> int:
        """The averaged steps a checkpoint's ``trainer_state`` records, refused when its
        average file is missing."""
        count = int(trainer_state.get("weight_average_steps", 0)) if self.enabled else 0
        if count and not has_average:
            raise DataFormatError(
                f"{where}: records {count} averaged steps but holds no average "
                "(average.safetensors); delete it to resume from an earlier checkpoint"
            )
        return count
