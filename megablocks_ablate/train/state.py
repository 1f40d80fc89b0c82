"""Resumable training checkpoints: model + optimizer + trainer state, no pickle anywhere.

A run directory holds::

    <out_dir>/
      config.yaml                         # the resolved TrainConfig
      metrics.jsonl                       # one JSON record per logged step
      checkpoints/step_00000040/          # resumable; the newest `keep_last` are kept
        model.safetensors config.json lineage.json   # a model checkpoint (checkpoint.py)
        optimizer.safetensors             # AdamW moments/steps: "<param name>/<key>"
        optimizer.json                    # param groups (params by name), non-tensor state
        rng.safetensors                   # torch/CUDA/numpy RNG states of every rank
        average.safetensors               # weight_average: the running average (full)
        trainer_state.json                # step, consumed samples, data state, config, hashes
      final/                              # the trained model (a model checkpoint), and
        optimizer.safetensors optimizer.json   # with checkpoint.final_optimizer its AdamW
                                          #   state (same layout as a step checkpoint's)
      COMPLETE.json                       # written last: training finished; sha256 of
                                          #   final/'s model (and optimizer) files

Each step directory is staged beside its final name and renamed into place, so a
SIGKILL leaves either the complete checkpoint or none (a stale ``.step_*.tmp`` is
deleted on the next start). ``trainer_state.json`` records the sha256 of the model and
optimizer files, so a corrupted checkpoint is refused rather than silently resumed.

Optimizer state is taken with ``torch.distributed.checkpoint.state_dict`` as a *full*
state dict keyed by parameter name, which works the same for a plain module, DDP and
FSDP2 (shards are gathered to rank 0; on load every rank reads the full state and
keeps its shard).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

from megablocks_ablate.checkpoint import (
    MODEL_FILE,
    Lineage,
    load_model_checkpoint,
    safetensors_header,
    save_model_checkpoint,
    staged_checkpoint_dir,
)
from megablocks_ablate.checkpoint.run_dir import (
    RUN_CHECKPOINTS_DIR,
    RUN_COMPLETE_FILE,
    RUN_FINAL_DIR,
    STEP_DIR_RE,
)
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.utils.atomic import atomic_write_json
from megablocks_ablate.utils.hashing import sha256_file

STATE_FORMAT = "megablocks-ablate/train-state@1"
OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_JSON = "optimizer.json"
RNG_FILE = "rng.safetensors"
AVERAGE_FILE = "average.safetensors"  # weight_average: the running average (full tensors)
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"  # the resolved TrainConfig of the run's latest start
# a run directory's layout, named once in checkpoint/run_dir.py (which reads run dirs)
COMPLETE_FILE = RUN_COMPLETE_FILE
FINAL_DIR = RUN_FINAL_DIR
CHECKPOINTS_DIR = RUN_CHECKPOINTS_DIR
_STEP_RE = STEP_DIR_RE

# Config fields that define the loss trajectory: a checkpoint saved under other values
# is refused on resume. Everything else (logging, checkpoint cadence, micro_batch,
# devices, parallelism) may change between a run and its resumption.
TRAJECTORY_FIELDS = (
    "kind",
    "model",
    "model_overrides",
    "data",
    "train_tokens",
    "seq_len",
    "global_batch_tokens",
    "optimizer",
    "schedule",
    "grad_clip",
    "init_from",
    "init_optimizer",
    "seed",
    "weight_average",
)
# Trajectory fields added after checkpoints were first written: a saved config without
# one was written under this value (the behaviour before the field existed).
_TRAJECTORY_DEFAULTS: dict[str, Any] = {
    "init_optimizer": "fresh",
    "weight_average": {"kind": "none"},
}


def _canonical(field: str, value: Any) -> Any:
    """A trajectory field's value as compared: ``weight_average`` of kind none is just
    that (its other settings change nothing)."""
    if field == "weight_average" and isinstance(value, dict) and value.get("kind") == "none":
        return {"kind": "none"}
    return value


def at_pre_field_value(field: str, value: Any) -> bool:
    """Whether ``value`` of trajectory ``field`` is what runs recorded before the field
    existed (:data:`_TRAJECTORY_DEFAULTS`): a record may then leave the field out and
    read as it did (the registry's run keys do)."""
    return field in _TRAJECTORY_DEFAULTS and _canonical(field, value) == _TRAJECTORY_DEFAULTS[field]


# ----------------------------------------------------------------------------- layout


def step_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, CHECKPOINTS_DIR, f"step_{step:08d}")


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of complete step checkpoints, oldest first."""
    root = os.path.join(out_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def remove_stale_staging(out_dir: str) -> None:
    """Delete half-written step directories left by a killed run."""
    root = os.path.join(out_dir, CHECKPOINTS_DIR)
    if os.path.isdir(root):
        for name in os.listdir(root):
            # staging names are ".step_N.<random>.tmp" (and nested "..step_N..." ones)
            if name.startswith(".") and "step_" in name and name.endswith((".tmp", ".old")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def prune_checkpoints(out_dir: str, keep_last: int) -> None:
    for _, path in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def recorded_model_sha256(directory: str) -> tuple[str | None, str]:
    """The sha256 the trainer recorded for ``directory``'s ``model.safetensors``, and
    where: ``model_sha256`` in the run's COMPLETE.json for a run's ``final/``, the
    ``trainer_state.json`` of a step checkpoint; ``(None, "")`` for a model checkpoint
    from elsewhere (converted, merged, or a final/ whose run never completed)."""
    digest, source = _recorded_sha256(directory, MODEL_FILE, "model_sha256")
    if source and digest is None:
        raise DataFormatError(f"{source}: no valid sha256 recorded for {MODEL_FILE}")
    return digest, source


def recorded_optimizer_sha256(directory: str) -> tuple[str | None, str]:
    """Like :func:`recorded_model_sha256` for ``optimizer.safetensors``
    (``optimizer_sha256`` in COMPLETE.json). ``(None, source)`` when the record exists
    but holds no optimizer hash: a run that kept no optimizer state in final/."""
    return _recorded_sha256(directory, OPTIM_TENSORS, "optimizer_sha256")


def _recorded_sha256(directory: str, name: str, complete_key: str) -> tuple[str | None, str]:
    directory = os.path.abspath(directory)
    complete = os.path.join(os.path.dirname(directory), COMPLETE_FILE)
    if os.path.basename(directory) == FINAL_DIR and os.path.isfile(complete):
        record, source = _read_json(complete), complete
        digest = record.get(complete_key) if isinstance(record, dict) else None
    elif os.path.isfile(os.path.join(directory, STATE_FILE)):
        source = os.path.join(directory, STATE_FILE)
        digest = read_trainer_state(directory)["sha256"].get(name)
    else:
        return None, ""
    if digest is None:
        return None, source
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise DataFormatError(f"{source}: no valid sha256 recorded for {name} (found {digest!r})")
    return digest, source


def has_optimizer_state(directory: str) -> bool:
    """True when ``directory`` (a step checkpoint, or a final/ written with
    ``checkpoint.final_optimizer``) holds optimizer state."""
    return all(os.path.isfile(os.path.join(directory, n)) for n in (OPTIM_TENSORS, OPTIM_JSON))


def is_complete(out_dir: str) -> bool:
    """True once training finished (the final model and COMPLETE.json exist)."""
    return os.path.isfile(os.path.join(out_dir, COMPLETE_FILE)) and os.path.isfile(
        os.path.join(out_dir, FINAL_DIR, MODEL_FILE)
    )


# ----------------------------------------------------------------------------- optimizer


def flatten_optimizer_state(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A name-keyed optimizer state dict -> (tensors, JSON-able rest).

    ``osd["state"][name][key]`` tensors become ``"{name}/{key}"``; non-tensor values
    and ``param_groups`` go to the JSON part.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entry in osd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = []
    for group in osd["param_groups"]:
        g = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
        groups.append(g)
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict[str, Any]] = {}
    for flat, t in tensors.items():
        name, _, key = flat.rpartition("/")
        state.setdefault(name, {})[key] = t
    for name, entry in meta.get("scalars", {}).items():
        state.setdefault(name, {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """This process's RNG states: tensors + a JSON-able part."""
    np_state = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return {"tensors": tensors, "meta": meta}


