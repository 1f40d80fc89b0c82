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
row under the real name; a row left behind by a killed run has the right content for
its name and is reused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import mmap
import os
import tempfile
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from megablocks_ablate.errors import ConfigError, DataFormatError
from megablocks_ablate.merge.file_merge import DTYPE_LABELS
from megablocks_ablate.merge.kernels import DTYPE_CODES, merge_into
from megablocks_ablate.merge.pool import OpenedUnits, RowPool, Slot, open_units
from megablocks_ablate.merge.pool_delta import Seed
from megablocks_ablate.utils.hashing import sha256_json

logger = logging.getLogger(__name__)

# Device staging for host rows: two buffers of k x chunk elements, 512 MiB in all.
STAGING_BYTES = 512 << 20
ROW_PREFIX = "mba-pool-"
_CUDA_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the rows are PROT_READ


def default_host_dir() -> str:
    """``/dev/shm`` (node-wide shared memory) where it exists and is writable, else the
    temp dir."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    return tempfile.gettempdir()


def row_key(checkpoint: str) -> str:
    """A stand-in content key for a checkpoint when no hash is given: its weights file's
    real path, size and modification time."""
    path = os.path.realpath(os.path.join(checkpoint, "model.safetensors"))
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def row_file_name(
    key: str, slots: list[Slot], dtype: torch.dtype, seed_hash: str | None = None
) -> str:
    """The row file of a unit: content key + row layout (tensor names, shapes, order) +
    dtype, and for a delta row (``seed_hash``: the seed it is the difference from) the
    format and that seed, so two pools share a row exactly when its bytes would be
    identical."""
    layout = [[s.name, list(s.shape)] for s in slots]
    what: dict = {"key": key, "layout": layout, "dtype": str(dtype)}
    if seed_hash is not None:  # plain rows keep the names they always had
        what.update(format="delta", seed=seed_hash)
    digest = sha256_json(what)
    return f"{ROW_PREFIX}{digest[:32]}.row"


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed). A lock file unlinked by
    its last user while we waited is not the lock any more: retry on the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield
                return
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RowFile:
    """One unit's row, mapped read-only from its node-wide file (see the module
    docstring); :meth:`close` unmaps it and removes the file if no one else uses it."""

    def __init__(self, path: str, numel: int, dtype: torch.dtype, fd: int, created: bool):
        self.path, self.numel, self.dtype, self.created = path, numel, dtype, created
        self._fd = fd
        st = os.fstat(fd)
        self.inode = (st.st_dev, st.st_ino)
        self._mm = mmap.mmap(fd, numel * dtype.itemsize, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        with warnings.catch_warnings():  # read-only by design: any write would be a bug
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            self.tensor: torch.Tensor | None = torch.frombuffer(self._mm, dtype=dtype)
        self._pinned: int | None = None

    @classmethod
    def attach(cls, path: str, numel: int, dtype: torch.dtype, fill) -> RowFile:
        """Map the row file at ``path``, creating it with ``fill(row_tensor)`` if it does
        not exist yet; the shared ``flock`` taken here marks this process as a user."""
        nbytes = numel * dtype.itemsize
        with _locked(path + ".lock"):
            created = False
            if os.path.exists(path) and os.path.getsize(path) != nbytes:
                raise DataFormatError(
                    f"{path}: pool row file of {os.path.getsize(path)} bytes, expected "
                    f"{nbytes}; remove it (no study run may be using it)"
                )
            if not os.path.exists(path):
                _write_row(path, numel, dtype, fill)
                created = True
            fd = os.open(path, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)
        return cls(path, numel, dtype, fd, created)

    def pin(self) -> bool:
        """Page-lock the mapping for asynchronous host-to-device copies (CUDA)."""
        if self._pinned is not None or self.tensor is None:
            return self._pinned is not None
        ptr, size = self.tensor.data_ptr(), self.numel * self.dtype.itemsize
        try:
            rc = torch.cuda.cudart().cudaHostRegister(ptr, size, _CUDA_HOST_REGISTER_READ_ONLY)
        except (RuntimeError, AttributeError):  # no CUDA runtime binding: stay pageable
            return False
        if int(rc) != 0:
            return False
        self._pinned = ptr
        return True

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._pinned is not None:
            torch.cuda.cudart().cudaHostUnregister(self._pinned)
            self._pinned = None
        self.tensor = None
        # a view of the row still alive keeps the mapping; it goes with that view
        with contextlib.suppress(BufferError):
            self._mm.close()
        with _locked(self.path + ".lock"):
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                last = False
            if last:  # no one else holds it, and no one can start to (we hold the lock)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + ".lock")
            os.close(self._fd)
        self._fd = -1


def _write_row(path: str, numel: int, dtype: torch.dtype, fill) -> None:
    """Fill a temporary file beside ``path`` and rename it into place (under the lock)."""
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):  # left by a killed loader
        pid = stale.rsplit(".", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            os.unlink(stale)
    nbytes = numel * dtype.itemsize
    directory = os.path.dirname(path) or "."
    vfs = os.statvfs(directory)
    if vfs.f_bavail * vfs.f_frsize < nbytes:
        raise ConfigError(
            f"{directory}: {vfs.f_bavail * vfs.f_frsize:,} bytes free, a pool row needs "
            f"{nbytes:,}; enlarge it (a container's /dev/shm: --shm-size) or set the pool's "
            "host directory elsewhere (--pool-dir)"
        )
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        row = torch.from_file(tmp, shared=True, size=numel, dtype=dtype)
        fill(row)
        del row
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


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
        (default :func:`default_host_dir`); ``keys`` names each unit's content (its
        checkpoint hash), else :func:`row_key` stands in. ``seed`` (verified, see
        :mod:`.pool_delta`): the rows are ``unit - seed``, the fp32 seed one more file."""
        if dtype not in DTYPE_CODES:
            raise ConfigError(f"pool dtype must be fp32, bf16 or fp16, got {dtype}")
        opened = open_units(checkpoints, allow_different_seed, seed)
        directory = host_dir or default_host_dir()
        os.makedirs(directory, exist_ok=True)
        files: list[RowFile] = []
        base_file: RowFile | None = None
        try:
            base = None
            if seed is not None:
                name = row_file_name(seed.sha256, opened.slots, torch.float32)
                base_file = RowFile.attach(
                    os.path.join(directory, name),
                    opened.num_params,
                    torch.float32,
                    opened.fill_seed,
                )
                base = base_file.tensor
            delta_of = seed.sha256 if seed is not None else None
            for i, unit in enumerate(opened.units):
                key = (keys or {}).get(unit) or row_key(checkpoints[unit])
                path = os.path.join(directory, row_file_name(key, opened.slots, dtype, delta_of))
                files.append(
                    RowFile.attach(
                        path,
                        opened.num_params,
                        dtype,
                        lambda row, i=i: opened.fill_row(i, row, base=base),
                    )
                )
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
        half = st.buf.numel() // 2 // sizes[0] * sizes[0]
        chunk = max(1, half // sum(sizes))
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


def host_dir_usage(directory: str) -> dict[str, int]:
    """Row files in ``directory`` and their bytes (for tests and diagnostics)."""
    rows = glob.glob(os.path.join(glob.escape(directory), ROW_PREFIX + "*.row"))
    return {"files": len(rows), "bytes": sum(os.path.getsize(p) for p in rows)}
