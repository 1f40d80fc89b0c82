"""Non-finite (NaN/inf) losses and gradients: detection, and what ``nan_policy`` does.

The check costs one small all-reduce and one host sync per step, before the optimizer
steps, and no extra pass over the gradients: the gradient norm is the one clipping
needs anyway (taken before clipping, then used for it). The norm is global by
construction (DDP has all-reduced the gradients; FSDP2's norm is a DTensor, reduced by
``full_tensor``), and the all-reduce carries each rank's loss (for its mean, which is
non-finite when any rank's is) with a flag for a non-finite norm, so every rank takes
the same decision, which the collectives of the following steps require. Only when the
norm is non-finite are the gradients scanned for the first parameter, in model order,
with a NaN or inf; a flag per parameter is all-reduced so that every rank, FSDP2
shards included, names the same one.

``nan_policy`` (:class:`DivergenceGuard`): ``stop`` raises :class:`NonFiniteError`;
``skip`` drops the step's update (the step counts: its data is consumed and the LR
schedule moves on) and stops after ``nan_max_skips`` skipped steps in a row;
``rollback`` restores the newest step checkpoint and continues from it, and stops when
there is none or when the same step diverges again.

Whatever the policy, a run is certified (``final/`` and ``COMPLETE.json``) only when
its last step trained (:meth:`DivergenceGuard.check_end`: a run whose last steps were
skipped diverged for good, and its final loss is undefined) and its weights are finite
(the trainer's check, :func:`megablocks_ablate.checkpoint.check_finite_state`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from megablocks_ablate.errors import ConfigError, NonFiniteError
from megablocks_ablate.train.distributed import all_reduce_mean

POLICIES = ("stop", "skip", "rollback")
# Testing hook: "STEP:TENSOR[@RANK][,...]" makes optimizer step STEP (1-based) see a NaN
# in TENSOR ("loss" or a parameter's gradient), on rank RANK only if given, the first time
# the step runs in this process.
INJECT_ENV = "MBA_TRAIN_INJECT_NAN"
LOSS = "loss"
GRAD_NORM = "grad_norm"  # every gradient finite, yet their norm overflowed
NOT_CERTIFIED = (
    "no final model or COMPLETE.json is written; step checkpoints before it are kept for debugging"
)


@dataclass
class StepCheck:
    """One step's loss and pre-clip gradient norm; ``tensor`` is None when both are
    finite, else ``"loss"``, the first parameter with a non-finite gradient, or
    ``"grad_norm"``."""

    step: int
    loss: float
    grad_norm: float
    tensor: str | None = None

    @property
    def finite(self) -> bool:
        return self.tensor is None

    def describe(self) -> str:
        if self.tensor == LOSS:
            return "the loss (from the forward pass)"
        if self.tensor == GRAD_NORM:
            return "the gradient norm (every gradient is finite; their norm overflows)"
        return f"the gradient of {self.tensor}"


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def total_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all gradients, before clipping (what ``clip_grad_norm_`` returns)."""
    grads = [p.grad for p in params if p.grad is not None]
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:  # torch >= 2.6: exactly clip_grad_norm_'s first half
        return get_total_norm(grads, 2.0)
    if not grads:
        return torch.tensor(0.0)
    norms = [torch.linalg.vector_norm(g, 2.0) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), 2.0)


def clip_grads_with_norm(params: list[torch.nn.Parameter], max_norm: float, norm) -> None:
    """Scale the gradients by ``min(max_norm / (norm + 1e-6), 1)`` (``clip_grad_norm_``'s
    second half, with the norm from :func:`total_grad_norm`)."""
    clip = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
    if clip is not None:
        clip(params, max_norm, norm)
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))


def first_nonfinite_grad(named_params: list[tuple[str, torch.nn.Parameter]]) -> str:
    """Name of the first parameter, in model order, whose gradient holds a NaN or inf on
    any rank; ``"grad_norm"`` when none does. Collective under a process group."""
    flags = []
    for _, p in named_params:
        g = p.grad
        if g is None:
            flags.append(torch.zeros((), dtype=torch.bool, device=p.device))
            continue
        if hasattr(g, "to_local"):
            g = g.to_local()
        flags.append(~torch.isfinite(g).all())
    if not flags:
        return GRAD_NORM
    bad = _all_reduce_max(torch.stack(flags).to(torch.float32))
    hit = torch.nonzero(bad > 0)
    return named_params[int(hit[0, 0])][0] if hit.numel() else GRAD_NORM


