"""Pool placements (resident, host, sharded) merge exactly what one ModelPool merges,
and ``auto`` picks the first placement that fits.

The multi-process tests run tests/merge/_pool_worker.py under torchrun with 2 gloo
ranks and compare every rank's merged flat parameters with the single-process
``ModelPool.merge_into`` result computed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from merge_fixtures import CONFIG, TinyLM, merged_flats, write_family

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.merge import pool_placement as pp
from megablocks_ablate.merge.pool import ModelPool
from megablocks_ablate.merge.pool_delta import find_seed
from megablocks_ablate.merge.pool_host import HostPool, host_dir_usage, row_file_name, row_key
from megablocks_ablate.merge.pool_placement import (
    MemoryFigures,
    PoolPlanning,
    PoolRequest,
    PoolSize,
    choose_placement,
    describe_pool,
)
from megablocks_ablate.merge.pool_sharded import shard_bounds

WORKER = os.path.join(os.path.dirname(__file__), "_pool_worker.py")
GB = 10**9


def _single(ckpts, weights, dtype=torch.float32, live=torch.float32):
    pool = ModelPool.from_checkpoints(ckpts, dtype=dtype, show_progress=False)
    return merged_flats(pool, weights, live)


# --------------------------------------------------------------------------- the rule


def _mem(device_free=80, host=1000, shm=None, dev="cuda", local=1, world=1, group=None):
    return MemoryFigures(
        dev,
        int(device_free * GB),
        int(host * GB),
        int((host if shm is None else shm) * GB),
        local,
        world,
        group,
    )


def test_auto_takes_resident_when_it_fits_one_device():
    size = PoolSize(n_rows=16, num_params=10**9, itemsize=2)  # 32 GB
    c = choose_placement("auto", size, _mem(device_free=80), reserve=8 * GB)
    assert (c.placement, c.fits, c.per_device, c.per_node) == ("resident", True, 40 * GB, 0)


def test_auto_takes_host_when_the_pool_exceeds_a_device():
    size = PoolSize(64, 1_100_000_000, 2)  # 64 units of 1.1b in bf16: 140.8 GB
    c = choose_placement("auto", size, _mem(device_free=80, host=1000, local=8), 10 * GB)
    assert c.placement == "host" and c.fits
    assert c.per_node == size.total_bytes  # one copy per node, whatever the local ranks
    assert c.per_device == 10 * GB + pp.STAGING_BYTES
    # a container's small /dev/shm rules host out
    c = choose_placement("auto", size, _mem(device_free=80, host=1000, shm=64, world=8), 10 * GB)
    assert c.placement == "sharded"


def test_auto_shards_over_the_fewest_ranks_that_fit():
    size = PoolSize(64, 1_100_000_000, 4)  # fp32: 281.6 GB
    mem = _mem(device_free=80, host=200, world=8)
    c = choose_placement("auto", size, mem, 10 * GB)
    assert c.placement == "sharded" and c.fits
    assert c.shards == 8  # 4 shards: 70 GB + reserve > 72 GB usable; 8: 35 GB
    assert c.per_shard == 8 * size.row_bytes
    # a given pool group is the only group size considered: 4 shards do not fit
    grouped = _mem(device_free=80, host=200, world=8, group=4)
    with pytest.raises(ConfigError, match="fits no placement"):
        choose_placement("auto", size, grouped, 10 * GB)
    c = choose_placement("sharded", size, grouped, 10 * GB)
    assert (c.placement, c.shards, c.fits) == ("sharded", 4, False)


def test_auto_refuses_when_nothing_fits_naming_the_figures():
    size = PoolSize(64, 1_100_000_000, 4)
    with pytest.raises(ConfigError, match="fits no placement.*resident needs 291"):
        choose_placement("auto", size, _mem(device_free=80, host=200, world=2), 10 * GB)


def test_cpu_resident_counts_one_copy_per_rank():
    size = PoolSize(10, 10**9, 2)  # 20 GB
    mem = _mem(dev="cpu", host=100, local=4)  # 4 copies: 80 GB + reserve > 90 GB usable
    c = choose_placement("auto", size, mem, reserve=4 * GB)
    assert c.placement == "host" and c.per_node == 20 * GB + 4 * 4 * GB
    c = choose_placement("auto", size, _mem(dev="cpu", host=100, local=1), reserve=4 * GB)
    assert c.placement == "resident" and c.per_node == 24 * GB


def test_explicit_requests_are_kept_and_say_whether_they_fit():
    size = PoolSize(64, 1_100_000_000, 4)
    c = choose_placement("resident", size, _mem(device_free=80), 0)
    assert c.placement == "resident" and not c.fits and "does NOT fit" in c.describe()
    with pytest.raises(ConfigError, match="pool placement must be one of"):
        choose_placement("everywhere", size, _mem(), 0)
    with pytest.raises(ConfigError, match="pool dtype must be one of"):
        PoolRequest("auto", "fp16")


def test_shard_bounds_are_contiguous_and_balanced():
    assert shard_bounds(5, 2) == [(0, 2), (2, 5)]
    assert shard_bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [hi - lo for lo, hi in shard_bounds(7, 3)] == [2, 2, 3]


# --------------------------------------------------------------------------- the plan


def test_pool_size_and_plan_text_from_headers(tmp_path, monkeypatch):
    _, ckpts = write_family(str(tmp_path))
    p = sum(t.numel() for t in TinyLM(**CONFIG).parameters())
    first = next(iter(ckpts.values()))
    assert pp.pool_size(first, 3, "bf16") == PoolSize(3, p, 2, delta=True)  # with a seed
    assert pp.pool_size(first, 3, "bf16-plain") == PoolSize(3, p, 2)
    text = "\n".join(describe_pool(first, 3, PoolPlanning(PoolRequest("host", "fp32"))))
    assert f"3 unit models x {p:,} parameters in fp32 = " in text
    assert "pool placement host -> host (in host memory, one copy per node)" in text
    assert "per device" in text and "per node" in text
    # 100,000 such units (594 MB) on 0.75 GB devices, no host room, two ranks: sharded
    monkeypatch.setattr(
        pp, "measure_memory", lambda *a, **k: _mem(device_free=0.75, host=0, world=2)
    )
    text = "\n".join(describe_pool(first, 100_000, PoolPlanning(PoolRequest("auto", "fp32"))))
    assert "pool placement auto -> sharded" in text and "world = replicas x 2" in text
    monkeypatch.undo()

    # the dry-run's evaluation section, through the planner's own function
    from megablocks_ablate.ablate.runner.plan import _describe_evaluation

    study = SimpleNamespace(
        mixtures=[],
        eval_sets={"d": "x"},
        validation=[],
        used_units=list(ckpts),
        partition_jobs={},
        merge_plan=lambda m: [],
    )
    jobs = [
        SimpleNamespace(entry=SimpleNamespace(model_dir=d, complete=True)) for d in ckpts.values()
    ]
    plan = SimpleNamespace(pool_jobs=jobs, seed_dir=str(tmp_path / "seed"))
    lines = _describe_evaluation(study, str(tmp_path / "out"), plan, None)
    assert any("pool: 3 unit models" in line for line in lines)
    assert any("pool placement auto -> resident" in line for line in lines), lines


# --------------------------------------------------------------------------- host, one process


def test_host_pool_equals_model_pool_and_shares_its_rows(tmp_path):
    _, ckpts = write_family(str(tmp_path))
    weights = [{"cs_0": 1.0}, [0.3, 0.3, 0.4], [0.5, 0.0, 0.5]]
    want = _single(ckpts, weights)
    shm = str(tmp_path / "shm")
    direct = HostPool.from_checkpoints(ckpts, dtype=torch.float32, host_dir=shm)
    staged = HostPool.from_checkpoints(
        ckpts, dtype=torch.float32, host_dir=shm, staged=True, staging_bytes=4 * 3 * 2 * 50
    )
    assert all(f.created for f in direct.files) and not any(f.created for f in staged.files)
    assert host_dir_usage(shm) == {"files": 3, "bytes": 3 * direct.num_params * 4}
    for pool in (direct, staged):
        model = TinyLM(**CONFIG)
        flat = pool.bind(model)
        for w, ref in zip(weights, want):
            pool.merge_into(model, w)
            assert torch.equal(flat, ref)
    direct.close()
    assert host_dir_usage(shm)["files"] == 3  # still used by the other pool
    staged.close()
    assert os.listdir(shm) == []  # the last user removed rows and locks


def test_host_rows_left_unheld_are_rebuilt_and_stale_temp_files_cleaned(tmp_path):
    _, ckpts = write_family(str(tmp_path))
    shm = tmp_path / "shm"
    shm.mkdir()
    pool = HostPool.from_checkpoints(ckpts, dtype=torch.float32, host_dir=str(shm))
    names = [os.path.basename(f.path) for f in pool.files]
    slots = list(pool.slots.values())
    pool.close()
    assert names[0] == row_file_name(row_key(ckpts["cs_0"]), slots, torch.float32)
    (shm / (names[0] + ".tmp.999999999")).write_bytes(b"half")  # a killed loader's
    (shm / names[1]).write_bytes(b"short")  # no live run holds it: never used
    pool = HostPool.from_checkpoints(ckpts, dtype=torch.float32, host_dir=str(shm))
    assert all(f.created for f in pool.files)
    assert not (shm / (names[0] + ".tmp.999999999")).exists()
    want = _single(ckpts, [[0.3, 0.3, 0.4]])[0]
    model = TinyLM(**CONFIG)
    flat = pool.bind(model)
    pool.merge_into(model, [0.3, 0.3, 0.4])
    assert torch.equal(flat, want)
    pool.close()
    assert os.listdir(shm) == []


def test_open_pool_without_a_group_refuses_sharding(tmp_path, monkeypatch):
    _, ckpts = write_family(str(tmp_path))
    with pytest.raises(ConfigError, match="no pool group of several ranks"):
        pp.open_pool(ckpts, PoolRequest("sharded", "fp32"), show_progress=False)
    pool, choice = pp.open_pool(ckpts, PoolRequest("auto", "fp32"), show_progress=False)
    assert choice.placement == "resident" and isinstance(pool, ModelPool)
    monkeypatch.setattr(
        pp,
        "measure_memory",
        lambda *a, **k: MemoryFigures("cpu", 0, 0, 0),  # nothing fits anywhere
    )
    with pytest.raises(ConfigError, match="fits no placement"):
        pp.open_pool(ckpts, PoolRequest("auto", "fp32"), show_progress=False)


# --------------------------------------------------------------------------- 2 ranks


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, launcher_env):
    """The worker's results from both ranks, and the single-process references."""
    sys.path.insert(0, os.path.dirname(WORKER))
    try:
        from _pool_worker import UNITS, WEIGHTS
    finally:
        sys.path.pop(0)
    root = tmp_path_factory.mktemp("placement")
    seed_dir, ckpts = write_family(str(root), units=UNITS)
    (root / "ckpts.json").write_text(json.dumps(ckpts))
    out, host = root / "out", root / "host"
    out.mkdir()
    host.mkdir()
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"),
        "--standalone",
        "--nproc-per-node",
        "2",
        WORKER,
        str(root / "ckpts.json"),
        str(host),
        str(out),
        seed_dir,
    ]
    proc = subprocess.run(cmd, env=launcher_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = {}
    for r in range(2):
        for name in os.listdir(out):
            if name.startswith(f"rank{r}-") and name.endswith(".pt"):
                got[(r, name[len(f"rank{r}-") : -3])] = torch.load(out / name)
    infos = [json.loads((out / f"rank{r}-info.json").read_text()) for r in range(2)]
    seed = find_seed(ckpts, seed_dir)[0]
    refs = {
        "fp32": _single(ckpts, WEIGHTS),
        "bf16": _single(ckpts, WEIGHTS, torch.bfloat16),
        "bf16-live-bf16": _single(ckpts, WEIGHTS, torch.bfloat16, torch.bfloat16),
        "bf16-delta": merged_flats(
            ModelPool.from_checkpoints(ckpts, dtype=torch.bfloat16, seed=seed), WEIGHTS
        ),
    }
    return SimpleNamespace(got=got, infos=infos, refs=refs, weights=WEIGHTS)


def _exact(got, ref):
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.dtype == r.dtype and torch.equal(g, r), f"weight vector {i}"


def _within_bf16(got, ref_fp32, weights):
    """bf16 rows: each row rounded once (relative 2^-8), the sum in fp32."""
    for g, r, w in zip(got, ref_fp32, weights):
        scale = sum(abs(x) for x in (w.values() if isinstance(w, dict) else w))
        tol = 2.0**-8 * scale * float(r.abs().max() + 1)
        assert float((g - r).abs().max()) <= tol


MODES = {
    "resident-fp32": "fp32",
    "resident-bf16": "bf16",
    "auto-bf16": "bf16",
    "host-fp32": "fp32",
    "host-bf16-staged": "bf16",
    "sharded-fp32": "fp32",
    "sharded-fp32-chunked": "fp32",
    "sharded-bf16-chunked": "bf16",
    "sharded-bf16-live-bf16": "bf16-live-bf16",
    "resident-bf16-delta": "bf16-delta",
    "host-bf16-delta-staged": "bf16-delta",
    "sharded-bf16-delta": "bf16-delta",
    "sharded-bf16-delta-chunked": "bf16-delta",
}


@pytest.mark.integration
@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_merge_what_one_process_merges(two_ranks, mode):
    ref = two_ranks.refs[MODES[mode]]
    for r in range(2):
        _exact(two_ranks.got[(r, mode)], ref)  # fp32, bf16 and delta rows alike: bitwise
        if MODES[mode] in ("bf16", "bf16-delta"):
            _within_bf16(two_ranks.got[(r, mode)], two_ranks.refs["fp32"], two_ranks.weights)


@pytest.mark.integration
def test_two_ranks_placements_as_requested(two_ranks):
    for info in two_ranks.infos:
        assert info["world"] == 2
        assert info["placements"]["resident-fp32"] == ["resident", "ModelPool"]
        assert info["placements"]["auto-bf16"] == ["resident", "ModelPool"]  # tiny: fits
        assert info["placements"]["sharded-fp32"] == ["sharded", "ShardedPool", 2]
        assert "merging different weight vectors" in info["lockstep"]  # both ranks refuse
        assert info["formats"] == {
            "resident-bf16-delta": "bf16-delta",
            "sharded-bf16-delta": "bf16-delta",
            "sharded-pool": "bf16-delta",
        }
    # contiguous shards: rank 0 rows 0..1, rank 1 rows 2..4 (of 5)
    assert [info["shard_rows"] for info in two_ranks.infos] == [[0, 2], [2, 5]]


@pytest.mark.integration
def test_two_ranks_share_one_host_copy(two_ranks):
    a, b = (info["host"] for info in two_ranks.infos)
    assert a["inodes"] == b["inodes"]  # the same files: one copy on the node
    assert [x + y for x, y in zip(a["created"], b["created"])] == [1] * 5  # each loaded once
    assert a["usage"]["files"] == 5
    for h in (a, b):
        assert len(h["smaps"]) == 5
        for page in h["smaps"].values():
            # every resident page of a row is mapped by both processes, none private
            assert page["rss"] > 0 and page["shared"] == page["rss"] and page["private"] == 0
    assert b["usage_after_close"] == {"files": 0, "bytes": 0}  # the last user removed them
    # delta rows and the seed's file: each loaded once on the node too
    created = [x + y for x, y in zip(*(i["host_delta_created"] for i in two_ranks.infos))]
    assert created == [1] * 6


def test_staged_merges_hand_the_kernels_16_byte_aligned_chunks(tmp_path, monkeypatch):
    """Staged chunks are multiples of 8 elements in 16-byte-rounded buffers, so every
    member view and output slice stays aligned for the kernels' vector loads."""
    import megablocks_ablate.merge.pool_host as pool_host

    _, ckpts = write_family(str(tmp_path))
    seen: list[tuple[int, list[int]]] = []
    real = pool_host.merge_into

    def spy(out, xs, ws):
        seen.append((out.data_ptr() % 16, [x.data_ptr() % 16 for x in xs]))
        return real(out, xs, ws)

    monkeypatch.setattr(pool_host, "merge_into", spy)
    staged = HostPool.from_checkpoints(
        ckpts,
        dtype=torch.float32,
        host_dir=str(tmp_path / "shm"),
        staged=True,
        staging_bytes=4 * 3 * 2 * 50 + 4,  # not a multiple of 16 on purpose
    )
    model = TinyLM(**CONFIG)
    flat = staged.bind(model)
    staged.merge_into(model, [0.3, 0.3, 0.4])
    assert len(seen) > 1  # really staged, in several chunks
    assert flat.data_ptr() % 16 == 0
    assert all(o == 0 and set(xs) == {0} for o, xs in seen), seen
    staged.close()
