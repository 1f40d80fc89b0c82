"""Staged directories: a checkpoint appears complete under its name, or not at all.

Everything is written into a temporary directory beside the target, fsynced, then
renamed into place, so a crash at any moment leaves the old directory or the new
one, never a mixture of both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from megablocks_ablate.utils.atomic import fsync_dir


def fsync_path(path: str) -> None:
    """fsync a file (or a directory, where the filesystem allows it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def write_json(path: str, obj: Any) -> None:
    """Indented JSON with a trailing newline (the staged directory is fsynced later)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


@contextlib.contextmanager
def staged_checkpoint_dir(directory: str) -> Iterator[str]:
    """Yield a temporary directory beside ``directory``; on success it is fsynced and
    renamed into place (an existing checkpoint is replaced only once the new one is
    complete). On error the temporary directory is removed."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(
        prefix="." + os.path.basename(directory) + ".", suffix=".tmp", dir=parent
    )
    try:
        yield tmp
        for name in os.listdir(tmp):
            fsync_path(os.path.join(tmp, name))
        fsync_path(tmp)
        old = None
        if os.path.lexists(directory):
            # Move the old checkpoint aside first: a crash now leaves the old one
            # under `old` and the new one complete under `tmp`, never a mixture.
            old = tempfile.mkdtemp(
                prefix="." + os.path.basename(directory) + ".", suffix=".old", dir=parent
            )
            os.rmdir(old)
            os.replace(directory, old)
        os.replace(tmp, directory)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
