"""Files checked against their recorded sha256 before a result depends on them, cheaply.

Hashing a 2 GB unit model on every study run would cost seconds per model, so a
successful check is remembered by the file's identity: absolute path, size, mtime,
ctime (both in ns) and inode. While those are unchanged the file is taken as verified.
Any write changes the ctime, which no user call can set back (``os.utime`` restores an
mtime, not a ctime), so an in-place edit that keeps size and mtime is hashed again
too; so is a copy or a rename over it (inode, ctime). File times tick coarsely (a
few ms), so a file changed less than :data:`RACY_NS` before it was hashed is not
remembered (as git treats "racily clean" files): an edit in the same tick as the
hashed write could otherwise keep every field of the identity. The cache is one JSON file, ``$MBA_CACHE_DIR/verified.json``
(default ``~/.cache/megablocks-ablate``); losing it (or a concurrent writer's update)
only means hashing again.

Modes (the ``--verify`` option of the commands that check inputs, or ``MBA_VERIFY``):

- ``cached`` (default): trust a cache entry whose identity matches;
- ``full``: hash every file in full, once per process, whatever the cache says (a
  cache that was tampered with, or a filesystem whose ctime is not to be trusted);
  ``MBA_VERIFY=always`` (or ``full``) is the same;
- ``MBA_VERIFY=never`` skips checks (benchmarks only, at your risk).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

from megablocks_ablate.errors import ConfigError, DataFormatError
from megablocks_ablate.utils.atomic import atomic_write_json
from megablocks_ablate.utils.hashing import sha256_file

CACHE_ENV = "MBA_CACHE_DIR"
VERIFY_ENV = "MBA_VERIFY"
VERIFY_MODES = ("cached", "full")
_FULL_VALUES = ("always", "full")
_LOCK = threading.Lock()
RACY_NS = 2_000_000_000  # a hash of a file changed this recently is not remembered
# full mode: what this process hashed itself, {path: (stamp, sha256)}, so a file is
# hashed in full once per run, not once per use
_HASHED_HERE: dict[str, tuple[list[int], str]] = {}
_SET_BY_OPTION = False  # VERIFY_ENV was set by set_verify_mode, not by the user


def cache_dir() -> str:
    """Where megablocks-ablate keeps per-user caches."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "megablocks-ablate")
    return os.environ.get(CACHE_ENV) or default


def _cache_path() -> str:
    return os.path.join(cache_dir(), "verified.json")


def set_verify_mode(mode: str) -> None:
    """Apply a command's ``--verify`` option (``cached`` | ``full``) to this process and
    the worker processes it starts (through ``MBA_VERIFY``, which they inherit).
    ``cached`` undoes an earlier ``full`` of this process; a ``MBA_VERIFY`` the user set
    stays as it is."""
    global _SET_BY_OPTION
    if mode not in VERIFY_MODES:
        raise ConfigError(f"--verify: expected one of {', '.join(VERIFY_MODES)}, got {mode!r}")
    if mode == "full":
        if os.environ.get(VERIFY_ENV) not in _FULL_VALUES:
            os.environ[VERIFY_ENV] = "full"
            _SET_BY_OPTION = True
    elif _SET_BY_OPTION:
        os.environ.pop(VERIFY_ENV, None)
        _SET_BY_OPTION = False


def verify_mode() -> str:
    """``cached``, ``full`` or ``never`` (see the module docstring)."""
    value = os.environ.get(VERIFY_ENV, "")
    if value in _FULL_VALUES:
        return "full"
    return "never" if value == "never" else "cached"


def file_identity(path: str) -> list[int]:
    """What the cache keys a hash on (besides the absolute path): size, mtime and ctime
    in ns, and inode. Not the device number: a network filesystem has a different one
    on every node, and nodes sharing a home directory would then evict each other's
    entries and hash every model again on every run."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _load() -> dict:
    try:
        with open(_cache_path(), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(path: str, stamp: list[int], digest: str) -> None:
    with _LOCK:
        data = _load()
        data[path] = {"stamp": stamp, "sha256": digest}
        with contextlib.suppress(OSError):  # read-only home: no reason to fail, hash again
            atomic_write_json(_cache_path(), data)


def file_sha256(path: str, mode: str | None = None) -> str:
    """The sha256 of ``path``: from the cache when its identity (:func:`file_identity`)
    is the one it had when last hashed, unless ``mode`` (default :func:`verify_mode`)
    is ``full``: then hashed in full (once per process while its identity holds)."""
    path = os.path.abspath(path)
    stamp = file_identity(path)
    full = (mode or verify_mode()) == "full"
    if full:
        mine = _HASHED_HERE.get(path)
        if mine is not None and mine[0] == stamp:
            return mine[1]
    else:
        hit = _load().get(path)
        if (
            isinstance(hit, dict)
            and hit.get("stamp") == stamp
            and isinstance(hit.get("sha256"), str)
        ):
            return hit["sha256"]
    started = time.time_ns()
    digest = sha256_file(path)
    # remembered only if not rewritten while we read it and not changed in the last
    # RACY_NS before we started (a later edit then surely gets another ctime)
    if file_identity(path) == stamp and started - stamp[2] >= RACY_NS:
        _remember(path, stamp, digest)
        if full:
            _HASHED_HERE[path] = (stamp, digest)
    return digest


def verify_sha256(path: str, expected: str | None, what: str, fix: str = "") -> str:
    """Raise :class:`DataFormatError` naming ``what`` when ``path``'s bytes do not hash to
    ``expected``; returns the hash of the bytes actually there. ``expected=None`` (not
    recorded) only hashes. ``fix`` is appended to the message: what the user can do."""
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: missing ({what})")
    if verify_mode() == "never" and expected is not None:
        return expected
    actual = file_sha256(path)
    if expected is not None and actual != expected:
        raise DataFormatError(
            f"{path}: sha256 {actual[:16]}... differs from the {expected[:16]}... recorded "
            f"for {what}: the file changed after it was written" + (f"; {fix}" if fix else "")
        )
    return actual
