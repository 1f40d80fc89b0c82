"""Node-wide pool row files (:mod:`.pool_host`): named by content, checked before use,
removed when no live run holds them.

A row file is an identity header followed by the row::

    /dev/shm/mba-pool-<digest>.row
        [ HEADER_BYTES: magic, then JSON: source sha256, seed sha256, layout, dtype, numel ]
        [ numel x itemsize bytes: the row, mapped read-only (MAP_SHARED) by every user ]
    /dev/shm/mba-pool-<digest>.row.lock     flock'ed while the row is created or removed

``<digest>`` covers the same identity, so rows are shared exactly when their bytes
would be identical. The source sha256 is the hash of the checkpoint's weights,
verified (:mod:`megablocks_ablate.utils.verify`) before the row is filled, and the
file's identity must not change while it is read.

Who holds a row: each user keeps a shared ``flock`` on it while it has it mapped (the
kernel drops it when the process dies, however it dies). So a row nobody holds was
left by a killed run, and it is never reused: :func:`sweep_unheld_rows` removes every
such row (and stale lock and temporary files) when a pool starts, and
:meth:`RowFile.attach` rebuilds one it finds unheld, or held but with a header that
is not the identity it needs (another source, seed, layout or dtype). A row is written
to a temporary name and renamed into place only once complete and finite, all under
its lock, so a half row never has the real name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import mmap
import os
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterator

import torch

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.hashing import sha256_json

logger = logging.getLogger(__name__)

ROW_PREFIX = "mba-pool-"
ROW_VERSION = 2  # rows with an identity header (version 1 rows had none)
MAGIC = b"MBAROW2\n"
# The header's room: the row starts here, so that it can be mapped on its own (a
# multiple of every page size: 64 KiB pages exist). Untouched, it costs one page.
HEADER_BYTES = 1 << 16
_CUDA_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the rows are PROT_READ


def default_host_dir() -> str:
    """``/dev/shm`` (node-wide shared memory) where it exists and is writable, else the
    temp dir."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    return tempfile.gettempdir()


def row_identity(
    source_sha256: str, layout: list, dtype: torch.dtype, numel: int, seed_sha256: str | None
) -> dict:
    """What a row file's header records and its name is derived from: the sha256 of
    the checkpoint it was filled from, and for a delta row of the seed it is the
    difference from, the row layout (tensor names and shapes), dtype and length."""
    return {
        "rows": ROW_VERSION,
        "source_sha256": source_sha256,
        "seed_sha256": seed_sha256,
        "layout": sha256_json(layout),
        "dtype": str(dtype),
        "numel": int(numel),
    }


def identity_file_name(identity: dict) -> str:
    return f"{ROW_PREFIX}{sha256_json(identity)[:32]}.row"


@contextlib.contextmanager
def _locked(path: str, wait: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created if needed); yields whether it is held
    (always, when ``wait``). A lock file unlinked by its last user while we waited is not
    the lock any more: retry on the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield True
                return
        finally:
            os.close(fd)


