"""The optimizer state a continued run starts from (``init_optimizer``, paper A.3).

Na et al. (2024, A.3) keep the optimizer state between the seed and continued
pretraining, and jump the LR back up to its peak. With ``init_optimizer=seed`` a unit or
seq run therefore loads ``init_from``'s AdamW moments and step counts after building its
optimizer; its own LR schedule (a short re-warm from ``warmup_start_lr`` to the peak)
then applies as for a fresh optimizer. The state comes from ``optimizer.safetensors`` +
``optimizer.json`` in ``init_from``: a seed's ``final/`` written with
``checkpoint.final_optimizer``, or any step checkpoint.

The order of checks, each refusing with the file named:

1. no optimizer files in ``init_from`` (a converted Hugging Face checkpoint, a seed from
   before ``final_optimizer``), or files its run's record does not vouch for (a
   COMPLETE.json without ``optimizer_sha256``: left from an earlier write of that
   final/, not by the run that finished it): one warning, and a fresh optimizer;
2. ``optimizer.safetensors`` against the sha256 the trainer recorded for it
   (COMPLETE.json's ``optimizer_sha256``, a step checkpoint's trainer_state.json), the
   way ``init_from``'s weights are checked, and for NaN/inf (the tensor named);
3. the parameter names of every param group against this run's optimizer (first
   missing or unexpected name, or the first position where a group's order differs:
   name-keyed state loaded in another order would give a parameter another one's
   moments without any shape error);
4. loading through ``torch.distributed.checkpoint.state_dict`` (the resume path: plain
   module, DDP and FSDP2 alike).

A loaded optimizer state dict brings its param groups' hyperparameters with it (the
seed's lr, betas, eps, weight_decay, and flags such as ``fused``). This run's own groups
(its ``optimizer`` config; weight decay 0 for the norm group) are put in their place
before loading, so that torch places the step counters by this run's flags, and again
after, so nothing of the seed's settings survives whatever the loader does with groups.
"""

from __future__ import annotations

import logging
import os

import torch

from megablocks_ablate.checkpoint import check_finite_state
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.train import state as st
from megablocks_ablate.utils.verify import verify_sha256

logger = logging.getLogger(__name__)

SEED, FRESH = "seed", "fresh"


def init_record(how: str, source: str | None) -> dict:
    """What COMPLETE.json, the lineage ``extra`` and trainer_state.json record."""
    return {"optimizer_init": how, "optimizer_init_from": source}


def own_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Every param group's settings but its parameters, as this run built them."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def group_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Parameter names of each optimizer param group, in the group's order.

    ``module`` is the one whose names the saved state uses (DDP's inner module; FSDP2
    keeps names), and the optimizer must have been built over its parameters."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def check_names(osd: dict, expected: list[list[str]], path: str) -> None:
    """Refuse a name-keyed optimizer state whose parameters are not ``expected``."""
    where = os.path.join(path, st.OPTIM_JSON)
    saved = [list(g.get("params", [])) for g in osd["param_groups"]]
    want = {n for g in expected for n in g}
    have = {n for g in saved for n in g}
    missing = [n for g in expected for n in g if n not in have]
    if missing:
        raise DataFormatError(
            f"{where}: optimizer state does not fit the model: its parameter "
            f"{missing[0]!r} has no entry ({len(missing)} missing)"
        )
    unexpected = [n for g in saved for n in g if n not in want]
    unexpected += [n for n in osd["state"] if n not in want]
    if unexpected:
        raise DataFormatError(
            f"{where}: optimizer state does not fit the model: parameter "
            f"{unexpected[0]!r} is not in the model ({len(unexpected)} unexpected)"
        )
    if len(saved) != len(expected):
        raise DataFormatError(
            f"{where}: {len(saved)} param groups, but this optimizer has {len(expected)}"
        )
    for i, (a, b) in enumerate(zip(saved, expected, strict=True)):
        if a != b:
            j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            got, own = (a[j] if j < len(a) else None), (b[j] if j < len(b) else None)
            raise DataFormatError(
                f"{where}: param group {i} differs from this optimizer's at position {j}: "
                f"{got!r} where this optimizer has {own!r}"
            )


def verify_optimizer_file(path: str, expected: str | None, source: str) -> str:
    """sha256 of ``path``'s ``optimizer.safetensors``, checked against ``expected``
    (recorded in ``source``; None: from elsewhere, only hashed)."""
    if expected is None:
        logger.info(f"init_from {path}: no recorded sha256 to check its optimizer state against")
    return verify_sha256(
        os.path.join(path, st.OPTIM_TENSORS),
        expected,
        f"the optimizer state of init_from in {source}" if source else "init_from",
        "restore it, or train that model again (or set init_optimizer=fresh)",
    )


def load_seed_optimizer(
    model: torch.nn.Module,
    named: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    path: str,
    run_once,
    is_main: bool,
) -> dict:
    """Load ``path``'s optimizer state into ``optimizer`` (see the module docstring);
    returns the :func:`init_record` of what was done.

    ``model`` is the wrapped module the optimizer trains, ``named`` the one whose
    parameter names are the checkpoint's; ``run_once(fn)`` runs ``fn`` on rank 0 only
    and gives every rank its result or its error (the hash is paid once)."""
    expected, source = st.recorded_optimizer_sha256(path)
    why = None
    if not st.has_optimizer_state(path):
        why = (
            f"holds no optimizer state ({st.OPTIM_TENSORS} + {st.OPTIM_JSON}; a converted "
            f"checkpoint, or a seed trained without checkpoint.final_optimizer)"
        )
    elif source and expected is None:
        why = f"has optimizer files, but {source} records no optimizer_sha256 for them"
    if why:
        if is_main:
            logger.warning(f"init_optimizer=seed: {path} {why}; starting from a fresh optimizer")
        return init_record(FRESH, None)
    run_once(lambda: verify_optimizer_file(path, expected, source))
    osd = st.load_optimizer_state(path)
    check_finite_state(
        {
            f"{n}/{k}": v
            for n, e in osd["state"].items()
            for k, v in e.items()
            if torch.is_tensor(v)
        },
        os.path.join(path, st.OPTIM_TENSORS),
        "the init_from checkpoint's optimizer state is broken: set init_optimizer=fresh, or "
        "give another init_from",
    )
    check_names(osd, group_names(named, optimizer), path)
    own = own_hyperparameters(optimizer)
    for group, mine in zip(osd["param_groups"], own, strict=True):
        group.update(mine)
    _set_state(model, optimizer, osd, path)
    for group, mine in zip(optimizer.param_groups, own, strict=True):
        group.update(mine)
    logger.info(f"init_optimizer=seed: optimizer state from {path}")
    return init_record(SEED, path)


def _set_state(model, optimizer, osd: dict, path: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    try:
        set_optimizer_state_dict(
            model, optimizer, osd, options=StateDictOptions(full_state_dict=True)
        )
    except (RuntimeError, KeyError, ValueError) as e:
        raise DataFormatError(
            f"{os.path.join(path, st.OPTIM_TENSORS)}: optimizer state does not fit this "
            f"optimizer ({e})"
        ) from None
