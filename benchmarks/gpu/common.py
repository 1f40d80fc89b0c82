"""Plumbing shared by the GPU suite's row drivers (``benchmarks/gpu/*.py``).

Every row is one process: ``python benchmarks/gpu/<row>.py --out ROW.json [--dry-run]
[--device D] [--workdir W] ...``. It writes one JSON object::

    {"row": "merge_kernels", "status": "ok" | "skipped" | "failed", "reason": "...",
     "dry_run": false, "device": "NVIDIA H200",
     "key": {"name": "...", "value": 0.83, "unit": "fraction", "text": "83% of copy"},
     "target": {"text": ">= 70% of copy bandwidth", "op": ">=", "value": 0.7},
     "met": true, "details": {...}, "wall_s": 12.3}

A row that crashes writes nothing; the suite runner (``suite.py``) then records it as
failed with its exit code and the tail of its stderr. Nothing here imports
``megablocks_ablate``, so the environment row still reports when the package does not
import.

Devices: a row runs on ``cpu`` (dry run) or ``cuda:<LOCAL_RANK>``, always with an index
(:func:`row_device`); whatever it hands to torch.distributed comes from
:func:`process_group_args` (backend, indexed ``device_id``), so a CPU test can check
exactly what a CUDA row would pass (tests/benchmarks/test_gpu_rows.py).

Testing hooks (read by :func:`run_row`, so they exercise the real failure paths):
``MBA_GPU_SUITE_FAIL=row[,row]`` makes those rows raise at start (a crash, exit 1);
``MBA_GPU_SUITE_HANG=row[,row]`` makes them sleep until the runner kills them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
for _p in (ROOT, BENCH):  # the package, and the existing benchmark scripts as modules
    if _p not in sys.path:
        sys.path.insert(0, _p)

FAIL_ENV = "MBA_GPU_SUITE_FAIL"
HANG_ENV = "MBA_GPU_SUITE_HANG"
ROW_TIMEOUT_ENV = "MBA_GPU_SUITE_ROW_TIMEOUT_S"  # set by the runner: this row's time slice


def local_rank() -> int:
    """This process's GPU index among the node's (torchrun's LOCAL_RANK; 0 alone)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def row_device(dry_run: bool, device: str | None = None) -> str:
    """The device a row runs on, always indexed: ``device`` as given (a bare ``cuda``
    becomes ``cuda:<local rank>``), else ``cpu`` for a dry run, else ``cuda:<local rank>``.
    torch.distributed refuses a ``device_id`` without an index."""
    if device and device != "cuda":
        return device
    if device is None and dry_run:
        return "cpu"
    return f"cuda:{local_rank()}"


@dataclass(frozen=True)
class ProcessGroupArgs:
    """What a row hands to torch.distributed: ``backend``, the rank's ``device`` and the
    ``device_id`` for ``init_process_group`` (an indexed CUDA device, None for gloo)."""

    backend: str
    device: Any  # torch.device
    device_id: Any  # torch.device with an index, or None

    @property
    def device_type(self) -> str:
        """For ``init_device_mesh(device_type, ...)`` / ``DeviceMesh``."""
        return str(self.device.type)

    def init_kwargs(
        self, rank: int, world_size: int, init_method: str | None = None
    ) -> dict[str, Any]:
        """Keyword arguments of ``dist.init_process_group(**...)``."""
        kw: dict[str, Any] = {"backend": self.backend, "rank": rank, "world_size": world_size}
        if init_method is not None:
            kw["init_method"] = init_method
        if self.device_id is not None:
            kw["device_id"] = self.device_id
        return kw


def process_group_args(device_type: str, local_rank: int = 0) -> ProcessGroupArgs:
    """``("nccl", cuda:<local_rank>, device_id=cuda:<local_rank>)`` for ``cuda``;
    ``("gloo", cpu, device_id=None)`` for ``cpu`` (the dry run). Needs no GPU."""
    import torch

    if device_type == "cuda":
        if local_rank < 0:
            raise ValueError(f"local rank must be >= 0, got {local_rank}")
        dev = torch.device("cuda", local_rank)
        return ProcessGroupArgs("nccl", dev, dev)
    if device_type == "cpu":
        return ProcessGroupArgs("gloo", torch.device("cpu"), None)
    raise ValueError(f"device type must be cuda or cpu, got {device_type!r}")


def row_timeout_s() -> float | None:
    """This row's time slice as the runner gave it (None when run by hand)."""
    value = os.environ.get(ROW_TIMEOUT_ENV)
    return float(value) if value else None


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every row takes; a row adds its own."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True, help="this row's JSON file")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU")
    ap.add_argument(
        "--device", default=None, help="default: cpu with --dry-run, else cuda:<LOCAL_RANK>"
    )
    ap.add_argument("--workdir", default=None, help="scratch space (big files go here)")
    return ap


def _named_in(env: str, name: str) -> bool:
    return name in {x.strip() for x in os.environ.get(env, "").split(",") if x.strip()}


def write_json(path: str, obj: dict) -> None:
    """Atomically (temp file + rename): a killed row never leaves half a JSON."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def run_row(name: str, ap: argparse.ArgumentParser, body: Callable[[argparse.Namespace], dict]):
    """Parse the arguments, apply the testing hooks, run ``body(args)`` and write its
    result (``status`` defaults to ok) with the common fields. Exceptions propagate:
    the process exits non-zero and the runner records the failure. A body that returns
    ``status: failed`` (a correctness check that did not hold) has its JSON written,
    figures and all, and the process exits 1."""
    args = ap.parse_args()
    args.device = row_device(args.dry_run, args.device)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    if _named_in(FAIL_ENV, name):
        raise RuntimeError(f"forced failure of row {name!r} ({FAIL_ENV})")
    if _named_in(HANG_ENV, name):
        print(f"row {name}: hanging on purpose ({HANG_ENV})", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)
    t0 = time.perf_counter()
    result = body(args)
    out = {"row": name, "status": "ok", "dry_run": args.dry_run}
    out.update(result)
    out.setdefault("device", device_name(args.device))
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    write_json(args.out, out)
    print(f"row {name}: {out['status']} {out.get('key', {}).get('text', '')}", file=sys.stderr)
    if out["status"] == "failed":
        print(f"row {name}: failed: {out.get('reason')}", file=sys.stderr)
        return 1
    return 0


def skipped(reason: str, **extra) -> dict:
    return {"status": "skipped", "reason": reason, **extra}


def key(name: str, value, unit: str, text: str | None = None) -> dict:
    return {"name": name, "value": value, "unit": unit, "text": text or f"{value} {unit}"}


def target(text: str, op: str | None = None, value: float | None = None) -> dict:
    return {"text": text, "op": op, "value": value}


def meets(value: float | None, tgt: dict) -> bool | None:
    """Whether ``value`` meets a numeric target (None when either is missing)."""
    if value is None or tgt.get("value") is None:
        return None
    return value >= tgt["value"] if tgt["op"] == ">=" else value <= tgt["value"]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device, reps: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn``, ``reps`` times after ``warmup`` calls. On CUDA each
    call is bracketed by events (no host overhead in the figure); on CPU by the clock."""
    import torch

    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)
