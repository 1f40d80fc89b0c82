"""Pool rows as bf16 differences from one fp32 seed (row format ``bf16-delta``).

Every unit model of a study continues the same seed checkpoint, so a unit is the seed
plus a small difference. A plain bf16 row rounds the whole unit (relative error up to
2^-9 of each weight); a delta row rounds only ``unit - seed``, which is two to three
orders of magnitude smaller than the weight, while the seed is kept once, in fp32::

    rows[i] = bf16(unit_i - seed)          N x P x 2 bytes (as plain bf16 rows)
    base    = fp32(seed)                   P x 4 bytes, once per pool copy

    merge(w) = seed * sum_i w_i + sum_i w_i * rows[i]      (one fp32-accumulating call)

which is ``sum_i w_i * unit_i`` in exact arithmetic for any weights (they need not sum
to 1: scaled merges, task arithmetic). The seed is the first input of the merge
kernel's fold, with weight ``sum_i w_i``; every placement keeps that fold, so the
placements stay bitwise equal to each other.

The seed must be the checkpoint the units record as the one they continue (their
lineage's ``seed_hash``): :func:`find_seed` takes a given seed directory (a mismatch is
refused naming the file) or else the checkpoint the units record as their parent (the
trainer's ``init_from``); without one (imported models, units of different seeds)
the pool falls back to plain rows and says why.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from megablocks_ablate.checkpoint import Lineage, read_checkpoint_meta
from megablocks_ablate.checkpoint.model_dir import MODEL_FILE
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.verify import file_sha256, verify_sha256

# Row formats (what a pool's provenance records): plain rows in fp32 or bf16, and bf16
# differences from the fp32 seed.
FP32, BF16_PLAIN, BF16_DELTA = "fp32", "bf16-plain", "bf16-delta"
ROW_FORMATS = (FP32, BF16_PLAIN, BF16_DELTA)
SEED_ITEMSIZE = 4  # the seed is held in fp32


def format_name(dtype: str, delta: bool) -> str:
    """The row format of rows of ``dtype`` (fp32 | bf16 | fp16), as deltas or not:
    ``fp32``, ``bf16-plain``, ``bf16-delta`` (and the like for the others)."""
    if delta:
        return f"{dtype}-delta"
    return dtype if dtype == "fp32" else f"{dtype}-plain"


@dataclass(frozen=True)
class Seed:
    """The checkpoint the pool's unit models continue, and its verified sha256."""

    model_dir: str
    sha256: str

    @property
    def path(self) -> str:
        return os.path.join(self.model_dir, MODEL_FILE)


def units_seed_hash(lineages: Mapping[str, Lineage]) -> tuple[str | None, str]:
    """(the one seed hash the models continue, "") or (None, why not). Rows that are the
    seed itself (lineage kind ``seed``, e.g. the scaled merge's seed row) are left out:
    their delta is zero once :func:`.pool.open_units` has checked they are that seed."""
    continuing = {u: lin for u, lin in lineages.items() if lin.kind != "seed"}
    if not continuing:
        return None, "the pool holds no model that continues a seed"
    hashes = {lin.seed_hash for lin in continuing.values()}
    if len(hashes) != 1 or None in hashes:
        shown = ", ".join(f"{u}: {(lin.seed_hash or 'none')[:12]}" for u, lin in continuing.items())
        return None, f"the unit models do not record one seed they continue ({shown})"
    return next(iter(hashes)), ""


def verify_seed(seed_dir: str, seed_hash: str) -> Seed:
    """The seed at ``seed_dir`` after checking it is the one the units record; a file
    that hashes otherwise is refused (DataFormatError naming it)."""
    path = os.path.join(seed_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: missing (the seed of the pool's bf16-delta rows)")
    verify_sha256(
        path,
        seed_hash,
        "the seed the pool's unit models continue (their lineage's seed_hash)",
        "give the seed checkpoint they were trained from, or plain rows (pool dtype "
        "bf16-plain or fp32)",
    )
    return Seed(seed_dir, seed_hash)


def find_seed(
    checkpoints: Mapping[str, str], seed_dir: str | None = None
) -> tuple[Seed | None, str]:
    """The seed of ``{unit: checkpoint_dir}``'s delta rows, or (None, why there is none).

    ``seed_dir`` given: it must hash to the seed the units record (else DataFormatError
    naming the file). Not given: the one checkpoint the units record as their parent
    (the trainer records ``init_from``), if it exists and hashes to their seed; a
    recorded parent that changed since is not used (the reason says so)."""
    lineages = {u: read_checkpoint_meta(d)[1] for u, d in checkpoints.items()}
    seed_hash, why = units_seed_hash(lineages)
    if seed_hash is None:
        return None, why
    if seed_dir is not None:
        return verify_seed(seed_dir, seed_hash), ""
    parents = {
        lin.parents[0] if len(lin.parents) == 1 else None
        for lin in lineages.values()
        if lin.kind != "seed"
    }
    if len(parents) != 1 or None in parents:
        return None, "no seed directory given and the unit models name no one parent checkpoint"
    parent = str(parents.pop())
    path = os.path.join(parent, MODEL_FILE)
    if not os.path.isfile(path):
        return None, f"no seed directory given and {path} (the units' parent) does not exist"
    if file_sha256(path) != seed_hash:
        return None, (
            f"no seed directory given and {path} (the units' parent) changed since they "
            f"were trained from it (its sha256 is not their seed_hash {seed_hash[:16]}...)"
        )
    return Seed(parent, seed_hash), ""
