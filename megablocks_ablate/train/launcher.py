"""Train the pool: one unit model per base unit, on the devices of one machine.

Every unit model starts from the same seed with the same budget and hyperparameters
(one YAML, ``out_dir: pool/{unit}``); only ``data.unit`` differs. The launcher runs one
``megablocks-ablate train`` subprocess per device slot (a GPU, or a group of CPU
cores), queueing the remaining units, and skips units whose ``COMPLETE.json`` exists
(a finished unit trained with other settings is reported failed and left as it is, as
``train`` refuses it), so rerunning it after a crash or preemption only trains what is
missing (an interrupted unit resumes from its last checkpoint).

A Slurm job array does the same across nodes: task ``i`` runs
``megablocks-ablate train --config unit.yaml --unit-index i`` (see tools/launch/).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from megablocks_ablate.errors import ConfigError, MBAError
from megablocks_ablate.utils.outputs import claim_output_dir

logger = logging.getLogger(__name__)


def pool_units(manifest) -> list[str]:
    """The base units of a manifest in pool order (partition by partition, unit order)."""
    return [u for units in manifest.partition_units().values() for u in units]


def unit_config(config_path: str, overrides: list[str], unit: str):
    """The TrainConfig of one unit model: the pool YAML with ``data.unit=<unit>``."""
    from megablocks_ablate.train.config import TrainConfig

    cfg = TrainConfig.load(config_path, list(overrides) + [f"data.unit={unit}"])
    if "{unit}" not in cfg.out_dir:
        raise ConfigError(
            f"{config_path}: out_dir {cfg.out_dir!r} must contain '{{unit}}' so that "
            f"every unit model gets its own directory (e.g. pool/{{unit}})"
        )
    return cfg


@dataclass(frozen=True)
class Slot:
    """Where one training process runs: a GPU index, or CPU threads."""

    name: str
    env: tuple[tuple[str, str], ...]


def parse_slots(devices: str, cpu_count: int | None = None) -> list[Slot]:
    """``"auto"`` (every GPU, else one CPU slot), ``"0,1,3"`` (GPUs) or ``"cpu:N"``.

    CPU slots split the cores evenly (``OMP_NUM_THREADS``); GPU slots set
    ``CUDA_VISIBLE_DEVICES`` so each process sees one device.
    """
    cpu_count = cpu_count or os.cpu_count() or 1
    if devices == "auto":
        import torch

        n = torch.cuda.device_count()
        devices = ",".join(str(i) for i in range(n)) if n else "cpu:1"
    if devices.startswith("cpu"):
        try:
            n = int(devices.partition(":")[2] or 1)
        except ValueError:
            raise ConfigError(f"--devices {devices!r}: expected cpu:N") from None
        if n < 1:
            raise ConfigError(f"--devices {devices!r}: N must be >= 1")
        threads = str(max(1, cpu_count // n))
        return [
            Slot(f"cpu{i}", (("CUDA_VISIBLE_DEVICES", ""), ("OMP_NUM_THREADS", threads)))
            for i in range(n)
        ]
    try:
        gpus = [int(x) for x in devices.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--devices {devices!r}: expected auto, cpu:N or GPU indices like 0,1,2"
        ) from None
    if not gpus:
        raise ConfigError("--devices: no device given")
    return [Slot(f"cuda{g}", (("CUDA_VISIBLE_DEVICES", str(g)),)) for g in gpus]


def _finished_unit(out: str, cfg) -> str:
    """ "skipped" when the finished run at ``out`` was trained with ``cfg``'s settings
    (as `train` checks), else "failed (...)" with the differences logged."""
    from megablocks_ablate.train.state import check_complete

    try:
        check_complete(out, cfg.to_dict())
    except MBAError as e:
        logger.error("pool: %s", e)
        return "failed (a finished run this config cannot reuse)"
    return "skipped"


def run_pool(
    config_path: str,
    overrides: list[str],
    slots: list[Slot],
    units: list[str] | None = None,
    python: str = sys.executable,
    poll_s: float = 0.2,
) -> dict[str, str]:
    """Train every unit (default: all of the manifest's) not yet complete.

    Returns ``{unit: "done" | "skipped" | "failed (...)"}``; a failed unit does not
    stop the others. Each unit's output goes to ``<unit out_dir>/train.log``.
    """
    from megablocks_ablate.data.manifest import Manifest
    from megablocks_ablate.train.config import TrainConfig
    from megablocks_ablate.train.state import is_complete

    base = TrainConfig.load(config_path, overrides)
    manifest = Manifest.load(base.data.manifest)
    all_units = pool_units(manifest)
    units = list(all_units if units is None else units)
    for u in units:
        manifest.unit_prefix(u)  # unknown unit -> error naming the manifest

    result: dict[str, str] = {}
    queue: list[tuple[str, str]] = []
    for u in units:
        cfg = unit_config(config_path, overrides, u)
        out = cfg.resolved_out_dir()
        if is_complete(out):
            result[u] = _finished_unit(out, cfg)
        else:
            queue.append((u, out))
    logger.info(
        "pool: %d units, %d to train, %d complete; %d slot(s)",
        len(units),
        len(queue),
        sum(r == "skipped" for r in result.values()),
        len(slots),
    )

    running: dict[str, tuple[str, subprocess.Popen, object]] = {}  # slot -> (unit, proc, logfile)
    free = list(slots)
    while queue or running:
        while queue and free:
            slot = free.pop(0)
            unit, out = queue.pop(0)
            claim_output_dir(out, "train-run", reuse=True, flag="out_dir")  # before train.log
            logf = open(os.path.join(out, "train.log"), "a", encoding="utf-8")
            env = dict(os.environ, MBA_NO_PROGRESS="1", **dict(slot.env))
            cmd = [
                python,
                "-m",
                "megablocks_ablate",
                "train",
                "--config",
                config_path,
                *overrides,
                f"data.unit={unit}",
            ]
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
            running[slot.name] = (unit, proc, logf)
            logger.info("pool: %s started on %s (pid %d)", unit, slot.name, proc.pid)
        time.sleep(poll_s)
        for slot in slots:
            if slot.name not in running:
                continue
            unit, proc, logf = running[slot.name]
            rc = proc.poll()
            if rc is None:
                continue
            logf.close()
            del running[slot.name]
            free.append(slot)
            result[unit] = "done" if rc == 0 else f"failed (exit {rc})"
            logger.info("pool: %s %s", unit, result[unit])
    return {u: result[u] for u in units}
