"""Host-placed pool rows carry the hash of their source, are checked before reuse and
are removed when no live run holds them (docs/reliability.md "Verify every byte
trusted")."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from merge_fixtures import merged_flats, write_family

from megablocks_ablate.checkpoint import (
    load_model_checkpoint,
    read_checkpoint_meta,
    save_model_checkpoint,
)
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.merge import pool_host
from megablocks_ablate.merge.pool import ModelPool, OpenedUnits
from megablocks_ablate.merge.pool_host import HostPool, host_dir_usage, row_file_name
from megablocks_ablate.merge.pool_rows import HEADER_BYTES, MAGIC, sweep_unheld_rows
from megablocks_ablate.utils.verify import file_sha256

WEIGHTS = [{"cs_0": 1.0}, [0.3, 0.3, 0.4], [0.5, 0.0, 0.5]]

_KILLED_RUN = """
import json, os, signal, sys, torch
from megablocks_ablate.merge.pool_host import HostPool
pool = HostPool.from_checkpoints(json.loads(sys.argv[1]), dtype=torch.float32,
                                 host_dir=sys.argv[2])
print(json.dumps([f.path for f in pool.files]), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_run(ckpts: dict, shm: str) -> list[str]:
    """Rows a pool made in a process that was then SIGKILLed (so never closed)."""
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, json.dumps(ckpts), shm],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return json.loads(proc.stdout)


def _rewrite_in_place(ckpt_dir: str, scratch: str) -> None:
    """Other weights in the same file: same path, same size, same mtime, same inode."""
    path = os.path.join(ckpt_dir, "model.safetensors")
    st = os.stat(path)
    with torch.no_grad():
        state = {k: v * -3.0 + 1.0 for k, v in load_model_checkpoint(ckpt_dir)[0].items()}
    save_model_checkpoint(scratch, state, {}, read_checkpoint_meta(ckpt_dir)[1])
    with open(os.path.join(scratch, "model.safetensors"), "rb") as f:
        new = f.read()
    assert len(new) == st.st_size
    with open(path, "r+b") as f:
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )


def _header(row: str) -> dict:
    with open(row, "rb") as f:
        head = f.read(HEADER_BYTES)
    assert head.startswith(MAGIC)
    n = int.from_bytes(head[len(MAGIC) : len(MAGIC) + 4], "little")
    return json.loads(head[len(MAGIC) + 4 : len(MAGIC) + 4 + n])


def _reference(ckpts) -> list[torch.Tensor]:
    return merged_flats(ModelPool.from_checkpoints(ckpts, show_progress=False), WEIGHTS)


def test_rows_of_a_killed_run_are_removed_and_never_reused(tmp_path):
    _, ckpts = write_family(str(tmp_path))
    shm = str(tmp_path / "shm")
    old_rows = _killed_run(ckpts, shm)
    assert host_dir_usage(shm)["files"] == 3 and all(os.path.exists(p) for p in old_rows)
    # the same path with other bytes, size and mtime kept (what a stale key would miss)
    _rewrite_in_place(ckpts["cs_0"], str(tmp_path / "scratch"))
    want = _reference(ckpts)
    pool = HostPool.from_checkpoints(ckpts, dtype=torch.float32, host_dir=shm)
    assert all(f.created for f in pool.files)  # nothing the killed run left was used
    assert not os.path.exists(old_rows[0])  # cs_0's old row is gone; the others were
    assert [_header(p)["writer"]["pid"] for p in old_rows[1:]] == [os.getpid()] * 2  # rebuilt
    assert host_dir_usage(shm)["files"] == 3
    for got, ref in zip(merged_flats(pool, WEIGHTS), want):
        assert torch.equal(got, ref)
    pool.close()
    assert os.listdir(shm) == []


def test_a_recorded_hash_the_weights_do_not_match_is_refused(tmp_path):
    _, ckpts = write_family(str(tmp_path))
    shm = str(tmp_path / "shm")
    keys = {u: file_sha256(os.path.join(d, "model.safetensors")) for u, d in ckpts.items()}
    _killed_run(ckpts, shm)
    _rewrite_in_place(ckpts["cs_0"], str(tmp_path / "scratch"))
    # the caller's (stale) hash names the old rows; the weights are checked against it
    with pytest.raises(DataFormatError, match=r"cs_0/model.safetensors: sha256 .* differs"):
        HostPool.from_checkpoints(ckpts, dtype=torch.float32, host_dir=shm, keys=keys)
    assert host_dir_usage(shm)["files"] == 0  # the killed run's rows were swept all the same