def set_rng_state(state: dict) -> None:
    t, meta = state["tensors"], state["meta"]
    torch.set_rng_state(t["torch"])
    if "cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["cuda"])
    np_kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state(
        (np_kind, t["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached)
    )
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))


# ----------------------------------------------------------------------------- save


def save_train_checkpoint(
    directory: str,
    *,
    model_state: dict[str, torch.Tensor],
    model_config: dict,
    lineage: Lineage,
    optim_state: dict,
    rng_states: list[dict],
    trainer_state: dict,
    average_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write one resumable checkpoint directory atomically (call on rank 0 only).

    ``rng_states`` holds one :func:`rng_state` per rank; ``trainer_state`` the JSON
    trainer fields (step, consumed_samples, tokens_seen, data, config, world_size);
    ``average_state`` the ``weight_average`` running average, keyed like the model.
    """
    from safetensors.torch import save_file

    with staged_checkpoint_dir(directory) as tmp:
        save_model_checkpoint(tmp, model_state, model_config, lineage)
        write_optimizer_state(tmp, optim_state)
        rng_tensors = {
            f"rank{r}/{k}": v.contiguous()
            for r, s in enumerate(rng_states)
            for k, v in s["tensors"].items()
        }
        save_file(rng_tensors, os.path.join(tmp, RNG_FILE))
        hashed = [MODEL_FILE, OPTIM_TENSORS]
        if average_state is not None:
            tensors = {k: v.contiguous() for k, v in average_state.items()}
            save_file(tensors, os.path.join(tmp, AVERAGE_FILE), metadata={"format": "pt"})
            hashed.append(AVERAGE_FILE)
        state = dict(
            trainer_state,
            format=STATE_FORMAT,
            rng=[s["meta"] for s in rng_states],
            sha256={name: sha256_file(os.path.join(tmp, name)) for name in hashed},
        )
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)


def write_optimizer_state(directory: str, optim_state: dict) -> None:
    """``optimizer.safetensors`` + ``optimizer.json`` of a name-keyed optimizer state
    dict into ``directory`` (a staged one: the caller makes the whole atomic)."""
    from safetensors.torch import save_file

    tensors, meta = flatten_optimizer_state(optim_state)
    save_file(tensors, os.path.join(directory, OPTIM_TENSORS), metadata={"format": "pt"})
    with open(os.path.join(directory, OPTIM_JSON), "w", encoding="utf-8") as f:
        json.dump(meta, f)


def save_final(
    out_dir: str,
    model_state: dict,
    model_config: dict,
    lineage: Lineage,
    summary: dict,
    optim_state: dict | None = None,
) -> None:
    """The trained model under ``final/`` (with ``optim_state``, its optimizer state in
    the same staged directory, so both appear together or not at all), then the
    COMPLETE.json marker with the sha256 of the files written."""
    final = os.path.join(out_dir, FINAL_DIR)
    with staged_checkpoint_dir(final) as tmp:
        save_model_checkpoint(tmp, model_state, model_config, lineage)
        if optim_state is not None:
            write_optimizer_state(tmp, optim_state)
    record = dict(summary, model_sha256=sha256_file(os.path.join(final, MODEL_FILE)))
    if optim_state is not None:
        record["optimizer_sha256"] = sha256_file(os.path.join(final, OPTIM_TENSORS))
    atomic_write_json(os.path.join(out_dir, COMPLETE_FILE), record)


# ----------------------------------------------------------------------------- load


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: missing checkpoint file")
    safetensors_header(path)
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own types
        raise DataFormatError(f"{path}: cannot read safetensors file ({e})") from None


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataFormatError(f"{path}: missing checkpoint file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: invalid JSON ({e})") from None


def read_trainer_state(directory: str) -> dict:
    """``trainer_state.json`` of a step checkpoint, format-checked."""
    path = os.path.join(directory, STATE_FILE)
    state = _read_json(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DataFormatError(
            f"{path}: not a megablocks-ablate trainer state (expected format {STATE_FORMAT!r})"
        )
    for key in ("step", "consumed_samples", "tokens_seen", "config", "sha256", "rng"):
        if key not in state:
            raise DataFormatError(f"{path}: missing field {key!r}")
    return state


class _Absent:
    """A config key one side does not have (in a difference, shown as ``absent``)."""

    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _leaf_differences(name: str, saved: Any, now: Any) -> list[tuple[str, Any, Any]]:
    """``[(dotted name, saved, now)]`` of the values that differ, descending into
    mappings (``optimizer.lr``, not the whole optimizer block)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = list(saved) + [k for k in now if k not in saved]
        return [
            d
            for k in keys
            for d in _leaf_differences(f"{name}.{k}", saved.get(k, _ABSENT), now.get(k, _ABSENT))
        ]
    return [] if saved == now else [(name, saved, now)]


def trajectory_differences(saved_config: dict, config: dict) -> list[tuple[str, Any, Any]]:
    """``[(field, saved, now)]`` where ``config`` (a ``TrainConfig.to_dict()``) differs
    from ``saved_config`` (the one a checkpoint or a finished run recorded) on a
    :data:`TRAJECTORY_FIELDS` field; a saved config without a field added later counts
    as its value from before (:data:`_TRAJECTORY_DEFAULTS`). Empty when they match."""
    diffs = []
    for k in TRAJECTORY_FIELDS:
        saved = _canonical(k, saved_config.get(k, _TRAJECTORY_DEFAULTS.get(k)))
        now = _canonical(k, config.get(k, _TRAJECTORY_DEFAULTS.get(k)))
        if saved != now:
            diffs += _leaf_differences(k, saved, now) or [(k, saved, now)]
    return diffs


def _describe(diffs: list[tuple[str, Any, Any]], label: str) -> str:
    return "; ".join(f"{k}: {label} {saved!r} vs now {now!r}" for k, saved, now in diffs)


def check_compatible(saved_config: dict, config: dict, directory: str) -> None:
    """Refuse to resume from a checkpoint whose trajectory-defining settings differ."""
    diffs = trajectory_differences(saved_config, config)
    if diffs:
        raise DataFormatError(
            f"{directory}: checkpoint was written by a run with other "
            f"settings ({_describe(diffs, 'checkpoint')}); use another out_dir or the same settings"
        )


def read_run_config(out_dir: str) -> dict:
    """The config a run directory recorded (``config.yaml``, rewritten at every start:
    the settings that trained it), as plain data."""
    import yaml

    path = os.path.join(out_dir, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise DataFormatError(
            f"{path}: missing, so the settings that trained this run cannot be checked; "
            "restore it, or use another out_dir"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise DataFormatError(
            f"{path}: expected a mapping of train settings, got {type(data).__name__}"
        )
    return data


def check_complete(out_dir: str, config: dict) -> None:
    """Refuse a finished run directory (:func:`is_complete`) that ``config`` (a
    ``TrainConfig.to_dict()``) cannot reuse: one whose ``COMPLETE.json`` is unreadable or
    records no model sha256, whose ``config.yaml`` is missing or unreadable, or whose
    recorded settings differ on a field a resume is checked on (:func:`check_compatible`:
    logging, checkpoint cadence, devices and the like may differ). Reads only."""
    recorded_model_sha256(os.path.join(out_dir, FINAL_DIR))  # COMPLETE.json, named if bad
    path = os.path.join(out_dir, CONFIG_FILE)
    diffs = trajectory_differences(read_run_config(out_dir), config)
    if diffs:
        raise DataFormatError(
            f"{out_dir}: holds a finished run trained with other settings "
            f"({_describe(diffs, 'recorded')}; recorded in {path}); "
            "use another out_dir or the same settings"
        )


def load_train_checkpoint(directory: str, verify: bool = True) -> dict:
    """Read and validate a step checkpoint.

    Returns ``{"trainer": trainer_state, "model": state_dict, "model_config": dict,
    "lineage": Lineage, "optim": name-keyed optimizer state dict, "rng": [per-rank],
    "average": the weight_average state dict, or None}``.
    """
    state = read_trainer_state(directory)
    if verify:
        for name, digest in state["sha256"].items():
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise DataFormatError(f"{path}: missing checkpoint file")
            if sha256_file(path) != digest:
                raise DataFormatError(
                    f"{path}: corrupt (sha256 differs from {STATE_FILE}); "
                    f"delete {directory} to resume from an earlier checkpoint"
                )
    model, model_config, lineage = load_model_checkpoint(directory)
    optim = load_optimizer_state(directory)
    rng_tensors = _load_tensors(os.path.join(directory, RNG_FILE))
    rng = []
    for r, meta in enumerate(state["rng"]):
        prefix = f"rank{r}/"
        rng.append(
            {
                "tensors": {
                    k[len(prefix) :]: v for k, v in rng_tensors.items() if k.startswith(prefix)
                },
                "meta": meta,
            }
        )
    return {
        "trainer": state,
        "model": model,
        "model_config": model_config,
        "lineage": lineage,
        "optim": optim,
        "rng": rng,
        "average": (
            _load_tensors(os.path.join(directory, AVERAGE_FILE))
            if AVERAGE_FILE in state["sha256"]
            else None
        ),
    }


def load_optimizer_state(directory: str) -> dict:
    """The name-keyed optimizer state dict in ``directory`` (a step checkpoint or a
    final/ with optimizer state); the caller verifies its hash first."""
    meta = _read_json(os.path.join(directory, OPTIM_JSON))
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list):
        raise DataFormatError(
            f"{os.path.join(directory, OPTIM_JSON)}: expected an object with 'param_groups'"
        )
    return unflatten_optimizer_state(_load_tensors(os.path.join(directory, OPTIM_TENSORS)), meta)
