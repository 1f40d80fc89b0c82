"""HostPool: the pool's rows in host memory, one copy per node shared by its ranks.

For pools too large for one device but not for one node's RAM. Each unit's row is a
file in a node-wide directory (``/dev/shm`` by default: shared memory), named by the
unit's content (checkpoint hash), the row layout and the dtype::

    /dev/shm/mba-pool-<digest>.row      one per unit, N x P x itemsize bytes in all
        ▲ filled once (by the first rank to need it, under a lock)
        │ mapped read-only (MAP_SHARED) by every rank of the node: the same pages
        │
    rank 0 ──copy the k member rows' chunk──▶ device staging [2, k, chunk] ──merge──▶ live
    rank 1 ──  (pinned host memory, async on a copy stream, double-buffered)  ──▶ live

Only a mixture's members travel to the device (rows with weight 0 are not read), a
chunk at a time, so the device holds the live model plus a fixed staging buffer. On
CPU the rows are merged straight from the mapping into the live model.

Delta rows (``bf16-delta``, :mod:`.pool_delta`): each row file holds ``unit - seed`` and
its name also covers the format and the seed's hash, so a plain row is never mapped as
a delta row (nor a delta row of another seed); the fp32 seed is one more node-wide file
(named like a plain fp32 row of the seed checkpoint, which is what it is), staged to
the device with the members and folded in first.

Sharing without collectives: ranks need not agree on which units they use (the runner
shards mixtures, so each rank opens the units of its own mixtures), so a row file is
created by whichever process needs it first and found by name by the others. All
creation and removal happens under a per-row lock file (``flock``); each user holds a
shared ``flock`` on the row file while it has it mapped, and the last user to let go
(its exclusive ``flock`` succeeds) unlinks it. Rows are written to a temporary name and
renamed into place only once complete and finite, so a killed loader leaves no half
row under the real name.

Trust (:mod:`.pool_rows`): each row file's header records the sha256 of the checkpoint
it was filled from (verified against the recorded hash the caller gives, or hashed),
the seed of a delta row, the layout and dtype; a row is reused only while a live run
holds it and its header is the identity needed, else it is built again. Rows a killed
run left (no live holder) are removed when the next pool starts.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from megablocks_ablate.checkpoint.model_dir import MODEL_FILE
from megablocks_ablate.errors import ConfigError, DataFormatError
from megablocks_ablate.merge.file_merge import DTYPE_LABELS
from megablocks_ablate.merge.kernels import DTYPE_CODES, merge_into
from megablocks_ablate.merge.pool import OpenedUnits, RowPool, Slot, open_units
from megablocks_ablate.merge.pool_delta import Seed
from megablocks_ablate.merge.pool_rows import (
    ROW_PREFIX,
    RowFile,
    default_host_dir,
    host_dir_usage,
    identity_file_name,
    row_identity,
    sweep_unheld_rows,
)
from megablocks_ablate.utils.verify import file_identity, file_sha256, verify_sha256

__all__ = [
    "ROW_PREFIX",
    "STAGING_BYTES",
    "HostPool",
    "RowFile",
    "default_host_dir",
    "host_dir_usage",
    "row_file_name",
    "row_key",
]

logger = logging.getLogger(__name__)

# Device staging for host rows: two buffers of k x chunk elements, 512 MiB in all.
STAGING_BYTES = 512 << 20


def row_key(checkpoint: str) -> str:
    """A checkpoint's content key when none is given: the sha256 of its weights file
    (cached while its identity holds; :mod:`megablocks_ablate.utils.verify`)."""
    return file_sha256(os.path.join(checkpoint, MODEL_FILE))


def _layout(slots: list[Slot]) -> list:
    return [[s.name, list(s.shape)] for s in slots]


def row_file_name(
    key: str, slots: list[Slot], dtype: torch.dtype, seed_hash: str | None = None
) -> str:
    """The row file of a unit: content key (its checkpoint's sha256) + row layout (tensor
    names, shapes, order) + dtype, and for a delta row (``seed_hash``: the seed it is the
    difference from) that seed, so two pools share a row exactly when its bytes would be
    identical. The file's header records the same (:func:`.pool_rows.row_identity`)."""
    numel = sum(s.numel for s in slots)
    return identity_file_name(row_identity(key, _layout(slots), dtype, numel, seed_hash))


_SEED = "\0seed"  # the seed's entry among the sources (no unit can have this name)


def _fill_row(opened: OpenedUnits, i: int, base: torch.Tensor | None):
    return lambda row: opened.fill_row(i, row, base=base)


