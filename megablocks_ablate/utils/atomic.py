"""Crash-safe file output: write to a temp name beside the target, fsync, rename.

A reader (or a resumed run) therefore sees either the old file or the complete new
one, never a half-written file, even after Ctrl-C or SIGKILL.
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


def tmp_path_for(path: str | os.PathLike) -> str:
    """A unique temporary name in the target's directory (same filesystem)."""
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.{_tmp_tag()}.", suffix=".tmp", dir=d
    )
    # mkstemp makes 0600 files; outputs get the usual umask-based mode (shared clusters)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return tmp


def commit_tmp(tmp: str, path: str | os.PathLike) -> None:
    """fsync ``tmp`` and atomically rename it to ``path``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
