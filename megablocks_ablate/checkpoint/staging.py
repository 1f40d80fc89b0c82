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

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.atomic import fsync_dir
from megablocks_ablate.utils.outputs import MARKER, own_files, sweep_stale_temporaries, tmp_tag


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
    put in place; on error it is removed.

    Replacing an existing directory never deletes what this package did not write: when
    it holds only the files being written (and files its marker lists as ours), the new
    directory is swapped in whole; when it holds anything else, each new file replaces
    its old copy one by one and every other file stays. Stale temporaries of earlier
    interrupted writes of the same target are removed after a success.
    """
    directory = os.path.abspath(directory)
    parent, base = os.path.dirname(directory), os.path.basename(directory)
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"{directory}: exists and is not a directory; nothing was written")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.{tmp_tag()}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        new = set(os.listdir(tmp))
        for name in new:
            fsync_path(os.path.join(tmp, name))
        fsync_path(tmp)
        if not os.path.lexists(directory):
            os.replace(tmp, directory)
        elif set(os.listdir(directory)) <= new | (own_files(directory) or set()) | {MARKER}:
            _swap(tmp, directory)
        else:
            _replace_files(tmp, directory, new)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sweep_stale_temporaries(parent, base)


def _swap(tmp: str, directory: str) -> None:
    """Put ``tmp`` in place of ``directory``, whose entries are all ours. The old one is
    moved aside first: a crash now leaves the old one under ``old`` and the new one
    complete under ``tmp``, never a mixture."""
    parent, base = os.path.dirname(directory), os.path.basename(directory)
    old = tempfile.mkdtemp(prefix=f".{base}.{tmp_tag()}.", suffix=".old", dir=parent)
    os.rmdir(old)
    os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _replace_files(tmp: str, directory: str, new: set[str]) -> None:
    """Move each new entry over its old copy, drop our old entries that the new output
    does not have, keep everything else (a user's files in the same directory)."""
    ours = own_files(directory) or set()
    clashes = [
        n
        for n in sorted(new)
        if os.path.isdir(os.path.join(directory, n))
        and not os.path.islink(os.path.join(directory, n))
        and n not in ours
    ]
    if clashes:  # checked before anything moves: a directory we cannot prove is ours stays
        raise ConfigError(
            f"{directory}: holds a directory {clashes[0]!r} where this output "
            "writes a file of that name; nothing was replaced"
        )
    for name in sorted(new):
        target = os.path.join(directory, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)  # a sub-directory our previous output listed as its own
        os.replace(os.path.join(tmp, name), target)
    for name in ours - new - {MARKER}:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    fsync_path(directory)
    shutil.rmtree(tmp, ignore_errors=True)
