"""Fisher-weighted merging (beyond the paper): average each parameter by how much each
unit model's own data cares about it.

The paper's merge averages unit models with the mixture's weights, every parameter
alike. A seq model instead minimises the sum of its partitions' losses. Near each unit
model ``theta_u`` (trained on partition ``u``), that loss is about quadratic with
curvature ``F_u`` (the Fisher information of ``u``'s data at ``theta_u``); with a
diagonal ``F_u`` the minimiser of ``sum_u w_u L_u`` is, parameter by parameter::

    theta = sum_u w_u F_u theta_u / sum_u w_u F_u
          = seed + sum_u w_u F_u d_u / sum_u w_u F_u        (d_u = theta_u - seed)

So where one partition's data constrains a parameter and another's does not (prose
and code use different tokens and heads), the merge keeps the partition that cares,
instead of halving its move. Equal Fisher everywhere gives back the plain average.

* :func:`empirical_fisher`: ``F_u``, the mean over batches of a unit's own training
  sequences of the squared gradient of the batch's mean token loss (batch 1 by
  default: the per-sequence empirical Fisher).
* :func:`fisher_merge`: the merge above with ``F_u + eps x`` (the tensor's mean Fisher
  over the merged units), so parameters no unit's data touches fall back to the plain
  average and the division is always defined.
* :func:`save_fisher` / :func:`load_fisher`: the one on-disk format, a safetensors file
  whose metadata names the model it was computed for (its sha256), how (sequences,
  batch, sequence length) and that this program wrote it; loading checks all of it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import torch

from megablocks_ablate.errors import DataFormatError, NonFiniteError

FORMAT = "megablocks-ablate-fisher-v1"
Tensors = Mapping[str, torch.Tensor]


def empirical_fisher(
    model: torch.nn.Module, sequences: Iterable[torch.Tensor], batch: int = 1
) -> dict[str, torch.Tensor]:
    """Mean over batches of ``batch`` sequences (each ``[seq_len + 1]`` token ids) of the
    squared gradient of the batch's mean next-token loss, per parameter (fp32, CPU).
    ``model(inputs, labels)`` must return that loss. A non-finite loss or gradient
    stops with the batch's index and the tensor's name."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    was_training = model.training
    model.train(False)  # no dropout: the Fisher of the model as evaluated
    n_batches = 0
    pending: list[torch.Tensor] = []
    device = next(iter(params.values())).device

    def step(rows: list[torch.Tensor]) -> None:
        nonlocal n_batches
        tokens = torch.stack(rows).to(device=device, dtype=torch.long)
        model.zero_grad(set_to_none=True)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        if not torch.isfinite(loss):
            raise NonFiniteError(f"Fisher: the loss of batch {n_batches} is {float(loss.detach())}")
        loss.backward()
        for n, p in params.items():
            if p.grad is None:
                continue
            g = p.grad.detach().float()
            if not bool(torch.isfinite(g).all()):
                raise NonFiniteError(f"Fisher: non-finite gradient of {n} in batch {n_batches}")
            acc[n] += g.square()
        n_batches += 1

    try:
        for seq in sequences:
            pending.append(torch.as_tensor(seq))
            if len(pending) == batch:
                step(pending)
                pending = []
        if pending:
            step(pending)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("Fisher: no sequences given")
    return {n: (a / n_batches).cpu() for n, a in acc.items()}


