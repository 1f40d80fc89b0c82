"""Crash-safe file output: write to a temp name beside the target, fsync, rename.

A reader (or a resumed run) therefore sees either the old file or the complete new
one, never a half-written file, even after Ctrl-C or SIGKILL. When the write fails
(disk full, read-only directory, a name too long), the temp file is removed and the
:class:`OSError` propagates naming the target (its ``filename``), which the CLI shows as
one ``error: <path>: <reason>`` line (docs/reliability.md "OS errors in one line").
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from typing import IO


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename inside it is durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_tag() -> str:
    # <host>-<pid>: lets utils.outputs.sweep_stale_temporaries tell a dead writer's
    # leftovers from a live writer's work in progress (same format as outputs.tmp_tag)
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_tmp_of(name: object, path: str) -> bool:
    """Whether ``name`` is one of :func:`tmp_path_for`'s temporary names for ``path``."""
    if not isinstance(name, str):
        return False
    base = os.path.basename(name)
    return base.startswith(f".{os.path.basename(path)}.") and base.endswith(".tmp")


def name_target(e: OSError, path: str | os.PathLike) -> OSError:
    """``e`` naming the target ``path`` when it names no file or only our temp file (a
    write's ENOSPC has no ``filename``; a failed rename names the temp file first)."""
    path = os.fspath(path)
    if e.filename is None or _is_tmp_of(e.filename, path):
        e.filename = path
        if e.filename2 is None or os.fspath(e.filename2) == path or _is_tmp_of(e.filename2, path):
            e.filename2 = None
    return e


def tmp_path_for(path: str | os.PathLike) -> str:
    """A unique temporary name in the target's directory (same filesystem)."""
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.{_tmp_tag()}.", suffix=".tmp", dir=d
        )
    except OSError as e:
        name_target(e, path)
        raise
    try:
        # mkstemp makes 0600 files; outputs get the usual umask-based mode (shared clusters)
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        name_target(e, path)
        raise
    finally:
        os.close(fd)
    return tmp


def commit_tmp(tmp: str, path: str | os.PathLike) -> None:
    """fsync ``tmp`` and atomically rename it to ``path``; on failure ``tmp`` is removed
    and the OSError names ``path``."""
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        name_target(e, path)
        raise
    fsync_dir(os.path.dirname(os.fspath(path)) or ".")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """``with atomic_open(p, "w") as f: ...`` -- the file appears at ``p`` only on success."""
    if "r" in mode or "a" in mode:
        raise ValueError("atomic_open is for writing new files")
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.fspath(path)) or ".")
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            name_target(e, path)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
