"""Where a merge-eval pool's rows live: resident, host or sharded, and choosing one.

A pool of N unit models of P parameters needs N x P x itemsize bytes: 64 units of the
1.1b preset are ~140 GB in bf16 (~280 GB fp32), more than one GPU holds. Three
placements, each merging into the live model with the same result:

================  =====================================  ==================================
placement         rows                                   one merge
================  =====================================  ==================================
``resident``      ``[N, P]`` on the evaluation device    one kernel call (:mod:`.pool`)
                  (each rank its own copy)
``host``          host memory, one copy per node shared  the members' rows copied to the
                  by its ranks (:mod:`.pool_host`)       device chunk by chunk, merged there
``sharded``       G ranks hold N/G contiguous rows each  a chain of partial sums, then a
                  (:mod:`.pool_sharded`)                 broadcast to all G live models
================  =====================================  ==================================

``auto`` (the default) takes the first that fits: resident if the rows, the live model
and the evaluation's activations fit one device's free memory (less a 10% margin);
else host if one copy fits the node's available host memory (and the row directory,
``/dev/shm`` by default); else sharded over the fewest ranks that make a shard fit.
:func:`choose_placement` is that rule as a pure function of the sizes; the figures
come from safetensors headers (nothing is loaded) and the machine
(:func:`measure_memory`). Rows are accumulated in fp32 by every merge kernel; their
storage dtype (``pool_dtype``) is ``auto`` by default: bf16 on a GPU, where memory is
what limits the pool, and fp32 on CPU, where host memory is plentiful and fp32 rows make
a merged model bitwise equal to a file merge of the same checkpoints.

bf16 rows are stored as differences from the seed the units continue, the seed kept
once in fp32 (row format ``bf16-delta``, :mod:`.pool_delta`): the same bytes per row
plus 4 bytes per parameter for the seed, and 60-500x less error than plain bf16 rows for
units 1%-0.1% away from the seed (docs/merging.md).

=================  ==========================================================
``pool_dtype``     rows
=================  ==========================================================
``auto``           ``bf16`` on CUDA, ``fp32`` elsewhere
``fp32``           plain fp32 rows (format ``fp32``)
``bf16``           ``bf16-delta`` where the seed is found (:func:`.find_seed`),
                   else plain bf16 rows, with a warning saying why
``bf16-delta``     bf16 differences from the seed; no seed is an error
``bf16-plain``     each unit rounded to bf16 (format ``bf16-plain``)
=================  ==========================================================
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from megablocks_ablate.checkpoint import model_file, read_checkpoint_meta, safetensors_header
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.merge.kernels import CODES
from megablocks_ablate.merge.pool import ModelPool, RowPool
from megablocks_ablate.merge.pool_delta import (
    BF16_DELTA,
    BF16_PLAIN,
    FP32,
    SEED_ITEMSIZE,
    Seed,
    find_seed,
    format_name,
)
from megablocks_ablate.merge.pool_host import STAGING_BYTES, HostPool, default_host_dir
from megablocks_ablate.merge.pool_sharded import ShardedPool, chain_bytes

logger = logging.getLogger(__name__)

PLACEMENTS = ("auto", "resident", "host", "sharded")
# pool_dtype values (besides auto) -> the rows' storage dtype; see the module docstring
POOL_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "bf16-delta": torch.bfloat16,
    "bf16-plain": torch.bfloat16,
}
# the row format each pool_dtype asks for (bf16: delta where the seed is found)
_FORMATS = {"fp32": FP32, "bf16": BF16_DELTA, "bf16-delta": BF16_DELTA, "bf16-plain": BF16_PLAIN}
MARGIN = 0.10  # of the free memory, left alone: allocator fragmentation, other tenants
FUSED_CE_BYTES = 256 << 20  # the fused output projection + cross-entropy's chunks


@dataclass(frozen=True)
class PoolRequest:
    """What the user asked for: ``placement`` (auto | resident | host | sharded), the rows'
    ``dtype`` (auto | fp32 | bf16 | bf16-delta | bf16-plain; auto is bf16 on CUDA, fp32
    elsewhere; bf16 is delta rows where the seed is found), and the node-wide directory
    of host rows."""

    placement: str = "auto"
    dtype: str = "auto"
    host_dir: str | None = None

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(
                f"pool placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}"
            )
        if self.dtype != "auto" and self.dtype not in POOL_DTYPES:
            raise ConfigError(
                f"pool dtype must be one of auto, {', '.join(POOL_DTYPES)}, got {self.dtype!r}"
            )

    def dtype_on(self, device: str | torch.device) -> str:
        """The rows' dtype name on ``device`` (``auto`` resolved)."""
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if torch.device(device).type == "cuda" else "fp32"

    def format_on(self, device: str | torch.device) -> str:
        """The row format asked for on ``device``: fp32, bf16-delta or bf16-plain (a
        bf16-delta asked for by ``bf16``/``auto`` falls back to plain without a seed)."""
        return _FORMATS[self.dtype_on(device)]

    @property
    def delta_required(self) -> bool:
        """Delta rows or nothing (``bf16-delta`` named explicitly)."""
        return self.dtype == "bf16-delta"


