"""OS errors end in one ``error: <path>: <reason>`` line (exit 1), never a traceback, and
leave no temp file: disk full, a read-only or unwritable directory, a name too long
(docs/reliability.md "OS errors in one line"). ``launch-templates`` is the command: it
writes a few small files through the atomic writers."""

from __future__ import annotations

import errno
import os

import pytest

from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.cli import os_error_line
from megablocks_ablate.commands import launch_templates
from megablocks_ablate.commands.launch_templates import TEMPLATES
from megablocks_ablate.utils import atomic
from megablocks_ablate.utils.atomic import atomic_open, atomic_write_text


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _temporaries(directory) -> list[str]:
    return (
        [n for n in os.listdir(directory) if n.endswith(".tmp")] if os.path.isdir(directory) else []
    )


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_disk_full_while_writing_names_the_file_and_leaves_no_temp(tmp_path, monkeypatch, capsys):
    real_fsync = os.fsync

    def full(fd: int) -> None:  # the disk fills up while a template is written
        name = os.path.basename(_fd_path(fd))
        if name.endswith(".tmp") and ".megablocks-ablate.json." not in name:  # not the marker
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "launch"
    assert cli_main(["launch-templates", "--out", str(out)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    first = next(iter(TEMPLATES))
    assert line == f"error: {out / first}: No space left on device"
    assert _temporaries(out) == [] and not (out / first).exists()


def test_read_only_filesystem_names_the_target_not_the_temp(tmp_path, monkeypatch, capsys):
    real_replace = os.replace

    def read_only(src, dst):  # a rename into a read-only mount: EROFS naming both paths
        if os.path.basename(os.fspath(dst)) in TEMPLATES:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), src, None, dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", read_only)
    out = tmp_path / "launch"
    assert cli_main(["launch-templates", "--out", str(out)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"error: {out / next(iter(TEMPLATES))}: Read-only file system"
    assert _temporaries(out) == []


def test_permission_denied_making_the_temp_file(tmp_path, monkeypatch, capsys):
    # tests run as root, where a 0o500 directory does not refuse writes: EACCES simulated
    real_mkstemp = atomic.tempfile.mkstemp

    def denied(*args, **kwargs):
        if kwargs.get("prefix", "").lstrip(".").split(".")[0] in {
            n.split(".")[0] for n in TEMPLATES
        }:
            d, p = kwargs["dir"], kwargs["prefix"]
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), f"{d}/{p}x.tmp")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)
    out = tmp_path / "launch"
    assert cli_main(["launch-templates", "--out", str(out)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"error: {out / next(iter(TEMPLATES))}: Permission denied"
    assert _temporaries(out) == []


def test_name_too_long_for_real(tmp_path, capsys):
    target = str(tmp_path / ("n" * 300))
    with pytest.raises(OSError) as e:
        atomic_write_text(target, "x")
    assert e.value.errno == errno.ENAMETOOLONG and e.value.filename == target
    assert os_error_line(e.value) == f"{target}: File name too long"
    assert os.listdir(tmp_path) == []
    # through the CLI: an output directory name too long is one line naming it
    out = str(tmp_path / ("d" * 300))
    assert cli_main(["launch-templates", "--out", out]) != 0
    line = _one_error_line(capsys.readouterr().err)
    assert out in line and "File name too long" in line
    assert os.listdir(tmp_path) == []


def test_a_failed_write_removes_the_temp_and_names_the_target(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as e, atomic_open(target, "wb") as f:
        f.write(b"new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write's error names no file
    assert e.value.filename == os.fspath(target) and e.value.filename2 is None
    assert os.listdir(tmp_path) == ["out.bin"] and target.read_bytes() == b"old"
    # an OSError about another file is passed on as it is
    with pytest.raises(FileNotFoundError) as e2, atomic_open(target, "wb"):
        (tmp_path / "missing").read_bytes()
    assert e2.value.filename == os.fspath(tmp_path / "missing")
    assert os.listdir(tmp_path) == ["out.bin"]


def test_commit_tmp_cleans_up_and_names_the_target(tmp_path, monkeypatch):
    tmp = atomic.tmp_path_for(tmp_path / "x.json")

    def fail(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), src, None, dst)

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError) as e:
        atomic.commit_tmp(tmp, tmp_path / "x.json")
    assert os_error_line(e.value) == f"{tmp_path / 'x.json'}: Read-only file system"
    assert os.listdir(tmp_path) == []


def test_error_line_forms(monkeypatch, capsys, tmp_path):
    def raises(exc):
        def run(args):
            raise exc

        monkeypatch.setattr(launch_templates, "run", run)

    out = str(tmp_path / "o")
    raises(OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, "/b"))
    assert cli_main(["launch-templates", "--out", out]) == 1
    assert _one_error_line(capsys.readouterr().err) == "error: /a -> /b: Invalid cross-device link"
    raises(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert cli_main(["launch-templates", "--out", out]) == 1
    assert _one_error_line(capsys.readouterr().err) == "error: No space left on device"
    # Ctrl-C and bugs behave as before: 130, and a traceback for anything not an OSError
    raises(KeyboardInterrupt())
    assert cli_main(["launch-templates", "--out", out]) == 130
    raises(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        cli_main(["launch-templates", "--out", out])