def test_a_held_row_with_another_identity_is_rebuilt_not_used(tmp_path):
    _, ckpts = write_family(str(tmp_path))
    shm = str(tmp_path / "shm")
    other = HostPool.from_checkpoints(ckpts, dtype=torch.float32, host_dir=shm)
    # a live run's row of cs_1, under the name the cs_0 row has (held: not swept)
    slots = list(other.slots.values())
    key = file_sha256(os.path.join(ckpts["cs_0"], "model.safetensors"))
    name = os.path.join(shm, row_file_name(key, slots, torch.float32))
    os.rename(other.files[1].path, name + ".x")
    os.rename(name, other.files[1].path)  # cs_0's row takes cs_1's name, and back
    os.rename(name + ".x", name)
    pool = HostPool.from_checkpoints(ckpts, dtype=torch.float32, host_dir=shm)
    assert [f.created for f in pool.files] == [True, True, False]
    for got, ref in zip(merged_flats(pool, WEIGHTS), _reference(ckpts)):
        assert torch.equal(got, ref)
    other.close()  # removes nothing the new pool uses
    assert host_dir_usage(shm)["files"] == 3
    pool.close()
    assert os.listdir(shm) == []


def test_row_header_records_the_source_hash(tmp_path):
    _, ckpts = write_family(str(tmp_path))
    shm = str(tmp_path / "shm")
    pool = HostPool.from_checkpoints(ckpts, dtype=torch.float32, host_dir=shm)
    for unit, f in zip(pool.units, pool.files):
        header = _header(f.path)
        assert header["source_sha256"] == file_sha256(
            os.path.join(ckpts[unit], "model.safetensors")
        )
        assert header["numel"] == pool.num_params and header["dtype"] == "torch.float32"
        assert header["writer"]["pid"] == os.getpid()
    pool.close()


def test_sweep_keeps_held_rows_and_removes_stale_leftovers(tmp_path):
    _, ckpts = write_family(str(tmp_path))
    shm = tmp_path / "shm"
    pool = HostPool.from_checkpoints(ckpts, dtype=torch.float32, host_dir=str(shm))
    stale = shm / "mba-pool-0123.row"  # a row nobody holds ...
    stale.write_bytes(b"x" * 100)
    (shm / "mba-pool-4567.row.lock").write_bytes(b"")  # ... a lock without a row ...
    (shm / "mba-pool-89ab.row.tmp.4242").write_bytes(b"half")  # ... a dead loader's temp
    held = shm / "mba-pool-cdef.row"  # and one a live process holds
    held.write_bytes(b"y" * 100)
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        assert sweep_unheld_rows(str(shm)) == 1
        left = sorted(os.listdir(shm))
        assert "mba-pool-cdef.row" in left and len([p for p in left if p.endswith(".row")]) == 4
        assert not any(x in p for p in left for x in ("0123", "4567", "89ab"))
    finally:
        os.close(fd)
    pool.close()
    assert sweep_unheld_rows(str(shm)) == 1  # now nobody holds it
    assert os.listdir(shm) == []


def test_a_source_changed_while_its_row_is_filled_is_refused(tmp_path, monkeypatch):
    _, ckpts = write_family(str(tmp_path))
    shm = str(tmp_path / "shm")
    fill_row = OpenedUnits.fill_row

    def fill_and_touch(self, i, row, bar=None, base=None):
        fill_row(self, i, row, bar, base)
        os.utime(self.maps[i].path, ns=(1, 1))  # someone edits the checkpoint meanwhile

    monkeypatch.setattr(OpenedUnits, "fill_row", fill_and_touch)
    with pytest.raises(DataFormatError, match=r"cs_0/model.safetensors: changed while the pool"):
        pool_host.HostPool.from_checkpoints(ckpts, dtype=torch.float32, host_dir=shm)
    assert os.listdir(shm) == []  # no row, no temporary, no lock left