def _unheld(fd: int) -> bool:
    """No other open file holds a ``flock`` on ``fd``'s file (a probe; released with it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    return True


def _unlink(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def _read_identity(fd: int, nbytes: int) -> dict | str:
    """The identity in a row file's header, or why there is none."""
    size = os.fstat(fd).st_size
    if size != HEADER_BYTES + nbytes:
        return f"{size} bytes, a row of this layout has {HEADER_BYTES + nbytes}"
    head = os.pread(fd, HEADER_BYTES, 0)
    if not head.startswith(MAGIC):
        return "no row identity header"
    n = int.from_bytes(head[len(MAGIC) : len(MAGIC) + 4], "little")
    try:
        found = json.loads(head[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
    except (ValueError, UnicodeDecodeError):
        return "a corrupt row identity header"
    return found if isinstance(found, dict) else "a corrupt row identity header"


def _stale_reason(fd: int, nbytes: int, identity: dict) -> str:
    """Why the existing row file open as ``fd`` must not be used, or ""."""
    if _unheld(fd):
        return "no live run holds it (left by a run that was killed)"
    found = _read_identity(fd, nbytes)
    if isinstance(found, str):
        return found
    differs = [k for k in identity if found.get(k) != identity[k]]
    if differs:
        return "its header records another " + ", ".join(differs)
    return ""


class RowFile:
    """One unit's row, mapped read-only from its node-wide file (see the module
    docstring); :meth:`close` unmaps it and removes the file if no one else uses it."""

    def __init__(self, path: str, numel: int, dtype: torch.dtype, fd: int, created: bool):
        self.path, self.numel, self.dtype, self.created = path, numel, dtype, created
        self._fd = fd
        st = os.fstat(fd)
        self.inode = (st.st_dev, st.st_ino)
        self._mm = mmap.mmap(
            fd,
            numel * dtype.itemsize,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ,
            offset=HEADER_BYTES,
        )
        with warnings.catch_warnings():  # read-only by design: any write would be a bug
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            self.tensor: torch.Tensor | None = torch.frombuffer(self._mm, dtype=dtype)
        self._pinned: int | None = None

    @classmethod
    def attach(
        cls,
        path: str,
        numel: int,
        dtype: torch.dtype,
        fill: Callable[[torch.Tensor], None],
        identity: dict,
    ) -> RowFile:
        """Map the row file at ``path`` if a live run holds it and its header records
        ``identity``; else (re)create it with ``fill(row_tensor)`` (a stale file is
        unlinked first: its holders keep their own mapping). The shared ``flock`` taken
        here marks this process as a user."""
        nbytes = numel * dtype.itemsize
        with _locked(path + ".lock"):
            fd: int | None = None
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(path, os.O_RDONLY)
            if fd is not None:
                why = _stale_reason(fd, nbytes, identity)
                if why:
                    logger.warning("%s: pool row not reused, built again: %s", path, why)
                    os.close(fd)
                    _unlink(path)
                    fd = None
            created = fd is None
            if fd is None:
                try:
                    _write_row(path, numel, dtype, fill, identity)
                except BaseException:
                    _unlink(path + ".lock")  # no row: nothing for the lock to guard
                    raise
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
                ours = os.stat(self.path).st_ino == self.inode[1]
            except FileNotFoundError:  # removed as stale (rebuilt rows have it now)
                _unlink(self.path + ".lock")
                ours = False
            # the last user (no one else holds it, and no one can start to: we hold
            # the lock) removes it, unless the name now belongs to a rebuilt row
            if ours and _unheld(self._fd):
                _unlink(self.path, self.path + ".lock")
            os.close(self._fd)
        self._fd = -1


def _header(identity: dict) -> bytes:
    blob = json.dumps(
        {**identity, "writer": {"host": socket.gethostname(), "pid": os.getpid()}},
        sort_keys=True,
    ).encode()
    head = MAGIC + len(blob).to_bytes(4, "little") + blob
    if len(head) > HEADER_BYTES:
        raise ValueError(f"row identity header of {len(head)} bytes")
    return head


def _write_row(path: str, numel: int, dtype: torch.dtype, fill, identity: dict) -> None:
    """Fill a temporary file beside ``path`` and rename it into place (under the lock,
    so any other temporary of this row was left by a killed loader)."""
    _unlink(*glob.glob(glob.escape(path) + ".tmp.*"))
    nbytes = numel * dtype.itemsize
    directory = os.path.dirname(path) or "."
    vfs = os.statvfs(directory)
    if vfs.f_bavail * vfs.f_frsize < nbytes + HEADER_BYTES:
        raise ConfigError(
            f"{directory}: {vfs.f_bavail * vfs.f_frsize:,} bytes free, a pool row needs "
            f"{nbytes:,}; enlarge it (a container's /dev/shm: --shm-size) or set the pool's "
            "host directory elsewhere (--pool-dir)"
        )
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, HEADER_BYTES + nbytes)
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, offset=HEADER_BYTES)
        try:
            row = torch.frombuffer(mm, dtype=dtype)
            fill(row)
            del row
        finally:
            mm.close()
        os.pwrite(fd, _header(identity), 0)  # complete: now it says what it holds
        os.rename(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    finally:
        os.close(fd)


def _remove_if_unheld(row: str) -> int:
    """Remove ``row`` (and its lock and temporaries) when no one holds or builds it;
    returns the bytes freed."""
    with _locked(row + ".lock", wait=False) as held:
        if not held:  # being created or closed right now: a live run's
            return 0
        _unlink(*glob.glob(glob.escape(row) + ".tmp.*"))  # no loader is at work
        try:
            fd = os.open(row, os.O_RDONLY)
        except FileNotFoundError:
            _unlink(row + ".lock")
            return 0
        try:
            if not _unheld(fd):
                return 0
            size = os.fstat(fd).st_size
            _unlink(row, row + ".lock")
            return size
        finally:
            os.close(fd)


def sweep_unheld_rows(directory: str) -> int:
    """Remove every pool row file in ``directory`` that no live run holds (left by a
    killed run: no one may reuse it), with stale lock and temporary files; returns the
    number of rows removed."""
    pattern = os.path.join(glob.escape(directory), ROW_PREFIX + "*.row")
    rows = set(glob.glob(pattern))
    rows |= {p[: -len(".lock")] for p in glob.glob(pattern + ".lock")}
    rows |= {p.rsplit(".tmp.", 1)[0] for p in glob.glob(pattern + ".tmp.*")}
    removed, freed = 0, 0
    for row in sorted(rows):
        try:
            size = _remove_if_unheld(row)
        except PermissionError:  # another user's rows (a shared /dev/shm): theirs to sweep
            continue
        removed += size > 0
        freed += size
    if removed:
        logger.warning(
            "%s: removed %d pool row file(s) no live run holds (%.2f GB, left by a killed run)",
            directory,
            removed,
            freed / 1e9,
        )
    return removed


def host_dir_usage(directory: str) -> dict[str, int]:
    """Row files in ``directory`` and the bytes of their rows (each file also has a
    header of HEADER_BYTES, of which one page is used): for tests and diagnostics."""
    rows = glob.glob(os.path.join(glob.escape(directory), ROW_PREFIX + "*.row"))
    sizes = [os.path.getsize(p) for p in rows]
    return {"files": len(rows), "bytes": sum(max(0, s - HEADER_BYTES) for s in sizes)}