@dataclass
class _RowMaker:
    """Attaches row files in ``directory`` for the units of ``opened``, each named and
    headed by its identity (:func:`.pool_rows.row_identity`); a source whose identity
    is not ``before``'s once its row is filled is refused."""

    directory: str
    opened: OpenedUnits
    sources: dict[str, str]
    before: dict[str, list[int]]

    def attach(
        self,
        unit: str,
        sha256: str,
        seed_sha256: str | None,
        dtype: torch.dtype,
        fill: Callable[[torch.Tensor], None],
    ) -> RowFile:
        slots, numel = self.opened.slots, self.opened.num_params
        identity = row_identity(sha256, _layout(slots), dtype, numel, seed_sha256)
        source = self.sources[unit]

        def checked_fill(row: torch.Tensor) -> None:
            fill(row)
            if file_identity(source) != self.before.get(unit):
                raise DataFormatError(
                    f"{source}: changed while the pool read it (its row would not hold "
                    "the bytes that were checked); run again"
                )

        path = os.path.join(self.directory, identity_file_name(identity))
        return RowFile.attach(path, numel, dtype, checked_fill, identity)


@dataclass
class _Staging:
    buf: torch.Tensor  # 1-D bytes on the device: two buffers, each the members' chunks
    stream: torch.cuda.Stream | None  # the copy stream (CUDA) or None


