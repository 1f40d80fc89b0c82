"""Hash verification with a size/mtime cache: changed bytes are always caught."""

from __future__ import annotations

import os

import pytest

from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.utils import verify
from megablocks_ablate.utils.hashing import sha256_file


def test_verifies_and_caches(tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "RACY_NS", 0)  # a file this new is not remembered otherwise
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    good = sha256_file(f)
    assert verify.verify_sha256(str(f), good, "unit model a") == good
    calls = []
    monkeypatch.setattr(verify, "sha256_file", lambda p: calls.append(p) or good)
    assert verify.verify_sha256(str(f), good, "unit model a") == good
    assert calls == []  # unchanged size/mtime/inode: from the cache


def test_changed_bytes_are_refused_even_with_same_size(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    good = sha256_file(f)
    verify.verify_sha256(str(f), good, "unit model a")
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    st = os.stat(f)
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with pytest.raises(
        DataFormatError, match=r"model.safetensors: sha256 .* differs .* unit model a.*retrain"
    ):
        verify.verify_sha256(str(f), good, "unit model a", "retrain it")


def test_missing_file_and_unrecorded_hash(tmp_path):
    with pytest.raises(DataFormatError, match="missing"):
        verify.verify_sha256(str(tmp_path / "nope"), "0" * 64, "seed")
    f = tmp_path / "x"
    f.write_bytes(b"x")
    assert verify.verify_sha256(str(f), None, "seed") == sha256_file(f)
