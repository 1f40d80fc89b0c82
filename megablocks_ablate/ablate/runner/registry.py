"""The pool registry: trained models found by what they are, not by where they were put.

A unit model is fully determined by three things: the tokens of its base unit, the
seed it continues from, and the training settings that shape its trajectory. Their
hash is the model's **key**; its run directory is ``<root>/pool/<unit>.<key12>``
(seq models: ``<root>/seq/<mixture id>.<key12>``). So

* rerunning a study finds every model already trained (``COMPLETE.json``) and resumes
  an interrupted one from its last checkpoint (same directory);
* adding a unit to a study trains exactly that unit's model;
* changing the unit budget, the seed or a unit's data gives new keys, hence new
  directories: a stale model is never reused, nor overwritten;
* several studies may share one registry root (``study run --registry DIR``).

What goes into the key (:func:`run_key`): the resolved model config (the preset
expanded, so renaming a preset changes nothing), every trajectory-defining field of
the train config (``megablocks_ablate.train.state.TRAJECTORY_FIELDS``) except
paths, the sha256 of each training unit's ``.bin``/``.idx`` (from the manifest) with
its mixture weight, and the sha256 of the seed's ``model.safetensors``. Run-time
settings (devices, ``micro_batch``, logging, checkpoint cadence, parallelism) do not
change the trained model and are left out, as the trainer's resume check does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from megablocks_ablate.errors import MBAError
from megablocks_ablate.model.config import ModelConfig
from megablocks_ablate.train.state import (
    TRAJECTORY_FIELDS,
    at_pre_field_value,
    is_complete,
    list_checkpoints,
)
from megablocks_ablate.utils.atomic import atomic_write_json
from megablocks_ablate.utils.hashing import sha256_json

KEY_CHARS = 12  # hex digits of the key in directory names
RECORD = "registry.json"  # written beside a registered run's COMPLETE.json


def data_fingerprint(manifest, weights: Mapping[str, float]) -> dict:
    """``{unit: [bin sha256, idx sha256, weight]}`` of the units a run trains on."""
    out = {}
    for u, w in sorted(weights.items()):
        info = manifest.units[u]
        out[u] = [info["bin"]["sha256"], info["idx"]["sha256"], round(float(w), 12)]
    return out


def run_key(cfg, manifest, weights: Mapping[str, float], seed_hash: str | None) -> str:
    """The content key of the run ``cfg`` (a TrainConfig) on ``weights`` over units."""
    d = cfg.to_dict()
    traj = {k: d[k] for k in TRAJECTORY_FIELDS if k in d}
    traj.pop("init_from", None)  # the seed's hash stands for it
    for k in [k for k, v in traj.items() if at_pre_field_value(k, v)]:
        traj.pop(k)  # keys from before a field was added keep their value
    traj.pop("model_overrides", None)  # folded into the resolved model below
    data = dict(traj.pop("data", {}))
    traj["model"] = ModelConfig.from_preset(cfg.model, cfg.model_overrides).to_dict()
    traj["data"] = {
        "balance": data.get("balance"),
        "seed": data.get("seed"),
        "units": data_fingerprint(manifest, weights),
    }
    traj["seed_hash"] = seed_hash
    return sha256_json(traj)


@dataclass(frozen=True)
class Entry:
    """One registered run: where it lives and whether it is finished."""

    key: str
    out_dir: str

    @property
    def model_dir(self) -> str:
        return os.path.join(self.out_dir, "final")

    @property
    def complete(self) -> bool:
        return is_complete(self.out_dir)

    @property
    def started(self) -> bool:
        """Some step checkpoint exists (an interrupted run that will resume)."""
        return os.path.isdir(self.out_dir) and bool(list_checkpoints(self.out_dir))

    def completion(self) -> dict:
        """The run's ``COMPLETE.json`` (step, tokens_seen, final_loss, ...)."""
        with open(os.path.join(self.out_dir, "COMPLETE.json"), encoding="utf-8") as f:
            return json.load(f)


class Registry:
    """Run directories under ``root`` named by content key (see the module docstring)."""

    def __init__(self, root: str):
        self.root = os.fspath(root)

    def entry(self, kind: str, name: str, key: str) -> Entry:
        """The run directory of model ``name`` (a unit, or a mixture id) with ``key``."""
        folder = "pool" if kind == "unit" else kind
        return Entry(key, os.path.join(self.root, folder, f"{_safe(name)}.{key[:KEY_CHARS]}"))

    def adopt(
        self, entry: Entry, candidate: str | None, key_of: Callable[[str], str | None]
    ) -> Entry:
        """``candidate`` (a run directory trained elsewhere, e.g. by a Slurm array with the
        unit config's own ``out_dir``) when ``entry`` is not complete, the candidate is,
        and ``key_of(candidate)`` is ``entry.key``; else ``entry``."""
        if (
            not candidate
            or entry.complete
            or os.path.abspath(candidate) == os.path.abspath(entry.out_dir)
            or not Entry(entry.key, candidate).complete
        ):
            return entry
        try:
            key = key_of(candidate)
        except MBAError:  # unreadable config or lineage: not a usable model
            return entry
        return Entry(entry.key, candidate) if key == entry.key else entry

    @staticmethod
    def record(entry: Entry, info: dict) -> None:
        """Write ``registry.json`` (the key and what it was made of) into a finished run."""
        atomic_write_json(os.path.join(entry.out_dir, RECORD), {"key": entry.key, **info})


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_+" else "_" for c in name)
