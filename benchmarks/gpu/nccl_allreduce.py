"""Row ``nccl``: NCCL all-reduce bandwidth over every visible GPU (skipped with fewer than 2).

One process per GPU (torch.multiprocessing), ``all_reduce(SUM)`` of fp32 tensors of
``--sizes-mb`` MB, best of ``--reps`` after warm-up. Reported as nccl-tests does:
algorithm bandwidth = bytes / s, bus bandwidth = algbw * 2 (n - 1) / n (what each link
carries in a ring), the figure to compare with the interconnect's.

``--dry-run`` runs the same code with the gloo backend on 2 CPU processes.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from common import parser, process_group_args, run_row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_group_args(backend: str, rank: int):
    """What worker ``rank`` hands to torch.distributed: NCCL and ``device_id`` =
    ``cuda:<rank>`` (one process per GPU), or gloo on CPU (the dry run)."""
    return process_group_args("cuda" if backend == "nccl" else "cpu", rank)


def _worker(rank: int, world: int, backend: str, sizes_mb: list[float], reps: int, port: int, q):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    pg = worker_group_args(backend, rank)
    dev = pg.device
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(**pg.init_kwargs(rank, world))
    try:
        out = []
        for mb in sizes_mb:
            x = torch.ones(int(mb * 1e6) // 4, dtype=torch.float32, device=dev)
            for _ in range(3):  # warm-up: communicators, buffers
                dist.all_reduce(x)
            best = float("inf")
            for _ in range(reps):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                dist.barrier()
                t = time.perf_counter()
                dist.all_reduce(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                best = min(best, time.perf_counter() - t)
            nbytes = x.numel() * 4
            alg = nbytes / best / 1e9
            out.append(
                {
                    "size_mb": mb,
                    "seconds": best,
                    "algbw_gbps": round(alg, 2),
                    "busbw_gbps": round(alg * 2 * (world - 1) / world, 2),
                }
            )
        if rank == 0:
            q.put(out)
    finally:
        dist.destroy_process_group()


def body(args) -> dict:
    import torch
    import torch.multiprocessing as mp

    if args.dry_run:
        backend, world = "gloo", 2
    else:
        world = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if world < 2:
            return {
                "status": "skipped",
                "reason": f"{world} CUDA device(s) visible: an all-reduce needs 2 or more",
            }
        backend = "nccl"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    mp.start_processes(
        _worker,
        args=(world, backend, args.sizes_mb, args.reps, port, q),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    sizes = q.get(timeout=10)
    best = max(sizes, key=lambda r: r["busbw_gbps"])
    return {
        "device": f"{world} x {backend}",
        "key": {
            "name": "busbw_gbps",
            "value": best["busbw_gbps"],
            "unit": "GB/s",
            "text": f"bus bandwidth {best['busbw_gbps']} GB/s ({world} ranks, {best['size_mb']} MB)",
        },
        "target": None,
        "met": None,
        "details": {"backend": backend, "world_size": world, "sizes": sizes},
    }


if __name__ == "__main__":
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--reps", type=int, default=10)
    sys.exit(run_row("nccl", ap, body))
