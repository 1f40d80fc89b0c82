"""More outputs claimed: `export-hf OUT`, `import-hf OUT`, `study export --out` and
`study optimize --out` refuse a user's file or directory, another kind of output or an
input in one `error:` line naming it, every byte left as it was; replace their own
earlier output only as documented; and one writer at a time (docs/reliability.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from claims_fixtures import refused, snapshot

from megablocks_ablate.checkpoint import Lineage, save_model_checkpoint
from megablocks_ablate.cli import main
from megablocks_ablate.utils.outputs import output_kind


def _checkpoint(path, kind: str = "seed") -> str:
    from megablocks_ablate.model.config import ModelConfig

    cfg = ModelConfig.from_preset("tiny", ["vocab_size=512", "max_seq_len=32"])
    save_model_checkpoint(str(path), cfg.build().state_dict(), cfg.to_dict(), Lineage(kind=kind))
    return str(path)


def _user_dir(path) -> str:
    os.makedirs(path)
    (path / "notes.txt").write_text("mine\n")
    return str(path)


# ----------------------------------------------------------------------------- export-hf


def test_export_hf_refuses_a_users_dir_another_output_and_its_input(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt")
    other = _checkpoint(tmp_path / "other")
    mine = _user_dir(tmp_path / "mine")
    before = snapshot(tmp_path)
    for flags in ([], ["--overwrite"]):
        rc = main(["export-hf", ckpt, mine, *flags])
        refused(capsys, rc, f"OUT {mine}: exists and holds files megablocks-ablate did not write")
        rc = main(["export-hf", ckpt, other, *flags])
        refused(capsys, rc, f"OUT {other}: exists and holds a checkpoint output")
        rc = main(["export-hf", ckpt, os.path.join(ckpt, "hf"), *flags])
        refused(capsys, rc, f"OUT {os.path.join(ckpt, 'hf')}: is inside the input {ckpt}")
    assert snapshot(tmp_path) == before
    assert not any(n.endswith(".lock") for n in os.listdir(tmp_path))


def test_export_hf_replaces_its_own_export_only_with_overwrite(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt")
    out = str(tmp_path / "hf")
    assert main(["export-hf", ckpt, out]) == 0
    first = snapshot(out)
    capsys.readouterr()
    refused(capsys, main(["export-hf", ckpt, out]), f"OUT {out}: holds a previous hf-export")
    assert snapshot(out) == first
    inode = os.stat(os.path.join(out, "model.safetensors")).st_ino
    assert main(["export-hf", ckpt, out, "--overwrite"]) == 0
    assert output_kind(out) == "hf-export" and snapshot(out) == first  # same model, rewritten
    assert os.stat(os.path.join(out, "model.safetensors")).st_ino != inode


# A command whose write waits for a go-file, so two of them overlap for sure.
SLOW = """
import os, sys, time
from megablocks_ablate.model import hf
real = hf.{fn}
def slow(*args, **kwargs):
    open(sys.argv[1] + ".ready", "w").close()
    while not os.path.exists(sys.argv[1] + ".go"):
        time.sleep(0.05)
    return real(*args, **kwargs)
