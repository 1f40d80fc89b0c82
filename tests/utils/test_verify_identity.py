"""The hash cache trusts a file only while its identity (size, mtime, ctime, inode) holds,
and ``--verify full`` trusts no cache at all (docs/reliability.md "Verify every byte
trusted")."""

from __future__ import annotations

import json
import os
import time

import pytest

from megablocks_ablate import cli
from megablocks_ablate.errors import ConfigError, DataFormatError
from megablocks_ablate.utils import verify
from megablocks_ablate.utils.hashing import sha256_file


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(verify.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(verify.VERIFY_ENV, raising=False)
    monkeypatch.setattr(verify, "_SET_BY_OPTION", False)
    monkeypatch.setattr(verify, "_HASHED_HERE", {})


def _edit_in_place_keeping_size_and_mtime(path) -> None:
    st = os.stat(path)
    time.sleep(0.05)  # the next clock tick of file times
    with open(path, "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    # everything the old cache keyed on is unchanged: only the ctime tells
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )


def _cached(path) -> dict | None:
    try:
        with open(os.path.join(verify.cache_dir(), "verified.json"), encoding="utf-8") as f:
            return json.load(f).get(os.path.abspath(path))
    except FileNotFoundError:
        return None


def test_in_place_edit_keeping_size_and_mtime_is_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "RACY_NS", 0)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    good = sha256_file(f)
    assert verify.verify_sha256(str(f), good, "unit model a") == good
    assert _cached(f) == {"stamp": verify.file_identity(str(f)), "sha256": good}
    _edit_in_place_keeping_size_and_mtime(f)
    with pytest.raises(DataFormatError, match=r"model.safetensors: sha256 .* differs"):
        verify.verify_sha256(str(f), good, "unit model a")


def test_a_file_changed_just_before_hashing_is_not_remembered(tmp_path):
    # file times tick coarsely: an edit within the tick of the hashed write could keep
    # even the ctime, so a hash of a file this fresh is never cached (RACY_NS)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    good = verify.verify_sha256(str(f), sha256_file(f), "unit model a")
    assert _cached(f) is None
    data = bytearray(f.read_bytes())
    data[3] ^= 1
    st = os.stat(f)
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataFormatError, match="differs"):
        verify.verify_sha256(str(f), good, "unit model a")


def test_verify_full_ignores_a_forged_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "RACY_NS", 0)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    good = verify.verify_sha256(str(f), sha256_file(f), "unit model a")
    _edit_in_place_keeping_size_and_mtime(f)
    # the cache claims the edited file (its current identity) still hashes to `good`
    os.makedirs(verify.cache_dir(), exist_ok=True)
    with open(os.path.join(verify.cache_dir(), "verified.json"), "w", encoding="utf-8") as out:
        entry = {"stamp": verify.file_identity(str(f)), "sha256": good}
        json.dump({str(f): entry}, out)
    assert verify.verify_sha256(str(f), good, "unit model a") == good  # cached: trusted
    verify.set_verify_mode("full")
    assert os.environ[verify.VERIFY_ENV] == "full"  # worker processes inherit it
    with pytest.raises(DataFormatError, match="differs"):
        verify.verify_sha256(str(f), good, "unit model a")
    # full mode also corrected the cache, so cached mode now catches it too
    verify.set_verify_mode("cached")
    assert verify.VERIFY_ENV not in os.environ
    with pytest.raises(DataFormatError, match="differs"):
        verify.verify_sha256(str(f), good, "unit model a")


def test_full_mode_hashes_each_file_once_per_process(tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "RACY_NS", 0)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    good = sha256_file(f)
    calls = []
    monkeypatch.setattr(verify, "sha256_file", lambda p: calls.append(p) or good)
    verify.verify_sha256(str(f), good, "a")
    verify.verify_sha256(str(f), good, "a")
    assert len(calls) == 1  # cached
    verify.set_verify_mode("full")
    verify.verify_sha256(str(f), good, "a")
    verify.verify_sha256(str(f), good, "a")
    assert len(calls) == 2  # once more in full, then remembered by this process only
    verify.set_verify_mode("cached")


def test_user_setting_survives_and_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv(verify.VERIFY_ENV, "always")
    verify.set_verify_mode("full")
    verify.set_verify_mode("cached")
    assert os.environ[verify.VERIFY_ENV] == "always" and verify.verify_mode() == "full"
    with pytest.raises(ConfigError, match="--verify: expected one of cached, full"):
        verify.set_verify_mode("sometimes")


@pytest.mark.parametrize(
    "argv",
    [
        ["study", "run", "s.yaml"],
        ["study", "search", "s.yaml", "--k", "2"],
        ["study", "optimize", "s.yaml"],
        ["merge", "--spec", "m.yaml"],
        ["train"],
    ],
)
def test_commands_that_check_recorded_hashes_take_verify(argv, capsys):
    parser = cli.build_parser()
    assert parser.parse_args(argv).verify == "cached"
    assert parser.parse_args([*argv, "--verify", "full"]).verify == "full"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*argv, "--verify", "sometimes"])
    assert exc.value.code == 2
    assert "--verify: invalid choice: 'sometimes'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["study", "run", "nope.yaml"],
        ["merge", "--spec", "nope.yaml"],
        ["train", "--config", "nope"],
    ],
)
def test_verify_full_takes_effect_before_the_command_reads_anything(
    argv, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv, "--verify", "full"]) != 0  # the input is missing ...
    assert "nope" in capsys.readouterr().err
    assert verify.verify_mode() == "full"  # ... but the mode was set first
    verify.set_verify_mode("cached")
    assert verify.verify_mode() == "cached"