def check_step(step: int, loss: torch.Tensor, norm: torch.Tensor, named_params) -> StepCheck:
    """The :class:`StepCheck` of optimizer step ``step`` (1-based): ``loss`` is this
    rank's mean loss, ``norm`` the global gradient norm (an FSDP2 DTensor is reduced).
    One all-reduce gives the loss's mean over ranks and whether any rank's norm is
    non-finite, so every rank decides alike; one sync brings the values to the host."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    norm = norm.detach().float().to(loss.device).reshape(1)
    shared = all_reduce_mean(
        torch.stack([loss.detach().float(), (~torch.isfinite(norm[0])).float()])
    )
    loss_value, bad_norm, grad_norm = torch.cat([shared, norm]).tolist()
    out = StepCheck(step, loss_value, grad_norm)
    if not math.isfinite(loss_value):
        out.tensor = LOSS
    elif bad_norm > 0 or not math.isfinite(grad_norm):
        out.tensor = first_nonfinite_grad(named_params)
    return out


class DivergenceGuard:
    """Decides what a non-finite step does under ``policy``; remembers skipped steps
    and rollbacks (recorded in checkpoints and COMPLETE.json)."""

    def __init__(self, policy: str, max_skips: int, where: str):
        if policy not in POLICIES:
            raise ConfigError(f"nan_policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.max_skips, self.where = policy, max_skips, where
        self.skipped: list[int] = []
        self.rollbacks: list[dict] = []
        self._in_a_row = 0
        self._rolled_back: set[int] = set()

    def state_dict(self) -> dict:
        return {"skipped_steps": list(self.skipped), "rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.skipped = [int(s) for s in state.get("skipped_steps", [])]
        self.rollbacks = [dict(r) for r in state.get("rollbacks", [])]

    def finite_step(self) -> None:
        self._in_a_row = 0

    def rewind(self, step: int) -> None:
        """Steps after ``step`` are trained again: forget their skips."""
        self.skipped = [s for s in self.skipped if s <= step]
        self._in_a_row = 0

    def decide(self, check: StepCheck, checkpoint_step: int | None) -> str:
        """``"skip"`` or ``"rollback"`` (to ``checkpoint_step``, the newest step
        checkpoint, None if there is none); raises :class:`NonFiniteError` to stop."""
        if self.policy == "skip":
            if self._in_a_row >= self.max_skips:
                raise self.error(
                    check,
                    f"nan_policy=skip already skipped the {self._in_a_row} step(s) before it "
                    f"in a row (nan_max_skips={self.max_skips})",
                )
            self._in_a_row += 1
            self.skipped.append(check.step)
            return "skip"
        if self.policy == "rollback":
            if checkpoint_step is None:
                raise self.error(check, "nan_policy=rollback, but there is no step checkpoint")
            if check.step in self._rolled_back:
                raise self.error(
                    check,
                    f"it diverged again after rolling back to the step-{checkpoint_step} "
                    f"checkpoint (nan_policy=rollback)",
                )
            self._rolled_back.add(check.step)
            self.rollbacks.append({"step": check.step, "to": checkpoint_step})
            return "rollback"
        raise self.error(check, "stopping (nan_policy=stop)")

    def trailing_skips(self, total: int) -> int:
        """How many steps in a row, ending with step ``total``, were skipped."""
        skipped, n = set(self.skipped), 0
        while total - n in skipped:
            n += 1
        return n

    def check_end(self, total: int, loss: float | None) -> None:
        """Refuse to certify a run that ended on skipped steps (``nan_policy=skip``: the
        model never trained past them, so its final loss is undefined) or whose final
        loss is not a finite number. The skips and the loss are all-reduced values, so
        every rank decides alike."""
        tail = self.trailing_skips(total)
        if tail:
            steps = f"step {total}" if tail == 1 else f"steps {total - tail + 1}-{total}"
            raise NonFiniteError(
                f"{self.where}: training ended on skipped steps: {steps} of {total} had a "
                f"non-finite loss or gradient and {'was' if tail == 1 else 'were'} skipped "
                f"(nan_policy=skip), so the trained model's final loss is undefined; "
                f"{NOT_CERTIFIED}. Lower optimizer.lr, or set nan_policy=rollback with "
                "checkpoint.every"
            )
        if loss is None or not math.isfinite(loss):
            raise NonFiniteError(
                f"{self.where}: the final loss (step {total}) is undefined ({loss}); "
                f"{NOT_CERTIFIED}"
            )

    def error(self, check: StepCheck, why: str) -> NonFiniteError:
        return NonFiniteError(
            f"{self.where}: training diverged at step {check.step}: {check.describe()} is "
            f"non-finite (loss {check.loss:.6g}, grad norm {check.grad_norm:.6g}); {why}. "
            f"No final model is written; step checkpoints before it are kept. Lower "
            f"optimizer.lr, or set nan_policy=skip or nan_policy=rollback"
        )


class NanInjector:
    """The :data:`INJECT_ENV` testing hook (a no-op when the variable is unset)."""

    def __init__(self, spec: str | None = None, rank: int = 0):
        spec = os.environ.get(INJECT_ENV, "") if spec is None else spec
        self.pending: list[tuple[int, str]] = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            step, sep, tensor = item.partition(":")
            tensor, at, only = tensor.strip().partition("@")
            if not (sep and step.strip().isdigit() and tensor and (not at or only.isdigit())):
                raise ConfigError(f"{INJECT_ENV}: expected STEP:TENSOR[@RANK] items, got {item!r}")
            if not at or int(only) == rank:
                self.pending.append((int(step), tensor))

    def __call__(self, step: int, loss_sum: torch.Tensor, named_params) -> None:
        """Put a NaN into each tensor due at ``step`` (each item once)."""
        due = [tensor for at, tensor in self.pending if at == step]
        if not due:
            return
        self.pending = [(at, tensor) for at, tensor in self.pending if at != step]
        grads = {n: p.grad for n, p in named_params}
        for tensor in due:
            if tensor == LOSS:
                loss_sum.fill_(float("nan"))
                continue
            if grads.get(tensor) is None:
                raise ConfigError(f"{INJECT_ENV}: no parameter {tensor!r} with a gradient")
            g = grads[tensor]
            g = g.to_local() if hasattr(g, "to_local") else g
            if g.numel():
                g.view(-1)[0] = float("nan")