hf.{fn} = slow
from megablocks_ablate.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_concurrent_imports_to_one_out_do_not_both_succeed(tmp_path, capsys):
    src = str(tmp_path / "hf")
    assert main(["export-hf", _checkpoint(tmp_path / "ckpt"), src]) == 0
    capsys.readouterr()
    out = str(tmp_path / "imported")
    sync = str(tmp_path / "sync")
    code = SLOW.format(fn="import_hf")
    first = subprocess.Popen(
        [sys.executable, "-c", code, sync, "import-hf", src, out, "--overwrite"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(sync + ".ready"):  # the first holds the lock, mid-write
            assert first.poll() is None and time.monotonic() < deadline, first.stderr
            time.sleep(0.05)
        rc = main(["import-hf", src, out, "--overwrite"])
        refused(capsys, rc, f"import-hf {out} is in progress (pid {first.pid} on ")
        assert not os.path.exists(out)  # the second wrote nothing
    finally:
        open(sync + ".go", "w").close()
        assert first.wait(timeout=120) == 0, first.stderr.read() if first.stderr else ""
    assert output_kind(out) == "checkpoint"
    assert main(["import-hf", src, out, "--overwrite"]) == 0  # one after the other: fine


# ----------------------------------------------------------------------------- import-hf


def test_import_hf_refuses_a_users_dir_and_a_trained_or_merged_model(tmp_path, capsys):
    src = str(tmp_path / "hf")
    assert main(["export-hf", _checkpoint(tmp_path / "ckpt"), src]) == 0
    capsys.readouterr()
    mine = _user_dir(tmp_path / "mine")
    seed = _checkpoint(tmp_path / "seed")
    merged = _checkpoint(tmp_path / "merged", kind="merged")
    before = snapshot(tmp_path)
    for flags in ([], ["--overwrite"]):
        rc = main(["import-hf", src, mine, *flags])
        refused(capsys, rc, f"OUT {mine}: exists and holds files megablocks-ablate did not write")
        rc = main(["import-hf", src, src, *flags])
        refused(capsys, rc, f"OUT {src}: is the input {src}")
    for victim, kind in ((seed, "seed"), (merged, "merged")):
        rc = main(["import-hf", src, victim, "--overwrite"])
        refused(capsys, rc, f"OUT {victim}: holds a checkpoint of lineage kind {kind!r}")
    assert snapshot(tmp_path) == before


def test_import_hf_replaces_its_own_import_only_with_overwrite(tmp_path, capsys):
    src = str(tmp_path / "hf")
    assert main(["export-hf", _checkpoint(tmp_path / "ckpt"), src]) == 0
    out = str(tmp_path / "imported")
    assert main(["import-hf", src, out]) == 0
    first = snapshot(out)
    capsys.readouterr()
    refused(capsys, main(["import-hf", src, out]), f"OUT {out}: holds a previous checkpoint")
    assert snapshot(out) == first
    assert main(["import-hf", src, out, "--overwrite"]) == 0
    assert snapshot(out)["model.safetensors"] == first["model.safetensors"]


# ----------------------------------------------------------------------------- study


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[str, str, list[str]]:
    """(spec path, data dir, partitions) of the tiny study: data built, nothing trained."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "ablate"))
    from runner_fixtures import tiny_study_spec

    root = tmp_path_factory.mktemp("study")
    spec, path = tiny_study_spec(root)
    return path, spec["data"], list(spec["partitions"])


def test_study_export_refuses_a_users_file_and_an_input(study, tmp_path, capsys):
    spec, data, (a, b, *_) = study
    users = tmp_path / "blend.yaml"
    users.write_text("data: mine\n")
    before = snapshot(tmp_path)
    argv = ["study", "export", spec, "--mixture", f"{a},{b}"]
    for flags in ([], ["--overwrite"]):
        rc = main([*argv, "--out", str(users), *flags])
        refused(capsys, rc, f"--out {users}: exists and is a file megablocks-ablate did not write")
        rc = main([*argv, "--out", spec, *flags])
        refused(capsys, rc, f"--out {spec}: is the input {spec}")
        inside = os.path.join(data, "blend.yaml")
        rc = main([*argv, "--out", inside, *flags])
        refused(capsys, rc, f"--out {inside}: is inside the input")
    assert snapshot(tmp_path) == before
    assert not os.path.exists(os.path.join(data, "blend.yaml"))


def test_study_export_replaces_its_own_file_only_with_overwrite(study, tmp_path, capsys):
    spec, _, (a, b, *_) = study
    out = str(tmp_path / "blend.txt")
    argv = ["study", "export", spec, "--mixture", f"{a}=0.5,{b}=0.5", "--format", "megatron"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert main([*argv, "--out", out]) == 0
    assert open(out).read() == printed and printed.strip()
    capsys.readouterr()
    refused(capsys, main([*argv, "--out", out]), f"--out {out}: holds a previous study-export")
    assert main([*argv[:-1], "train", "--out", out, "--overwrite"]) == 0
    assert open(out).read().startswith("data:")


def test_study_optimize_refuses_a_users_file_an_input_and_a_second_writer(study, tmp_path, capsys):
    from megablocks_ablate.utils.output_files import output_lock

    spec, _, _ = study
    users = tmp_path / "opt.json"
    users.write_text('{"mine": true}\n')
    before = snapshot(tmp_path)
    argv = ["study", "optimize", spec, "--budget", "2"]
    refused(capsys, main([*argv, "--out", str(users)]), f"--out {users}: exists and is not")
    refused(capsys, main([*argv, "--out", spec]), f"--out {spec}: is the input {spec}")
    out = str(tmp_path / "new.json")
    with output_lock(out, f"study optimize --out {out}"):
        rc = main([*argv, "--out", out])
    refused(capsys, rc, f"study optimize --out {out} is in progress (pid {os.getpid()} on ")
    assert snapshot(tmp_path) == before and not os.path.exists(out)
