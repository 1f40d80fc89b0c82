"""Output files: the single-file counterpart of :func:`~megablocks_ablate.utils.outputs.claim_output_dir`.

Every file a command writes (``eval --out`` results, the ``.bin``/``.idx`` of ``index
concat --out``, the ``.model``/``.vocab`` of ``tokenizer train --out``) is claimed
first with :func:`claim_output_file`:

* a new path is ours;
* an existing file is replaced only when it is recognisably an output of the same kind
  AND the command was asked to (``--overwrite``); anything else there (a user's file,
  a model's ``model.safetensors``, a results store, another kind of output, a
  directory, a symbolic link) is refused, naming it, and nothing is touched;
* a path equal to one of the command's inputs, or inside one, is refused.

A file is recognisably ours of kind K when

* it is a JSON object whose ``format`` is ``megablocks-ablate/K@N`` (``eval`` results
  carry ``megablocks-ablate/eval@1``), or
* a sidecar ``.<name>.megablocks-ablate.json`` beside it records kind K and the file's
  stamp (size, mtime in ns, inode) as written. A rename keeps the stamp, so
  :func:`staged_output_files` records it before renaming the complete file into place;
  a file edited, replaced or copied since has another stamp and is no longer ours (it
  is then refused like a user's file: remove it yourself to write there).

One writer at a time: :func:`output_lock` holds ``.<name>.megablocks-ablate.lock``
beside an output (a :mod:`megablocks_ablate.utils.locks` lock, taken over when its
holder died) while a command checks and writes it, so two concurrent writers to one
output never both succeed: the second is refused at once naming the first
(``timeout_s=0``), or waits and then meets the first one's output like any existing
file (``timeout_s=None``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils import locks
from megablocks_ablate.utils.atomic import atomic_write_json, fsync_dir
from megablocks_ablate.utils.outputs import (
    MARKER_FORMAT,
    check_not_an_input,
    sweep_stale_temporaries,
    tmp_tag,
)

SIDECAR_SUFFIX = ".megablocks-ablate.json"
LOCK_SUFFIX = ".megablocks-ablate.lock"
FORMAT_PREFIX = "megablocks-ablate/"
# JSON outputs bigger than this are not parsed to find their format (not ours, then).
MAX_EMBEDDED_BYTES = 256 << 20


def sidecar_path(path: str) -> str:
    """``.<name>.megablocks-ablate.json`` beside ``path``: the record that it is ours."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}{SIDECAR_SUFFIX}")


def lock_path(path: str) -> str:
    """``.<name>.megablocks-ablate.lock`` beside ``path`` (symlinks in its parents
    resolved, so two spellings of one output share one lock)."""
    parent, name = os.path.split(os.path.realpath(path))
    return os.path.join(parent, f".{name}{LOCK_SUFFIX}")