@dataclass(frozen=True)
class PoolSize:
    """N rows of P parameters of ``itemsize`` bytes; ``delta``: the rows are differences
    from a seed held beside them in fp32 (one per copy of the pool: P x 4 bytes)."""

    n_rows: int
    num_params: int
    itemsize: int
    delta: bool = False

    @property
    def row_bytes(self) -> int:
        return self.num_params * self.itemsize

    @property
    def seed_bytes(self) -> int:
        return self.num_params * SEED_ITEMSIZE if self.delta else 0

    @property
    def rows_bytes(self) -> int:
        return self.n_rows * self.row_bytes

    @property
    def total_bytes(self) -> int:
        """One whole copy of the pool: its rows and (delta rows) the fp32 seed."""
        return self.rows_bytes + self.seed_bytes

    @property
    def row_format(self) -> str:
        return format_name("fp32" if self.itemsize == 4 else "bf16", self.delta)


@dataclass(frozen=True)
class MemoryFigures:
    """The machine as a placement sees it (bytes). ``device_free`` is one evaluation
    device's free memory (ignored on CPU, where the device is host memory);
    ``host_available`` the node's available RAM; ``host_dir_free`` the free space where
    host rows go (a tmpfs may be smaller than RAM); ``local_ranks`` the evaluation ranks
    per node; ``world_size`` all ranks; ``group_size`` the size of the pool group a
    sharded pool would use (None: choose the smallest that fits, for a plan)."""

    device_type: str
    device_free: int
    host_available: int
    host_dir_free: int
    local_ranks: int = 1
    world_size: int = 1
    group_size: int | None = None


@dataclass(frozen=True)
class PlacementChoice:
    placement: str
    size: PoolSize
    per_device: int  # bytes on each evaluation device: rows held there + reserve
    per_node: int  # bytes of host memory per node held for the rows
    fits: bool
    shards: int = 1  # G, the ranks of a sharded pool's group
    reason: str = ""

    def describe(self) -> str:
        where = {
            "resident": "on every evaluation device",
            "host": "in host memory, one copy per node",
            "sharded": f"in {self.shards} shards of about {gb(self.per_shard)}",
        }[self.placement]
        return (
            f"{self.placement} ({where}): {gb(self.per_device)} per device, "
            f"{gb(self.per_node)} per node" + ("" if self.fits else " (does NOT fit)")
        )

    @property
    def per_shard(self) -> int:
        """What one shard holds: its rows, and (delta rows) its own copy of the seed."""
        return math.ceil(self.size.n_rows / self.shards) * self.size.row_bytes + (
            self.size.seed_bytes
        )


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


# --------------------------------------------------------------------------- sizes


def pool_size(layout_checkpoint: str, n_rows: int, dtype: str = "bf16") -> PoolSize:
    """The pool's size from one checkpoint's safetensors header (every unit of a study
    has the seed's layout): P = its float tensors' elements; nothing is loaded.
    ``dtype``: a ``pool_dtype`` (bf16 counts as delta rows, what it gets with a seed)
    or a row format."""
    header = safetensors_header(model_file(layout_checkpoint))
    p = sum(
        math.prod(int(x) for x in info["shape"])
        for name, info in header.items()
        if name != "__metadata__" and info["dtype"] in CODES
    )
    fmt = _FORMATS.get(dtype, dtype)
    if fmt not in (FP32, BF16_DELTA, BF16_PLAIN):
        raise ConfigError(f"pool dtype must be one of {', '.join(POOL_DTYPES)}, got {dtype!r}")
    return PoolSize(n_rows, p, 4 if fmt == FP32 else 2, fmt == BF16_DELTA)


