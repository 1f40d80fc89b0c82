"""Lock files: a live holder makes others wait or refuse; a dead one's lock is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from megablocks_ablate.utils import locks
from megablocks_ablate.utils.locks import LockHeld, acquire


def test_refuses_while_held_and_is_released_after(tmp_path):
    path = str(tmp_path / "x.lock")
    with acquire(path, "study run A"):
        holder = json.loads(open(path).read())
        assert holder["pid"] == os.getpid() and holder["what"] == "study run A"
        with pytest.raises(LockHeld, match=rf"study run A is in progress \(pid {os.getpid()}"):
            with acquire(path, "study run B", timeout_s=0):
                pass
    assert not os.path.exists(path)
    with acquire(path, "study run B", timeout_s=0):
        pass


def test_waits_for_a_live_holder(tmp_path):
    path = str(tmp_path / "x.lock")
    order = []

    def holder():
        with acquire(path, "first"):
            order.append("first in")
            time.sleep(0.5)
            order.append("first out")

    t = threading.Thread(target=holder)
    t.start()
    while not order:
        time.sleep(0.01)
    with acquire(path, "second", timeout_s=None, poll_s=0.05):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]


def test_takes_over_the_lock_of_a_dead_process(tmp_path):
    path = str(tmp_path / "x.lock")
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    with open(path, "w") as f:
        json.dump({"host": locks._host(), "pid": p.pid, "started": time.time(), "what": "x"}, f)
    with acquire(path, "me", timeout_s=0):
        assert json.loads(open(path).read())["pid"] == os.getpid()


def test_takes_over_a_lock_whose_heartbeat_stopped(tmp_path, monkeypatch):
    path = str(tmp_path / "x.lock")
    with open(path, "w") as f:  # another host: its pid means nothing here
        json.dump({"host": "elsewhere", "pid": 1, "started": 0, "what": "x"}, f)
    with pytest.raises(LockHeld):
        with acquire(path, "me", timeout_s=0):
            pass
    old = time.time() - locks.STALE_AFTER_S - 10
    os.utime(path, (old, old))
    with acquire(path, "me", timeout_s=0):
        pass