def _stamp(path: str) -> list[int]:
    st = os.stat(path, follow_symlinks=False)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_sidecar(path: str) -> dict | None:
    try:
        with open(sidecar_path(path), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def _embedded_kind(path: str) -> str | None:
    """K of a JSON object file whose ``format`` is ``megablocks-ablate/K@N``."""
    try:
        if os.path.getsize(path) > MAX_EMBEDDED_BYTES:
            return None
        with open(path, "rb") as f:
            if f.read(64).lstrip()[:1] != b"{":
                return None
            f.seek(0)
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    fmt = data.get("format") if isinstance(data, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX) or "@" not in fmt:
        return None
    return fmt[len(FORMAT_PREFIX) :].split("@", 1)[0] or None


def file_kind(path: str) -> str | None:
    """The kind of our output the regular file ``path`` is (None: not recognisably ours)."""
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    record = _read_sidecar(path)
    if record is not None and isinstance(record.get("kind"), str):
        stamps = record.get("stamps")
        if isinstance(stamps, list) and _stamp(path) in stamps:
            return str(record["kind"])
    return _embedded_kind(path)


def _check_parent(path: str, flag: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a directory")


def _check_existing(path: str, kind: str, overwrite: bool, flag: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        raise ConfigError(
            f"{flag} {path}: is a directory; give the path of a file to write (nothing was changed)"
        )
    if os.path.islink(path):
        raise ConfigError(
            f"{flag} {path}: is a symbolic link; nothing was changed: give the path of a "
            "new file, or of a previous output itself"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: exists and is not a regular file; nothing was changed")
    found = file_kind(path)
    if found != kind:
        what = (
            f"a megablocks-ablate {found} file"
            if found
            else "a file megablocks-ablate did not write"
        )
        raise ConfigError(
            f"{flag} {path}: exists and is {what}; nothing was changed: choose a new path "
            f"for this {kind} output (or move the file away)"
        )
    if not overwrite:
        raise ConfigError(
            f"{flag} {path}: holds a previous {kind} output; pass --overwrite to replace it "
            "(nothing was changed)"
        )


def check_output_file(
    path: str,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | None] = (),
    flag: str = "--out",
) -> bool:
    """The checks of :func:`claim_output_file`, touching nothing: refuse (ConfigError)
    a path that is an input or inside one, a directory, a link, a file that is not a
    ``kind`` output of ours, a previous output without ``overwrite``, or a path under a
    file. Returns True when ``path`` already holds a ``kind`` output."""
    check_not_an_input(path, inputs, flag)
    _check_parent(path, flag)
    side = sidecar_path(path)
    if os.path.lexists(side) and (os.path.islink(side) or _read_sidecar(path) is None):
        raise ConfigError(
            f"{flag} {path}: {side} exists and is not a megablocks-ablate record; nothing "
            "was changed (it is not ours to replace: move it away or choose another path)"
        )
    if not os.path.lexists(path):
        return False
    _check_existing(path, kind, overwrite, flag)
    return True


def claim_output_file(
    path: str,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | None] = (),
    flag: str = "--out",
) -> bool:
    """Make ``path`` the output file of a ``kind`` output, or refuse (ConfigError; see
    the module docstring): checks, creates its parent directory and removes the stale
    temporaries of earlier interrupted writes of it. Returns True when it already held
    a ``kind`` output (which ``overwrite`` allows to replace)."""
    existing = check_output_file(path, kind, overwrite=overwrite, inputs=inputs, flag=flag)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create {parent} ({e.strerror})") from None
    sweep_stale_temporaries(parent, os.path.basename(path))
    return existing


def record_output_file(path: str, kind: str, stamps: Sequence[list[int]]) -> None:
    """Write the sidecar saying ``path`` is a ``kind`` output while it has one of
    ``stamps`` (size, mtime ns, inode)."""
    atomic_write_json(
        sidecar_path(path),
        {"format": MARKER_FORMAT, "kind": kind, "stamps": [list(s) for s in stamps]},
    )


@contextlib.contextmanager
def staged_output_files(
    paths: Sequence[str],
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | None] = (),
    flag: str = "--out",
) -> Iterator[list[str]]:
    """Yield temporary paths (same names, in one hidden directory beside ``paths``, all
    of which share a parent) for the caller to write; on success each output is checked
    again (another writer may have come and gone), recorded as a ``kind`` output and
    renamed into place; on error the temporaries are removed and nothing is touched."""
    parent = os.path.dirname(os.path.abspath(paths[0]))
    if any(os.path.dirname(os.path.abspath(p)) != parent for p in paths):
        raise ValueError(f"staged_output_files: {list(paths)} are not in one directory")
    inputs = list(inputs)
    for p in paths:
        claim_output_file(p, kind, overwrite=overwrite, inputs=inputs, flag=flag)
    base = os.path.basename(paths[0])
    work = tempfile.mkdtemp(prefix=f".{base}.{tmp_tag()}.", suffix=".tmp", dir=parent)
    try:
        tmps = [os.path.join(work, os.path.basename(p)) for p in paths]
        yield tmps
        for p, tmp in zip(paths, tmps):
            if not os.path.isfile(tmp):
                raise ConfigError(f"{flag} {p}: was not written; nothing was changed")
        for p in paths:  # the files there now, checked once more before any rename
            check_output_file(p, kind, overwrite=overwrite, inputs=inputs, flag=flag)
        for p, tmp in zip(paths, tmps):
            _commit(tmp, p, kind)
        fsync_dir(parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _commit(tmp: str, path: str, kind: str) -> None:
    """Record ``tmp``'s stamp (kept by the rename) and the stamp of the file it replaces
    (a kill between the two steps leaves that one still ours), then rename."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    stamps = [_stamp(tmp)]
    if os.path.isfile(path):
        stamps.append(_stamp(path))
    record_output_file(path, kind, stamps)
    os.replace(tmp, path)


@contextlib.contextmanager
def output_lock(path: str, what: str, timeout_s: float | None = 0.0) -> Iterator[None]:
    """Hold the lock of the output ``path`` (:func:`lock_path`) in the block: ``what``
    (e.g. ``merge --out runs/m``) is shown to a second writer, which is refused at once
    (``timeout_s=0``, a :class:`~megablocks_ablate.utils.locks.LockHeld` naming this
    process) or waits (``timeout_s=None``)."""
    with locks.acquire(lock_path(path), what, timeout_s=timeout_s, poll_s=0.2):
        yield