def eval_reserve_bytes(config: dict, num_params: int, batch_tokens: int = 16384) -> int:
    """Device memory beside the rows: the fp32 live model, plus an estimate of one
    evaluation forward of ``batch_tokens``: ~24 d_model-wide fp32 activations per token
    (attention and MLP intermediates), and the chunks of the fused output projection +
    cross-entropy (the ``[tokens, vocab]`` logits are never built, see
    evaluate/perplexity.py)."""
    hidden = int(config.get("d_model") or config.get("hidden_size") or 0)
    return 4 * num_params + 4 * batch_tokens * 24 * hidden + FUSED_CE_BYTES


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_available_bytes() -> int:
    """Available RAM of the node (``MemAvailable``), capped by this cgroup's limit."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _read_int("/sys/fs/cgroup/memory.max")
    used = _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        avail = min(avail, max(0, limit - used))
    return avail


def local_world_size() -> int:
    """Ranks per node, from the launcher's environment (torchrun, Open MPI, MPICH)."""
    for var in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(var, "").isdigit():
            return max(1, int(os.environ[var]))
    return 1


def measure_memory(
    device: str | torch.device,
    host_dir: str | None = None,
    world_size: int = 1,
    group_size: int | None = None,
) -> MemoryFigures:
    """This machine's figures for :func:`choose_placement`."""
    device = torch.device(device)
    free = 0
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    vfs = os.statvfs(host_dir or default_host_dir())
    return MemoryFigures(
        device.type,
        int(free),
        host_available_bytes(),
        vfs.f_bavail * vfs.f_frsize,
        local_world_size(),
        world_size,
        group_size,
    )


# --------------------------------------------------------------------------- the rule


def _usable(n: int) -> float:
    return n * (1.0 - MARGIN)


def _resident(size: PoolSize, mem: MemoryFigures, reserve: int) -> PlacementChoice:
    dev = size.total_bytes + reserve
    if mem.device_type == "cpu":  # each rank's own copy in host memory
        node = mem.local_ranks * dev
        return PlacementChoice("resident", size, dev, node, node <= _usable(mem.host_available))
    return PlacementChoice("resident", size, dev, 0, dev <= _usable(mem.device_free))


def _host(size: PoolSize, mem: MemoryFigures, reserve: int) -> PlacementChoice:
    rows = size.total_bytes  # the row files (and the seed's, for delta rows)
    rows_fit = rows <= _usable(min(mem.host_available, mem.host_dir_free))
    if mem.device_type == "cpu":
        node = rows + mem.local_ranks * reserve
        return PlacementChoice(
            "host", size, reserve, node, rows_fit and node <= _usable(mem.host_available)
        )
    dev = reserve + min(STAGING_BYTES, 2 * rows)  # staging: two chunk buffers, never more
    return PlacementChoice("host", size, dev, rows, rows_fit and dev <= _usable(mem.device_free))


def _sharded(size: PoolSize, mem: MemoryFigures, reserve: int, g: int) -> PlacementChoice:
    shard = math.ceil(size.n_rows / g) * size.row_bytes + size.seed_bytes  # each its seed
    dev = shard + reserve + chain_bytes()
    if mem.device_type == "cpu":
        node = min(mem.local_ranks, g) * dev
        fits = node <= _usable(mem.host_available)
        return PlacementChoice("sharded", size, dev, node, fits, g)
    return PlacementChoice("sharded", size, dev, 0, dev <= _usable(mem.device_free), g)


def _shard_counts(size: PoolSize, mem: MemoryFigures) -> list[int]:
    """The group sizes a sharded pool may use: the given pool group's, else the divisors
    of the world size (so that world = replicas x G), else (one process, for a plan)
    any G up to N."""
    if mem.group_size is not None:
        return [mem.group_size]
    if mem.world_size > 1:
        return [g for g in range(2, mem.world_size + 1) if mem.world_size % g == 0]
    return list(range(2, max(2, size.n_rows) + 1))


