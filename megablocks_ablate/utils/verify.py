"""Files checked against their recorded sha256 before a result depends on them, cheaply.

Hashing a 2 GB unit model on every study run would cost seconds per model, so a
successful check is remembered by (absolute path, size, mtime in ns, inode): while
those are unchanged the file is taken as verified; any rewrite, truncation or copy
changes one of them and the file is hashed again. The cache is one JSON file,
``$MBA_CACHE_DIR/verified.json`` (default ``~/.cache/megablocks-ablate``); losing it
(or a concurrent writer's update) only means hashing again. ``MBA_VERIFY=always``
hashes every time; ``MBA_VERIFY=never`` skips checks (for benchmarks, at your risk).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading

from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.utils.atomic import atomic_write_json
from megablocks_ablate.utils.hashing import sha256_file

CACHE_ENV = "MBA_CACHE_DIR"
VERIFY_ENV = "MBA_VERIFY"
_LOCK = threading.Lock()


def cache_dir() -> str:
    """Where megablocks-ablate keeps per-user caches."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "megablocks-ablate")
    return os.environ.get(CACHE_ENV) or default


def _cache_path() -> str:
    return os.path.join(cache_dir(), "verified.json")


def _stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


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


def file_sha256(path: str) -> str:
    """The sha256 of ``path``, from the cache when its size, mtime and inode are those of
    the last time it was hashed."""
    path = os.path.abspath(path)
    stamp = _stamp(path)
    if os.environ.get(VERIFY_ENV) != "always":
        hit = _load().get(path)
        if (
            isinstance(hit, dict)
            and hit.get("stamp") == stamp
            and isinstance(hit.get("sha256"), str)
        ):
            return hit["sha256"]
    digest = sha256_file(path)
    if _stamp(path) == stamp:  # not rewritten while we read it
        _remember(path, stamp, digest)
    return digest


def verify_sha256(path: str, expected: str | None, what: str, fix: str = "") -> str:
    """Raise :class:`DataFormatError` naming ``what`` when ``path``'s bytes do not hash to
    ``expected``; returns the hash of the bytes actually there. ``expected=None`` (not
    recorded) only hashes. ``fix`` is appended to the message: what the user can do."""
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: missing ({what})")
    if os.environ.get(VERIFY_ENV) == "never" and expected is not None:
        return expected
    actual = file_sha256(path)
    if expected is not None and actual != expected:
        raise DataFormatError(
            f"{path}: sha256 {actual[:16]}... differs from the {expected[:16]}... recorded "
            f"for {what}: the file changed after it was written" + (f"; {fix}" if fix else "")
        )
    return actual