class HostPool(RowPool):
    """Rows in node-wide shared host memory; see the module docstring."""

    def __init__(
        self,
        opened: OpenedUnits,
        files: list[RowFile],
        device: torch.device,
        staging_bytes: int = STAGING_BYTES,
        staged: bool | None = None,
        base_file: RowFile | None = None,
    ):
        super().__init__(
            opened.units, opened.slots, opened.configs[0], opened.lineages, opened.seed
        )
        if (opened.seed is None) != (base_file is None):
            raise ValueError("delta rows need both the seed and its fp32 row file")
        self.files = files
        self.base_file = base_file  # delta rows: the fp32 seed, shared like the rows
        self.device = device
        self.dtype = files[0].dtype
        # CUDA: rows travel through device staging; CPU: merged from the mapping (a test
        # may force the staged path on CPU to check its chunking)
        self.staged = device.type != "cpu" if staged is None else staged
        self.staging_bytes = int(staging_bytes)
        self._staging: _Staging | None = None
        # the last user on the node removes the files, also when the pool is simply
        # dropped or the process exits without close() (a killed one leaves them)
        every = [*files, *([base_file] if base_file is not None else [])]
        self._finalizer = weakref.finalize(self, _close_all, every)
        self.pinned = device.type == "cuda" and all(f.pin() for f in every)
        if device.type == "cuda" and not self.pinned:
            logger.warning(
                "pool rows in host memory could not be page-locked: host-to-device copies "
                "go through pageable memory (slower, synchronous)"
            )

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Mapping[str, str],
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        host_dir: str | None = None,
        keys: Mapping[str, str | None] | None = None,
        allow_different_seed: bool = False,
        staging_bytes: int = STAGING_BYTES,
        staged: bool | None = None,
        seed: Seed | None = None,
    ) -> HostPool:
        """Map (creating where missing) one node-wide row file per unit in ``host_dir``
        (default :func:`default_host_dir`). ``keys``: each unit's recorded checkpoint
        hash, checked against its weights (cached, :mod:`megablocks_ablate.utils.verify`;
        a mismatch is a DataFormatError); a unit without one is hashed. ``seed``
        (verified, see :mod:`.pool_delta`): the rows are ``unit - seed``, the fp32 seed
        one more file. Rows no live run holds are removed first (see :mod:`.pool_rows`)."""
        if dtype not in DTYPE_CODES:
            raise ConfigError(f"pool dtype must be fp32, bf16 or fp16, got {dtype}")
        sources = {u: os.path.join(d, MODEL_FILE) for u, d in checkpoints.items()}
        if seed is not None:
            sources[_SEED] = seed.path
        # identities before anything is read: a file replaced or edited from here until
        # its row is filled is refused (the row would not be the bytes that were hashed)
        before = {u: file_identity(p) for u, p in sources.items() if os.path.isfile(p)}
        opened = open_units(checkpoints, allow_different_seed, seed)
        directory = host_dir or default_host_dir()
        os.makedirs(directory, exist_ok=True)
        sweep_unheld_rows(directory)
        files: list[RowFile] = []
        base_file: RowFile | None = None
        try:
            hashes = {
                u: verify_sha256(
                    sources[u],
                    (keys or {}).get(u),
                    f"the pool's unit model {u!r}",
                    "the checkpoint changed since its hash was taken; run again",
                )
                for u in opened.units
            }
            rows = _RowMaker(directory, opened, sources, before)
            base = None
            if seed is not None:
                base_file = rows.attach(_SEED, seed.sha256, None, torch.float32, opened.fill_seed)
                base = base_file.tensor
            delta_of = seed.sha256 if seed is not None else None
            for i, unit in enumerate(opened.units):
                fill = _fill_row(opened, i, base)
                files.append(rows.attach(unit, hashes[unit], delta_of, dtype, fill))
        except BaseException:
            for f in [*files, *([base_file] if base_file is not None else [])]:
                f.close()
            raise
        finally:
            opened.close()  # every row is in its file now
        made = sum(f.created for f in files)
        logger.info(
            "pool rows in host memory %s: %d of %d units loaded here, %d mapped from other "
            "ranks (%s%s, %.2f GB)",
            directory,
            made,
            len(files),
            len(files) - made,
            DTYPE_LABELS.get(dtype, str(dtype)),
            " deltas from the fp32 seed" if seed is not None else "",
            (len(files) * dtype.itemsize + (4 if seed is not None else 0))
            * opened.num_params
            / 1e9,
        )
        return cls(opened, files, torch.device(device), staging_bytes, staged, base_file)

    @property
    def row_dtype(self) -> torch.dtype:
        return self.dtype

    def _row(self, i: int) -> torch.Tensor | None:
        return self.files[i].tensor

    def close(self) -> None:
        self._finalizer()
        self._staging = None

    def _merge_rows(self, flat: torch.Tensor, ws: list[float]) -> None:
        members = [(self.files[i].tensor, w) for i, w in enumerate(ws) if w]
        if self.base_file is not None:  # delta rows: the seed first, weighted by sum(ws)
            s = self._seed_weight(ws)
            if s:
                members.insert(0, (self.base_file.tensor, s))
        xs = [x for x, _ in members if x is not None]
        if len(xs) != len(members):
            raise RuntimeError("HostPool: merge after close()")
        weights = [w for _, w in members]
        if not self.staged:
            merge_into(flat, xs, weights)
        else:
            self._merge_staged(flat, xs, weights)

    def _staging_for(self, device: torch.device) -> _Staging:
        if self._staging is None or self._staging.buf.device != device:
            # two buffers of a chunk of every member; never more than two copies of all
            whole = self.num_params * (
                len(self.files) * self.dtype.itemsize + (4 if self.base_file is not None else 0)
            )
            n = max(16, min(self.staging_bytes, 2 * whole))
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            self._staging = _Staging(torch.empty(n, dtype=torch.uint8, device=device), stream)
        return self._staging

    def _merge_staged(self, flat: torch.Tensor, xs: list[torch.Tensor], ws: list[float]) -> None:
        """Copy the members' rows to the device a chunk at a time (two staging buffers:
        chunk j+1 is copied on the copy stream while chunk j is merged) and merge each
        chunk with all k members at once, so every output element is the same single
        kernel fold as a resident merge: bitwise equal results. A buffer holds one
        chunk of each member in its own dtype (the fp32 seed of delta rows first)."""
        st = self._staging_for(flat.device)
        k, total = len(xs), flat.numel()
        sizes = [x.element_size() for x in xs]
        if sizes != sorted(sizes, reverse=True):  # wider first keeps every view aligned
            raise ValueError("staged merge: members must come widest dtype first")
        # A chunk of a multiple of 8 elements in buffers of a multiple of 16 bytes keeps
        # every member's view and every output slice 16-byte aligned: the merge kernels'
        # vector loads (MBA_MERGE_VEC) apply to staged merges too.
        half = st.buf.numel() // 2 // 16 * 16
        chunk = half // sum(sizes)
        chunk = max(1, chunk // 8 * 8 if chunk >= 8 else chunk)
        bufs = [_carve(st.buf[b * half : (b + 1) * half], xs, chunk) for b in (0, 1)]
        copy = st.stream
        free: list[torch.cuda.Event | None] = [None, None]  # compute finished with buffer b
        compute = torch.cuda.current_stream(flat.device) if copy is not None else None
        if copy is not None and compute is not None:
            copy.wait_stream(compute)  # the staging buffer's last readers
        for j, start in enumerate(range(0, total, chunk)):
            n, b = min(chunk, total - start), j % 2
            dst = bufs[b]
            if copy is not None and compute is not None:
                with torch.cuda.stream(copy):
                    done_with = free[b]
                    if done_with is not None:
                        copy.wait_event(done_with)
                    for m, x in enumerate(xs):
                        dst[m][:n].copy_(x[start : start + n], non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record(copy)
                compute.wait_event(ready)
            else:
                for m, x in enumerate(xs):
                    dst[m][:n].copy_(x[start : start + n])
            merge_into(flat[start : start + n], [dst[m][:n] for m in range(k)], ws)
            if compute is not None:
                done = torch.cuda.Event()
                done.record(compute)
                free[b] = done


def _carve(buf: torch.Tensor, xs: list[torch.Tensor], chunk: int) -> list[torch.Tensor]:
    """One staging buffer (bytes) as a chunk of each member, in the member's dtype."""
    out, at = [], 0
    for x in xs:
        nbytes = chunk * x.element_size()
        out.append(buf[at : at + nbytes].view(x.dtype))
        at += nbytes
    return out


def _close_all(files: list[RowFile]) -> None:
    for f in files:
        f.close()