def choose_placement(
    request: str, size: PoolSize, mem: MemoryFigures, reserve: int = 0
) -> PlacementChoice:
    """The placement for ``request`` (see the module docstring for the ``auto`` rule).
    An explicit request is returned as asked, with ``fits`` saying whether it does;
    ``auto`` with nothing that fits raises ConfigError with the figures."""
    if request not in PLACEMENTS:
        raise ConfigError(f"pool placement must be one of {', '.join(PLACEMENTS)}, got {request!r}")
    resident, host = _resident(size, mem, reserve), _host(size, mem, reserve)
    shardings = [_sharded(size, mem, reserve, g) for g in _shard_counts(size, mem)]
    sharded = next((s for s in shardings if s.fits), shardings[-1] if shardings else None)
    if request == "resident":
        return replace(resident, reason="requested")
    if request == "host":
        return replace(host, reason="requested")
    if request == "sharded":
        if sharded is None:
            raise ConfigError("pool placement sharded needs at least 2 ranks in its group")
        return replace(sharded, reason="requested")
    where = "one device" if mem.device_type == "cuda" else "host memory, one copy per rank"
    if resident.fits:
        return replace(resident, reason=f"fits {where}")
    if host.fits:
        return replace(host, reason=f"does not fit {where}; fits one copy in host memory")
    if sharded is not None and sharded.fits:
        return replace(
            sharded, reason=f"fits neither {where} nor host memory; {sharded.shards} shards fit"
        )
    raise ConfigError(
        f"the pool of {size.n_rows} units x {size.num_params:,} parameters "
        f"({gb(size.total_bytes)} in {size.row_format} rows) fits no placement: "
        f"resident needs {gb(resident.per_device)} per device, host {gb(host.per_node)} per "
        f"node, sharded over {sharded.shards if sharded else 'several'} ranks "
        f"{gb(sharded.per_device) if sharded else 'more than one rank'} per device; this "
        f"machine has {gb(mem.device_free)} free per device and {gb(mem.host_available)} "
        f"host memory ({gb(mem.host_dir_free)} free in the host row directory); use more "
        "ranks, --pool-dtype bf16, or fewer units"
    )


# --------------------------------------------------------------------------- opening


def resolve_seed(
    checkpoints: Mapping[str, str],
    request: PoolRequest,
    device: str | torch.device,
    seed_dir: str | None = None,
) -> Seed | None:
    """The seed of the pool's delta rows, or None for plain rows: only when the request
    resolves to bf16-delta on ``device``. A given ``seed_dir`` that is not the units'
    seed is refused (naming its file); no seed found falls back to plain bf16 rows with
    a warning saying why, unless ``bf16-delta`` was named (then a ConfigError)."""
    if request.format_on(device) != BF16_DELTA:
        return None
    seed, why = find_seed(checkpoints, seed_dir)
    if seed is None:
        if request.delta_required:
            raise ConfigError(
                f"pool dtype bf16-delta needs the seed the unit models continue: {why}; "
                "give it (seed_dir), or ask for bf16 (delta where possible) or bf16-plain"
            )
        logger.warning("pool rows in plain bf16, not as deltas from the seed: %s", why)
    return seed


