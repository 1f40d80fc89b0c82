"""One rank of the pool-placement test (launched by torchrun, 2 gloo ranks).

    _pool_worker.py CHECKPOINTS_JSON HOST_DIR OUT_DIR SEED_DIR

For each placement it merges every weight vector of WEIGHTS into a TinyLM and saves
the flat parameters to OUT_DIR/rank<r>-<mode>.pt, plus OUT_DIR/rank<r>-info.json
(placements chosen, host row files mapped and their page sharing). The ``*-delta``
modes hold bf16-delta rows: differences from the seed at SEED_DIR.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from merge_fixtures import CONFIG, TinyLM, merged_flats

from megablocks_ablate.merge.pool_delta import find_seed
from megablocks_ablate.merge.pool_host import HostPool, host_dir_usage
from megablocks_ablate.merge.pool_placement import PoolRequest, open_pool
from megablocks_ablate.merge.pool_sharded import LockstepError, ShardedPool
from megablocks_ablate.train.distributed import distributed_session

UNITS = ("a0", "a1", "b0", "b1", "c0")  # 2 ranks: shard 0 holds a0, a1; shard 1 the rest
WEIGHTS = [
    [0.2, 0.2, 0.2, 0.2, 0.2],  # every unit, both shards
    {"a0": 0.5, "a1": 0.5},  # all members on shard 0
    {"b0": 0.3, "c0": 0.7},  # all members on shard 1
    {"b1": 1.0},  # one unit
    [0.1, 0.0, 0.7, 0.0, 0.2],  # gaps, both shards
    [1.5, -0.5, 0.0, 0.0, 0.0],  # task arithmetic: a negative weight
]


def merges(pool, live_dtype=torch.float32):
    return merged_flats(pool, WEIGHTS, live_dtype)


def smaps_of(paths):
    """Per mapped row file: Rss, shared and private kB in this process (/proc/self/smaps)."""
    found, current = {}, None
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if not parts[0].endswith(":"):  # a mapping's header line (maybe without a path)
                current = parts[5] if len(parts) >= 6 and parts[5] in paths else None
                if current:
                    found.setdefault(current, {"rss": 0, "shared": 0, "private": 0})
            elif current and parts[0] in ("Rss:", "Shared_Clean:", "Shared_Dirty:"):
                key = "rss" if parts[0] == "Rss:" else "shared"
                found[current][key] += int(parts[1])
            elif current and parts[0] in ("Private_Clean:", "Private_Dirty:"):
                found[current]["private"] += int(parts[1])
    return found


def host_mode(ckpts, host_dir, rank, info):
    pool = HostPool.from_checkpoints(ckpts, dtype=torch.float32, host_dir=host_dir)
    result = merges(pool)
    dist.barrier()  # both ranks have mapped and read every row
    paths = {f.path for f in pool.files}
    info["host"] = {
        "inodes": [list(f.inode) for f in pool.files],
        "created": [f.created for f in pool.files],
        "smaps": smaps_of(paths),
        "usage": host_dir_usage(host_dir),
    }
    dist.barrier()  # both measured while both map the rows
    pool.close()
    dist.barrier()
    info["host"]["usage_after_close"] = host_dir_usage(host_dir)
    return result


def delta_modes(ckpts, host_dir, seed_dir, info, results):
    """bf16-delta rows in every placement (the seed found through open_pool's seed_dir)."""
    seed = find_seed(ckpts, seed_dir)[0]
    pool, choice = open_pool(ckpts, PoolRequest("resident", "bf16-delta"), seed_dir=seed_dir)
    info["formats"] = {"resident-bf16-delta": choice.size.row_format}
    results["resident-bf16-delta"] = merges(pool)
    staged = HostPool.from_checkpoints(
        ckpts,
        dtype=torch.bfloat16,
        host_dir=os.path.join(host_dir, "c"),
        staged=True,
        staging_bytes=2 * 64 * (4 + 5 * 2),  # 64-element chunks of the seed and 5 rows
        seed=seed,
    )
    info["host_delta_created"] = [f.created for f in [*staged.files, staged.base_file]]
    dist.barrier()  # both ranks have mapped every file before either can close (and remove) it
    results["host-bf16-delta-staged"] = merges(staged)
    staged.close()
    pool, choice = open_pool(
        ckpts, PoolRequest("sharded", "bf16"), group=dist.group.WORLD, seed_dir=seed_dir
    )
    info["formats"]["sharded-bf16-delta"] = choice.size.row_format
    info["formats"]["sharded-pool"] = pool.row_format
    results["sharded-bf16-delta"] = merges(pool)
    pool = ShardedPool.from_checkpoints(
        ckpts, dist.group.WORLD, dtype=torch.bfloat16, show_progress=False, chunk=100, seed=seed
    )
    results["sharded-bf16-delta-chunked"] = merges(pool)


def run(ckpts, host_dir, out_dir, seed_dir):
    rank = dist.get_rank()
    info = {"world": dist.get_world_size(), "placements": {}}
    results = {}
    for mode, req in (
        ("resident-fp32", PoolRequest("resident", "fp32")),
        ("resident-bf16", PoolRequest("resident", "bf16-plain")),
        ("auto-bf16", PoolRequest("auto", "bf16-plain")),
    ):
        pool, choice = open_pool(ckpts, req, show_progress=False)
        info["placements"][mode] = [choice.placement, type(pool).__name__]
        results[mode] = merges(pool)
    delta_modes(ckpts, host_dir, seed_dir, info, results)
    results["host-fp32"] = host_mode(ckpts, os.path.join(host_dir, "a"), rank, info)
    staged = HostPool.from_checkpoints(
        ckpts,
        dtype=torch.bfloat16,
        host_dir=os.path.join(host_dir, "b"),
        staged=True,
        staging_bytes=2 * 5 * 2 * 64,  # 64-element chunks for 5 members: many chunks
    )
    results["host-bf16-staged"] = merges(staged)
    staged.close()
    pool, choice = open_pool(ckpts, PoolRequest("sharded", "fp32"), group=dist.group.WORLD)
    info["placements"]["sharded-fp32"] = [choice.placement, type(pool).__name__, choice.shards]
    info["shard_rows"] = [pool.first, pool.first + pool.rows.shape[0]]
    results["sharded-fp32"] = merges(pool)
    for mode, dtype, live in (
        ("sharded-fp32-chunked", torch.float32, torch.float32),
        ("sharded-bf16-chunked", torch.bfloat16, torch.float32),
        ("sharded-bf16-live-bf16", torch.bfloat16, torch.bfloat16),
    ):
        pool = ShardedPool.from_checkpoints(
            ckpts, dist.group.WORLD, dtype=dtype, show_progress=False, chunk=100
        )
        results[mode] = merges(pool, live)
    try:  # out of lockstep: each rank asks for another mixture
        pool.merge_into(TinyLM(**CONFIG), {UNITS[rank]: 1.0})
        info["lockstep"] = "no error"
    except LockstepError as e:
        info["lockstep"] = str(e)
    for mode, flats in results.items():
        torch.save(flats, os.path.join(out_dir, f"rank{rank}-{mode}.pt"))
    with open(os.path.join(out_dir, f"rank{rank}-info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f)


if __name__ == "__main__":
    ckpts_json, host_dir, out_dir, seed = sys.argv[1:5]
    with open(ckpts_json, encoding="utf-8") as f:
        checkpoints = json.load(f)
    with distributed_session(device="cpu", backend="gloo"):
        run(checkpoints, host_dir, out_dir, seed)
