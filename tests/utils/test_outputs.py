"""Output directories: a user's files survive every command; ours are replaced on request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from megablocks_ablate.checkpoint import load_model_checkpoint, save_model_checkpoint
from megablocks_ablate.checkpoint.lineage import Lineage
from megablocks_ablate.cli import main
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils import outputs as out_mod
from megablocks_ablate.utils.outputs import claim_output_dir, output_kind, sweep_stale_temporaries


def _user_dir(path) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "notes.txt"), "w") as f:
        f.write("my thesis draft\n")
    return str(path)


def test_claim_refuses_a_users_directory_and_keeps_it(tmp_path):
    d = _user_dir(tmp_path / "mine")
    for kind in ("checkpoint", "train-run", "study", "demo", "preprocess"):
        with pytest.raises(
            ConfigError, match=r"files megablocks-ablate did not write \(notes\.txt\)"
        ):
            claim_output_dir(d, kind, overwrite=True, reuse=True)
    assert os.listdir(d) == ["notes.txt"]


def test_claim_new_empty_ours_and_other_kinds(tmp_path):
    d = str(tmp_path / "run")
    assert claim_output_dir(d, "study", reuse=True) is False
    assert output_kind(d) == "study"
    open(os.path.join(d, "results.sqlite"), "w").close()
    assert claim_output_dir(d, "study", reuse=True) is True  # resumed
    with pytest.raises(ConfigError, match="holds a study output"):
        claim_output_dir(d, "demo", reuse=True)
    with pytest.raises(ConfigError, match="pass --overwrite"):
        claim_output_dir(d, "study")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        claim_output_dir(str(f), "study")
    assert f.read_text() == "x"


def test_outputs_written_before_markers_are_recognised(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    save_model_checkpoint(ckpt, {"w": __import__("torch").zeros(2)}, {}, Lineage(kind="seed"))
    assert output_kind(ckpt) == "checkpoint"
    (tmp_path / "pp").mkdir()
    (tmp_path / "pp" / "manifest.json").write_text("{}")
    assert output_kind(str(tmp_path / "pp")) == "preprocess"


def test_output_equal_to_or_inside_an_input_is_refused(tmp_path):
    inp = _user_dir(tmp_path / "in")
    with pytest.raises(ConfigError, match="is the input"):
        claim_output_dir(inp, "checkpoint", inputs=[inp], overwrite=True)
    with pytest.raises(ConfigError, match="is inside the input"):
        claim_output_dir(os.path.join(inp, "sub"), "checkpoint", inputs=[inp])
    assert not os.path.exists(os.path.join(inp, "sub"))


def test_stale_temporaries_of_dead_writers_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = out_mod.tmp_tag().rsplit("-", 1)[0]
    stale = tmp_path / f".merged.{host}-{dead.pid}.abc123.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".merged.{out_mod.tmp_tag()}.def456.tmp"  # our own: in progress
    live.mkdir()
    other = tmp_path / f".other.{host}-{dead.pid}.abc123.tmp"
    other.mkdir()
    assert sweep_stale_temporaries(str(tmp_path), "merged") == [str(stale)]
    assert live.exists() and other.exists()


# --------------------------------------------------------------------------- commands


@pytest.fixture
def merge_spec(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "merge"))
    from merge_fixtures import write_family

    _, ckpts = write_family(str(tmp_path / "models"))
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"checkpoints": ckpts, "uniform": True}))
    return str(path), ckpts


def test_merge_never_deletes_a_users_directory(merge_spec, tmp_path, capsys):
    spec, ckpts = merge_spec
    mine = _user_dir(tmp_path / "mine")
    assert main(["merge", "--spec", spec, "--out", mine, "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert os.listdir(mine) == ["notes.txt"]
    cwd = os.getcwd()
    os.chdir(mine)
    try:  # `--out .` in a user's directory
        assert main(["merge", "--spec", spec, "--out", "."]) == 2
    finally:
        os.chdir(cwd)
    assert os.listdir(mine) == ["notes.txt"]


def test_merge_refuses_to_write_over_its_input(merge_spec, capsys):
    spec, ckpts = merge_spec
    before = load_model_checkpoint(ckpts["cs_0"])[0]
    assert main(["merge", "--spec", spec, "--out", ckpts["cs_0"], "--overwrite"]) == 2
    assert "is the input" in capsys.readouterr().err
    after = load_model_checkpoint(ckpts["cs_0"])[0]
    assert all((before[k] == after[k]).all() for k in before)


def test_merge_overwrite_replaces_only_its_own_files(merge_spec, tmp_path, capsys):
    spec, _ = merge_spec
    out = str(tmp_path / "merged")
    assert main(["merge", "--spec", spec, "--out", out]) == 0
    assert main(["merge", "--spec", spec, "--out", out]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    (tmp_path / "merged" / "README.md").write_text("about this merge\n")
    assert main(["merge", "--spec", spec, "--out", out, "--overwrite"]) == 0
    assert (tmp_path / "merged" / "README.md").read_text() == "about this merge\n"
    assert load_model_checkpoint(out)[2].kind == "merged"
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".tmp", ".old"))]


def _tiny_checkpoint(path) -> str:
    from megablocks_ablate.model.config import ModelConfig

    cfg = ModelConfig.from_preset("tiny", [])
    save_model_checkpoint(str(path), cfg.build().state_dict(), cfg.to_dict(), Lineage(kind="seed"))
    return str(path)


def test_export_hf_overwrite_keeps_user_files(tmp_path, capsys):
    ckpts = {"cs_0": _tiny_checkpoint(tmp_path / "ckpt")}
    out = str(tmp_path / "hf")
    assert main(["export-hf", ckpts["cs_0"], out]) == 0
    assert output_kind(out) == "hf-export"
    (tmp_path / "hf" / "eval_results.json").write_text("{}")
    assert main(["export-hf", ckpts["cs_0"], out]) == 2
    assert main(["export-hf", ckpts["cs_0"], out, "--overwrite"]) == 0
    assert (tmp_path / "hf" / "eval_results.json").read_text() == "{}"
    mine = _user_dir(tmp_path / "mine")
    assert main(["import-hf", out, mine, "--overwrite"]) == 2
    assert os.listdir(mine) == ["notes.txt"]


@pytest.mark.integration
def test_a_killed_merge_leaves_no_temporaries_after_the_next_run(merge_spec, tmp_path):
    """SIGKILL inside the staged write, then a successful rerun: no hidden leftovers."""
    spec, _ = merge_spec
    out = str(tmp_path / "merged")
    code = (
        "import sys, time; from megablocks_ablate.checkpoint import staging as s\n"
        "orig = s.fsync_path\n"
        "def slow(p):\n"
        "    open(sys.argv[1], 'w').close(); time.sleep(60)\n"
        "s.fsync_path = slow\n"
        "from megablocks_ablate.cli import main\n"
        f"main(['merge', '--spec', {spec!r}, '--out', {out!r}])\n"
    )
    flag = str(tmp_path / "in-staging")
    p = subprocess.Popen([sys.executable, "-c", code, flag])
    deadline = time.time() + 60
    while not os.path.exists(flag) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".merged.")]
    assert leftovers and not os.path.exists(out)
    assert main(["merge", "--spec", spec, "--out", out]) == 0
    assert [n for n in os.listdir(tmp_path) if n.startswith(".merged.")] == []


def test_train_refuses_a_foreign_out_dir(tmp_path, capsys):
    mine = _user_dir(tmp_path / "mine")
    rc = main(
        [
            "train",
            "--config",
            "tiny_seed",
            f"out_dir={mine}",
            f"data.manifest={tmp_path / 'nodata'}",
        ]
    )
    assert rc == 2 and "did not write" in capsys.readouterr().err
    assert os.listdir(mine) == ["notes.txt"]


def test_preprocess_sweeps_half_written_files_of_a_killed_run(tmp_path, tiny_corpus, sp_model_path):
    from megablocks_ablate.data.preprocess import PreprocessConfig, run_preprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = out_mod.tmp_tag().rsplit("-", 1)[0]
    claim_output_dir(str(tmp_path / "data"), "preprocess", reuse=True)  # the killed run's
    units = tmp_path / "data" / "units"
    units.mkdir(parents=True)
    leftover = units / f".fos-0000.bin.{host}-{dead.pid}.x1y2z3.tmp"
    leftover.write_bytes(b"\0" * 1000)
    run_preprocess(
        PreprocessConfig.from_dict(
            dict(
                input=[tiny_corpus],
                out=str(tmp_path / "data"),
                tokenizer=sp_model_path,
                partition_by=["fos"],
                unit_tokens=3000,
                workers=1,
            )
        )
    )
    assert not leftover.exists()
    assert not [n for n in os.listdir(units) if n.endswith(".tmp")]
