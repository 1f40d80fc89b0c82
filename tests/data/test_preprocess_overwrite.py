"""`preprocess --overwrite`: check everything first, replace the old output only once the
new one is complete (built in ``<out>.staging-<host>-<pid>``, then swapped in)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.data import preprocess as pp


def _tree(root) -> dict[str, str]:
    """relative path -> sha256 of every file (hidden ones too), "dir" for directories."""
    found = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(d, name), root)] = "dir"
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                found[os.path.relpath(os.path.join(d, name), root)] = hashlib.sha256(
                    f.read()
                ).hexdigest()
    return found


def _side_dirs(out) -> list[str]:
    parent, base = os.path.split(os.path.abspath(out))
    return sorted(n for n in os.listdir(parent) if n != base and n.startswith(base + "."))


def _args(corpus, tok, out, *extra) -> list[str]:
    args = ["preprocess", "--input", corpus, "--tokenizer", tok, "--partition-by", "fos"]
    return args + ["--order-by", "year", "--heldout-fraction", "0.1", "--out", str(out), *extra]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_corpus, sp_model_path):
    """A previous output (unit_tokens 3000) with a user's file beside it."""
    out = tmp_path_factory.mktemp("tpl") / "data"
    assert cli_main(_args(tiny_corpus, sp_model_path, out, "unit_tokens=3000")) == 0
    (out / "notes.txt").write_text("mine")
    return out


@pytest.fixture
def prev(tmp_path, template):
    out = tmp_path / "data"
    shutil.copytree(template, out, symlinks=True)
    return out, _tree(out)


def _refused(capsys, argv, expect: str) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and expect in err, err


@pytest.mark.parametrize(
    "case, expect",
    [
        ("input", "no such file"),
        ("tokenizer", "no such tokenizer file"),
        ("partition", "--partition-by fso: no document of"),
        ("inside", "mine.jsonl: is inside the output directory"),
        ("eval", "no such file"),
    ],
)
def test_refused_overwrite_leaves_the_old_output_byte_identical(
    prev, tiny_corpus, sp_model_path, capsys, case, expect
):
    out, _ = prev
    corpus, tok, extra = tiny_corpus, sp_model_path, ["unit_tokens=5000", "--overwrite"]
    if case == "input":
        corpus = tiny_corpus.replace("corpus.jsonl", "corpsu.jsonl")
    elif case == "tokenizer":
        tok = sp_model_path + ".missing"
    elif case == "partition":  # --partition-by fos --partition-by fso: the second misspelt
        extra += ["--partition-by", "fso"]
    elif case == "inside":
        corpus = str(out / "mine.jsonl")
        shutil.copy(tiny_corpus, corpus)
    elif case == "eval":
        extra += ["--eval", str(out.parent / "evl.jsonl")]
    before = _tree(out)
    _refused(capsys, _args(corpus, tok, out, *extra), expect)
    assert _tree(out) == before
    assert _side_dirs(out) == []


def test_misspelt_partition_field_message_names_file_field_and_fields_seen(
    prev, tiny_corpus, sp_model_path, capsys
):
    out, before = prev
    argv = _args(tiny_corpus, sp_model_path, out, "--overwrite")
    argv[argv.index("fos")] = "field_of_study"
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --partition-by field_of_study: no document of {tiny_corpus}")
    assert "the first document has fields: fos, id, text, year" in err
    assert _tree(out) == before and _side_dirs(out) == []


def test_crash_mid_overwrite_keeps_the_old_output_and_resumes(
    prev, tiny_corpus, sp_model_path, monkeypatch
):
    out, before = prev
    argv = _args(tiny_corpus, sp_model_path, out, "unit_tokens=5000", "--overwrite")
    real_write, calls = pp._write_unit, []

    def crash(prefix, *a, **k):
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        calls.append(prefix)
        return real_write(prefix, *a, **k)

    monkeypatch.setattr(pp, "_write_unit", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli_main(argv)
    assert _tree(out) == before
    (staging,) = _side_dirs(out)
    assert staging.startswith("data.staging-")
    # as if that process had died: the next run recognises its staging dir and resumes it
    host = socket.gethostname().split(".")[0]
    dead = out.parent / f"data.staging-{host}-{_dead_pid()}"
    os.rename(out.parent / staging, dead)
    written = []
    monkeypatch.setattr(
        pp, "_write_unit", lambda p, *a, **k: written.append(p) or real_write(p, *a, **k)
    )
    assert cli_main(argv) == 0
    assert written and not {os.path.basename(p) for p in calls} & {
        os.path.basename(p) for p in written
    }
    assert _side_dirs(out) == []
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "manifest.json").read_text())["config"]["unit_tokens"] == 5000


def test_overwrite_replaces_with_what_a_fresh_run_writes(prev, tiny_corpus, sp_model_path):
    out, before = prev
    argv = _args(tiny_corpus, sp_model_path, out, "unit_tokens=5000")
    assert cli_main(argv + ["--overwrite"]) == 0
    assert _side_dirs(out) == []
    assert (out / "notes.txt").read_text() == "mine"
    replaced = _tree(out)
    assert replaced != before
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out)
    assert cli_main(argv) == 0  # the same settings into a fresh directory
    fresh = _tree(out)
    fresh_manifest = json.loads((out / "manifest.json").read_text())
    del replaced["notes.txt"]
    assert {k: v for k, v in replaced.items() if k != "manifest.json"} == {
        k: v for k, v in fresh.items() if k != "manifest.json"
    }
    for m in (manifest, fresh_manifest):
        del m["created"], m["timing_s"], m["config"]["overwrite"]
    assert manifest == fresh_manifest


def test_swap_killed_between_its_renames_is_undone(prev, tiny_corpus, sp_model_path, capsys):
    out, before = prev
    host = socket.gethostname().split(".")[0]
    aside = out.parent / f"data.old-{host}-{_dead_pid()}"
    os.rename(out, aside)  # the old output renamed aside, the new one not yet in place
    argv = _args(tiny_corpus + ".typo", sp_model_path, out, "--overwrite")
    assert cli_main(argv) == 2  # even a refused run first puts the old output back
    warning, error = capsys.readouterr().err.splitlines()
    assert warning.startswith("warning: ") and "restored the previous output" in warning
    assert error.startswith("error: ") and "no such file" in error
    assert _tree(out) == before and _side_dirs(out) == []


def test_a_live_replace_is_not_disturbed(prev, tiny_corpus, sp_model_path, capsys):
    out, before = prev
    host = socket.gethostname().split(".")[0]
    live = out.parent / f"data.staging-{host}-{os.getppid()}"
    live.mkdir()
    argv = _args(tiny_corpus, sp_model_path, out, "unit_tokens=5000", "--overwrite")
    _refused(capsys, argv, "another preprocess is replacing it")
    assert _tree(out) == before and live.is_dir()
