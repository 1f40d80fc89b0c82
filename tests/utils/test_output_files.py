"""Output files (utils/output_files.py): a new path or our own earlier output is
written; anything else there is refused, byte for byte untouched; one writer at a time."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils import locks
from megablocks_ablate.utils import output_files as of
from megablocks_ablate.utils.outputs import tmp_tag


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _write_ours(path: str, kind: str, data: bytes) -> None:
    with of.staged_output_files([path], kind, overwrite=True) as (tmp,):
        with open(tmp, "wb") as f:
            f.write(data)


def test_a_new_path_is_claimed_and_its_missing_parents_created(tmp_path):
    out = tmp_path / "a" / "b" / "r.json"
    assert of.claim_output_file(str(out), "eval") is False
    assert out.parent.is_dir() and not out.exists()


def test_a_users_file_is_refused_even_with_overwrite(tmp_path):
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "figures"}\n')
    before = _digest(mine)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"notes\.json: exists and is a file megablocks-"):
            of.claim_output_file(str(mine), "eval", overwrite=overwrite)
    with pytest.raises(ConfigError, match="did not write"):
        with of.staged_output_files([str(mine)], "eval", overwrite=True) as (tmp,):
            raise AssertionError("not reached: refused before the block")
    assert _digest(mine) == before
    assert sorted(os.listdir(tmp_path)) == ["notes.json"]  # no temporary, no sidecar


def test_embedded_format_names_the_kind(tmp_path):
    ours = tmp_path / "r.json"
    ours.write_text(json.dumps({"format": "megablocks-ablate/eval@1", "models": {}}))
    assert of.file_kind(str(ours)) == "eval"
    assert of.claim_output_file(str(ours), "eval", overwrite=True) is True
    with pytest.raises(ConfigError, match="holds a previous eval output; pass --overwrite"):
        of.claim_output_file(str(ours), "eval")
    with pytest.raises(ConfigError, match="is a megablocks-ablate eval file"):
        of.claim_output_file(str(ours), "tokenizer", overwrite=True)
    other = tmp_path / "m.json"
    other.write_text(json.dumps({"format": "something/else@1"}))
    assert of.file_kind(str(other)) is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert of.file_kind(str(tmp_path / "list.json")) is None


def test_sidecar_records_our_file_until_it_changes(tmp_path):
    out = str(tmp_path / "tok.model")
    _write_ours(out, "tokenizer", b"first")
    assert of.file_kind(out) == "tokenizer"
    assert os.path.basename(of.sidecar_path(out)) == ".tok.model.megablocks-ablate.json"
    _write_ours(out, "tokenizer", b"second")  # replaced: ours again, new bytes
    assert open(out, "rb").read() == b"second" and of.file_kind(out) == "tokenizer"
    assert sorted(os.listdir(tmp_path)) == [".tok.model.megablocks-ablate.json", "tok.model"]

    os.replace(out, out + ".bak")  # a user puts another file in its place
    with open(out, "wb") as f:
        f.write(b"second")  # even with the same bytes: not the file we recorded
    assert of.file_kind(out) is None
    with pytest.raises(ConfigError, match="a file megablocks-ablate did not write"):
        of.claim_output_file(out, "tokenizer", overwrite=True)


def test_an_edited_file_is_no_longer_ours(tmp_path):
    out = str(tmp_path / "d.bin")
    _write_ours(out, "index-concat", b"x" * 10)
    st = os.stat(out)
    with open(out, "r+b") as f:  # same inode, new bytes and mtime
        f.write(b"y")
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert of.file_kind(out) is None


def test_inputs_directories_links_and_paths_under_files_are_refused(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"in\.jsonl: is the input"):
        of.claim_output_file(str(inp), "eval", overwrite=True, inputs=[str(inp)])
    d = tmp_path / "data"
    d.mkdir()
    with pytest.raises(ConfigError, match="is inside the input"):
        of.claim_output_file(str(d / "r.json"), "eval", inputs=[str(d)])
    with pytest.raises(ConfigError, match="is a directory"):
        of.claim_output_file(str(d), "eval", overwrite=True)
    link = tmp_path / "link.json"
    link.symlink_to(inp)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        of.claim_output_file(str(link), "eval", overwrite=True)
    with pytest.raises(ConfigError, match=r"in\.jsonl is a file, not a directory"):
        of.claim_output_file(str(inp / "r.json"), "eval")
    assert inp.read_text() == "{}\n" and not (d / "r.json").exists()


def test_a_foreign_file_at_the_sidecar_path_is_refused(tmp_path):
    out = tmp_path / "tok.model"
    side = tmp_path / ".tok.model.megablocks-ablate.json"
    side.write_text("my notes\n")
    with pytest.raises(ConfigError, match="is not a megablocks-ablate record"):
        of.claim_output_file(str(out), "tokenizer")
    assert side.read_text() == "my notes\n" and not out.exists()


def test_a_failed_write_leaves_the_previous_output(tmp_path):
    out = str(tmp_path / "tok.model")
    _write_ours(out, "tokenizer", b"good")
    with pytest.raises(RuntimeError):
        with of.staged_output_files([out], "tokenizer", overwrite=True) as (tmp,):
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("killed while writing")
    assert open(out, "rb").read() == b"good" and of.file_kind(out) == "tokenizer"
    assert sorted(os.listdir(tmp_path)) == [".tok.model.megablocks-ablate.json", "tok.model"]


def test_a_kill_between_record_and_rename_keeps_the_old_file_ours(tmp_path, monkeypatch):
    out = str(tmp_path / "tok.model")
    _write_ours(out, "tokenizer", b"old")

    real_replace = os.replace

    def killed_before_the_rename(src, dst):
        if dst == out:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(of.os, "replace", killed_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        _write_ours(out, "tokenizer", b"new")
    monkeypatch.undo()
    assert len(json.load(open(of.sidecar_path(out)))["stamps"]) == 2  # the new one recorded
    assert open(out, "rb").read() == b"old" and of.file_kind(out) == "tokenizer"


def test_a_file_that_appears_while_writing_is_refused_at_commit(tmp_path):
    out = tmp_path / "r.bin"
    with pytest.raises(ConfigError, match="did not write"):
        with of.staged_output_files([str(out)], "index-concat") as (tmp,):
            open(tmp, "wb").close()
            out.write_bytes(b"a user's file, written meanwhile")
    assert out.read_bytes() == b"a user's file, written meanwhile"


def test_stale_temporaries_of_a_dead_writer_are_swept_by_the_next_claim(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = tmp_tag().rsplit("-", 1)[0]
    stale = tmp_path / f".tok.model.{host}-{dead.pid}.abc123.tmp"
    stale.mkdir()
    (stale / "tok.model").write_bytes(b"half")
    of.claim_output_file(str(tmp_path / "tok.model"), "tokenizer")
    assert not stale.exists()


def test_output_lock_refuses_a_second_writer_naming_the_first(tmp_path):
    out = str(tmp_path / "merged")
    with of.output_lock(out, f"merge --out {out}"):
        assert os.path.exists(of.lock_path(out))
        with pytest.raises(locks.LockHeld, match=rf"merge --out {out} is in progress \(pid "):
            with of.output_lock(out, "another merge"):
                pass
    assert not os.path.exists(of.lock_path(out))
    with of.output_lock(out, "a later merge"):  # released: the next writer gets it
        pass