def fisher_merge(
    seed: Tensors,
    deltas: Sequence[Tensors],
    fishers: Sequence[Tensors],
    weights: Sequence[float],
    eps: float,
    power: float = 1.0,
) -> dict[str, torch.Tensor]:
    """``seed + sum_u w_u G_u d_u / sum_u w_u G_u`` per element, with
    ``G_u = F_u^power + eps x`` the mean of the tensor's ``F^power`` over these units.
    Tensors no unit has a Fisher for (buffers) get the plain weighted average.
    ``weights`` must be positive and sum to 1; ``eps`` > 0 (relative: scale-free);
    ``power`` > 0 (1: the quadratic model's minimiser; 0 would be the plain average)."""
    if not (len(deltas) == len(fishers) == len(weights)) or not deltas:
        raise ValueError("fisher_merge: one delta, Fisher and weight per unit model")
    if any(not w > 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"fisher_merge: weights must be positive and sum to 1, got {weights}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"fisher_merge: eps must be a finite number > 0, got {eps}")
    if not (power > 0 and math.isfinite(power)):
        raise ValueError(f"fisher_merge: power must be a finite number > 0, got {power}")
    out = {}
    for k, s in seed.items():
        curv = unit_curvatures(fishers, k, eps, power)
        if curv is None:
            out[k] = s + sum(w * d[k] for d, w in zip(deltas, weights))
            continue
        num = torch.zeros_like(s, dtype=torch.float32)
        den = torch.zeros_like(s, dtype=torch.float32)
        for d, c, w in zip(deltas, curv, weights):
            g = w * c
            num += g * d[k].float()
            den += g
        out[k] = (s.float() + num / den).to(s.dtype)
    return out


def unit_curvatures(
    fishers: Sequence[Tensors], name: str, eps: float, power: float = 1.0
) -> list[torch.Tensor] | None:
    """Each unit's ``G_u = F_u^power + eps x`` (the mean of ``F^power`` over the units)
    for tensor ``name`` (fp32), as :func:`fisher_merge` weights it; None when a unit has
    no Fisher for it or no unit's data moves it (every ``G_u`` equal: the plain average)."""
    if not all(name in f for f in fishers):
        return None
    curv = [f[name].float() if power == 1 else f[name].float().pow(power) for f in fishers]
    floor = eps * sum(float(c.mean()) for c in curv) / len(curv)
    if floor <= 0:
        return None
    return [c + floor for c in curv]


# ----------------------------------------------------------------------------- the file
def save_fisher(path: str, fisher: Tensors, meta: Mapping[str, object]) -> None:
    """Write ``fisher`` with ``meta`` (JSON-able; ``model_sha256`` required) atomically."""
    from safetensors.torch import save

    from megablocks_ablate.utils.atomic import atomic_open

    if not isinstance(meta.get("model_sha256"), str):
        raise ValueError("save_fisher: meta must name the model's sha256")
    for name, t in fisher.items():
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise NonFiniteError(f"{path}: Fisher tensor {name} is non-finite or negative")
    blob = save(
        {k: v.detach().float().cpu().contiguous() for k, v in fisher.items()},
        metadata={"format": FORMAT, "meta": json.dumps(dict(meta), sort_keys=True)},
    )
    with atomic_open(path, "wb") as f:
        f.write(blob)


def read_fisher_meta(path: str) -> dict | None:
    """The metadata this program wrote into a Fisher file; None when ``path`` is not one
    of ours (another format, or unreadable as safetensors)."""
    from megablocks_ablate.checkpoint.safetensors_io import safetensors_header

    try:
        header = safetensors_header(path)
    except DataFormatError:
        return None
    info = header.get("__metadata__") or {}
    if info.get("format") != FORMAT:
        return None
    try:
        meta = json.loads(info.get("meta", ""))
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) else None


def fisher_file_problem(path: str, model_sha256: str) -> tuple[str, str] | None:
    """None when ``path`` is a Fisher file this program wrote for the weights hashing to
    ``model_sha256``; else ``("foreign", why)`` (not one of ours) or ``("stale", why)``
    (ours, for other weights)."""
    meta = read_fisher_meta(path)
    if meta is None:
        return "foreign", f"{path}: not a Fisher file written by megablocks-ablate"
    if meta.get("model_sha256") != model_sha256:
        return "stale", (
            f"{path}: computed for other weights (sha256 {meta.get('model_sha256')}, "
            f"not {model_sha256}: the model changed since)"
        )
    return None


def load_fisher(
    path: str, model_sha256: str, shapes: Mapping[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """The Fisher at ``path``, checked: written by this program for the model whose
    weights hash to ``model_sha256``, one finite, non-negative tensor per parameter of
    ``shapes``. Anything else is a :class:`DataFormatError` naming the file."""
    from safetensors.torch import load_file

    problem = fisher_file_problem(path, model_sha256)
    if problem is not None:
        raise DataFormatError(problem[1])
    tensors = load_file(path)
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise DataFormatError(
            f"{path}: tensors do not match the model's parameters "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(shapes[name]):
            raise DataFormatError(
                f"{path}: {name} has shape {tuple(t.shape)}, expected {tuple(shapes[name])}"
            )
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise DataFormatError(f"{path}: {name} holds non-finite or negative values")
    return tensors


def fisher_path(run_dir: str, sequences: int, batch: int) -> str:
    """Where a trained model's Fisher lives: in its run directory (beside ``final/``),
    named by how it was computed, so settings never overwrite each other."""
    return os.path.join(run_dir, f"fisher-s{sequences}-b{batch}.safetensors")
