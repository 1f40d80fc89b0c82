"""Lock files that survive crashes: held by a live process, taken over when stale.

A lock is a JSON file ``{"host", "pid", "started", "what"}`` created with ``O_EXCL``.
Its holder touches it every :data:`HEARTBEAT_S` seconds, so a lock is *stale* when its
process is gone (same host) or its heartbeat stopped (any host, shared filesystems
included, where a pid means nothing): then it is taken over. A live lock makes
:func:`acquire` wait (``timeout_s`` None: forever, logging who holds it) or refuse
(``timeout_s=0``) with a message naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

from megablocks_ablate.errors import MBAError

logger = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # no heartbeat for this long: the holder is gone


class LockHeld(MBAError):
    """Another live process holds the lock."""


def _host() -> str:
    return socket.gethostname().split(".")[0]


def _holder(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or garbage: judged by its age


def _stale(path: str, holder: dict) -> bool:
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return True
    if holder.get("host") == _host() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return age > STALE_AFTER_S


def _describe(holder: dict) -> str:
    since = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {when}"


def _try_create(path: str, what: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"host": _host(), "pid": os.getpid(), "started": time.time(), "what": what}, f)
    return True


def _heartbeat(path: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


@contextlib.contextmanager
def acquire(
    path: str, what: str, timeout_s: float | None = None, poll_s: float = 1.0
) -> Iterator[None]:
    """Hold the lock file ``path`` (for ``what``, shown to whoever waits) in the block."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    told = 0.0
    while not _try_create(path, what):
        holder = _holder(path)
        if holder is None:
            continue  # released just now
        if _stale(path, holder):
            logger.warning("%s: taking over a stale lock (%s)", path, _describe(holder))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        if deadline is not None and time.monotonic() >= deadline:
            raise LockHeld(
                f"{path}: {holder.get('what', what)} is in progress "
                f"({_describe(holder)}); wait for it to finish, or stop it"
            )
        if time.monotonic() - told > 60:
            logger.info(
                "waiting for %s (%s) to finish", holder.get("what", what), _describe(holder)
            )
            told = time.monotonic()
        time.sleep(poll_s)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