def open_pool(
    checkpoints: Mapping[str, str],
    request: PoolRequest,
    *,
    device: str | torch.device = "cpu",
    group: dist.ProcessGroup | None = None,
    keys: Mapping[str, str | None] | None = None,
    batch_tokens: int = 16384,
    show_progress: bool = True,
    seed_dir: str | None = None,
) -> tuple[RowPool, PlacementChoice]:
    """Load ``{unit: checkpoint_dir}`` with the placement ``request`` resolves to here.

    ``group``: the process group of a sharded pool's G ranks (None: no sharding here;
    ``auto`` then refuses a pool that would need it). ``keys``: the units' content
    hashes (names of shared host rows). ``seed_dir``: the seed checkpoint the units
    continue, for bf16-delta rows (default: the parent the units record, see
    :func:`.pool_delta.find_seed`); checked against their recorded seed_hash. The
    choice's ``size.row_format`` is the format the rows got."""
    if not checkpoints:
        raise ConfigError("a model pool needs at least one checkpoint")
    first = next(iter(checkpoints.values()))
    dtype_name = request.dtype_on(device)
    seed = resolve_seed(checkpoints, request, device, seed_dir)
    size = pool_size(first, len(checkpoints), BF16_PLAIN if dtype_name != "fp32" else FP32)
    if seed is not None:
        size = replace(size, delta=True)
    reserve = eval_reserve_bytes(read_checkpoint_meta(first)[0], size.num_params, batch_tokens)
    g = dist.get_world_size(group) if group is not None else None
    mem = measure_memory(device, request.host_dir, group_size=g if g and g > 1 else None)
    choice = choose_placement(request.placement, size, mem, reserve)
    if choice.placement == "sharded" and (g is None or g < 2):
        raise ConfigError(
            f"the pool of {size.n_rows} units needs sharded placement ({choice.describe()}; "
            f"{choice.reason}) but this process scores alone, with no pool group of several "
            "ranks to shard over; free device or host memory, use --pool-dtype bf16, "
            "--pool-placement host with a larger --pool-dir, or fewer units per run"
        )
    log = logger.info if choice.fits else logger.warning
    log("pool of %d units: %s [%s]", size.n_rows, choice.describe(), choice.reason)
    dtype = POOL_DTYPES[dtype_name]
    pool: RowPool
    if choice.placement == "resident":
        pool = ModelPool.from_checkpoints(
            checkpoints, dtype=dtype, device=device, show_progress=show_progress, seed=seed
        )
    elif choice.placement == "host":
        pool = HostPool.from_checkpoints(
            checkpoints,
            dtype=dtype,
            device=device,
            host_dir=request.host_dir,
            keys=keys,
            seed=seed,
        )
    else:
        pool = ShardedPool.from_checkpoints(
            checkpoints,
            group,
            dtype=dtype,
            device=device,
            show_progress=show_progress,
            seed=seed,
        )
    return pool, choice


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class PoolPlanning:
    """What a plan needs to say where a pool would go: the request, the evaluation
    device, the ranks, and the evaluation batch (for the activation reserve)."""

    request: PoolRequest = PoolRequest()
    device: str | torch.device = "cpu"
    world_size: int = 1
    batch_tokens: int = 16384


def _plan_inputs(
    layout_checkpoint: str, n_rows: int, planning: PoolPlanning
) -> tuple[str, PoolSize, int, MemoryFigures]:
    """(rows' dtype, size, reserve per device, this machine) for a plan."""
    request = planning.request
    dtype_name = request.dtype_on(planning.device)
    size = pool_size(layout_checkpoint, n_rows, dtype_name)
    config = read_checkpoint_meta(layout_checkpoint)[0]
    reserve = eval_reserve_bytes(config, size.num_params, planning.batch_tokens)
    mem = measure_memory(planning.device, request.host_dir, world_size=planning.world_size)
    return dtype_name, size, reserve, mem


def plan_placement(layout_checkpoint: str, n_rows: int, planning: PoolPlanning) -> PlacementChoice:
    """The placement ``planning.request`` resolves to for ``n_rows`` models of this
    layout on ``planning.world_size`` ranks (for a sharded pool: the smallest G dividing
    the world that fits); ConfigError with the figures when nothing fits."""
    _, size, reserve, mem = _plan_inputs(layout_checkpoint, n_rows, planning)
    return choose_placement(planning.request.placement, size, mem, reserve)


def describe_pool(layout_checkpoint: str, n_rows: int, planning: PoolPlanning) -> list[str]:
    """Plan lines: the pool's size, the placement chosen on this machine and the memory
    it needs per device and per node (from one checkpoint's header; nothing loaded)."""
    request = planning.request
    _, size, reserve, mem = _plan_inputs(layout_checkpoint, n_rows, planning)
    fmt = size.row_format
    if size.delta:
        fmt += f" (bf16 differences from the fp32 seed, {gb(size.seed_bytes)} per copy)"
    lines = [
        f"  pool: {n_rows} unit models x {size.num_params:,} parameters in {fmt} = "
        f"{gb(size.total_bytes)} (reserve beside it per device: {gb(reserve)} for the live "
        "model and evaluation)"
    ]
    try:
        choice = choose_placement(request.placement, size, mem, reserve)
    except ConfigError as e:
        return [*lines, f"  pool placement {request.placement}: none fits: {e}"]
    lines.append(f"  pool placement {request.placement} -> {choice.describe()} [{choice.reason}]")
    if choice.placement == "sharded":
        lines.append(
            f"    sharded: groups of G={choice.shards} ranks merge in lockstep; world = "
            f"replicas x {choice.shards}"
        )
    if choice.placement == "host":
        lines.append(f"    host rows in {request.host_dir or default_host_dir()}")
    if size.delta and request.dtype != "bf16-delta":
        lines.append("    bf16-delta once the seed is found, else plain bf16 rows")
    return lines
