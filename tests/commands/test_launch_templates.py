"""`megablocks-ablate launch-templates --out DIR`: the torchrun, mpirun and Slurm templates
shipped in the package, written executable to a claimed directory; a user's files are
never replaced, an earlier copy only with --overwrite (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from claims_fixtures import refused, snapshot

from megablocks_ablate.cli import main
from megablocks_ablate.commands.launch_templates import KIND, TEMPLATES
from megablocks_ablate.utils.outputs import MARKER

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "megablocks_ablate" / "templates" / "launch"


def test_the_table_lists_every_shipped_template_and_tools_launch_links_them():
    assert sorted(TEMPLATES) == sorted(os.listdir(SHIPPED))
    assert len(TEMPLATES) == 5
    for name in TEMPLATES:
        link = REPO / "tools" / "launch" / name
        assert link.is_symlink() and link.resolve() == SHIPPED / name
        assert os.access(SHIPPED / name, os.X_OK)  # runnable from a checkout
    # the Python pool launcher stays a checkout tool (a pip user has `train-pool`)
    assert (REPO / "tools" / "launch" / "local_pool.py").is_file()


def test_writes_every_template_executable_and_lists_them(tmp_path, capsys):
    out = tmp_path / "launch"
    assert main(["launch-templates", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == [str(out / n) for n in TEMPLATES]
    assert sorted(os.listdir(out)) == sorted([*TEMPLATES, MARKER])
    for name in TEMPLATES:
        assert (out / name).read_bytes() == (SHIPPED / name).read_bytes()
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode & 0o100 and (mode & 0o444) >> 2 == mode & 0o111, oct(mode)
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == KIND and marker["files"] == sorted(TEMPLATES)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_written_scripts_parse_and_say_their_usage(tmp_path):
    out = tmp_path / "launch"
    assert main(["launch-templates", "--out", str(out)]) == 0
    for name in TEMPLATES:
        r = subprocess.run(["bash", "-n", str(out / name)], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)
    # run without a config: the one usage line, naming the script where it was written
    r = subprocess.run([str(out / "torchrun_single_node.sh")], capture_output=True, text=True)
    assert r.returncode != 0
    assert f"usage: {out / 'torchrun_single_node.sh'} CONFIG.yaml|PRESET" in r.stderr


def test_an_empty_directory_is_taken(tmp_path):
    out = tmp_path / "launch"
    out.mkdir()
    assert main(["launch-templates", "--out", str(out)]) == 0
    assert (out / "mpirun.sh").is_file()


def test_a_directory_of_user_files_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "mpirun.sh").write_text("my own launcher\n")
    before = snapshot(out)
    rc = main(["launch-templates", "--out", str(out), "--overwrite"])
    refused(capsys, rc, f"--out {out}", "did not write")
    assert snapshot(out) == before


def test_a_file_as_out_is_refused(tmp_path, capsys):
    out = tmp_path / "launch"
    out.write_text("not a directory\n")
    rc = main(["launch-templates", "--out", str(out)])
    refused(capsys, rc, f"--out {out}", "not a directory")
    assert out.read_text() == "not a directory\n"


def test_an_earlier_copy_needs_overwrite_which_keeps_other_files(tmp_path, capsys):
    out = tmp_path / "launch"
    assert main(["launch-templates", "--out", str(out)]) == 0
    (out / "slurm_multi_node.sbatch").write_text("#!/bin/bash\n# edited\n")
    (out / "hosts").write_text("node0\nnode1\n")  # the user's, beside the templates
    capsys.readouterr()
    before = snapshot(out)
    rc = main(["launch-templates", "--out", str(out)])
    refused(capsys, rc, f"--out {out}", "--overwrite")
    assert snapshot(out) == before

    assert main(["launch-templates", "--out", str(out), "--overwrite"]) == 0
    sbatch = out / "slurm_multi_node.sbatch"
    assert sbatch.read_bytes() == (SHIPPED / "slurm_multi_node.sbatch").read_bytes()
    assert (out / "hosts").read_text() == "node0\nnode1\n"


def test_a_user_file_named_like_a_template_in_an_earlier_copy_is_refused(tmp_path, capsys):
    """A copy whose marker does not list a template (an older version's copy) holding a
    file of that name: the file is the user's, so --overwrite refuses before any write."""
    out = tmp_path / "launch"
    assert main(["launch-templates", "--out", str(out)]) == 0
    marker = json.loads((out / MARKER).read_text())
    marker["files"] = [f for f in marker["files"] if f != "mpirun.sh"]
    (out / MARKER).write_text(json.dumps(marker))
    (out / "mpirun.sh").write_text("the user's own\n")
    (out / "torchrun_single_node.sh").write_text("edited\n")
    capsys.readouterr()
    before = snapshot(out)
    rc = main(["launch-templates", "--out", str(out), "--overwrite"])
    refused(capsys, rc, "mpirun.sh exists and was not written by launch-templates")
    assert snapshot(out) == before  # the listed, edited template was not replaced either
