"""`merge --out`: one writer at a time, and `--overwrite` replaces only a merge's own
output, never a trained or imported model or the seed its inputs continue from
(commands/merge.py, docs/reliability.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from claims_fixtures import refused, snapshot

from megablocks_ablate.checkpoint import Lineage, model_hash, save_model_checkpoint
from megablocks_ablate.cli import main


@pytest.fixture
def family(tmp_path) -> tuple[str, dict[str, str]]:
    """(seed dir, {unit: dir}) of a tiny family under tmp_path/models."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "merge"))
    from merge_fixtures import write_family

    return write_family(str(tmp_path / "models"))


def _spec(path, checkpoints: dict[str, str]) -> str:
    path.write_text(yaml.safe_dump({"checkpoints": checkpoints, "uniform": True}))
    return str(path)


def test_overwrite_refuses_a_trained_seed_and_unit(family, tmp_path, capsys):
    seed, units = family
    spec = _spec(tmp_path / "m.yaml", {u: units[u] for u in ("cs_0", "cs_1")})
    before = snapshot(tmp_path / "models")
    rc = main(["merge", "--spec", spec, "--out", seed, "--overwrite"])
    refused(capsys, rc, f"--out {seed}: holds a trained seed model", "lineage kind 'seed'")
    rc = main(["merge", "--spec", spec, "--out", units["bio_0"], "--overwrite"])
    refused(capsys, rc, f"--out {units['bio_0']}: holds a trained unit model", "kind 'unit'")
    rc = main(["merge", "--spec", spec, "--out", seed])  # without --overwrite, as before
    refused(capsys, rc, f"--out {seed}: holds a previous checkpoint output; pass --overwrite")
    assert snapshot(tmp_path / "models") == before


def test_overwrite_refuses_an_imported_model(family, tmp_path, capsys):
    _, units = family
    imported = str(tmp_path / "imported")
    save_model_checkpoint(imported, {"w": torch.zeros(2)}, {}, Lineage(kind="imported"))
    before = snapshot(imported)
    rc = main(["merge", "--spec", _spec(tmp_path / "m.yaml", units), "--out", imported])
    refused(capsys, rc, "pass --overwrite")
    rc = main(["merge", "--spec", str(tmp_path / "m.yaml"), "--out", imported, "--overwrite"])
    refused(capsys, rc, f"--out {imported}: holds an imported model", "kind 'imported'")
    assert snapshot(imported) == before


def test_overwrite_refuses_the_merged_seed_of_its_inputs(family, tmp_path, capsys):
    """A merged checkpoint trained on (a study's seed) is recognised by its hash."""
    _, units = family
    merged_seed = str(tmp_path / "merged_seed")
    assert main(["merge", "--spec", _spec(tmp_path / "a.yaml", units), "--out", merged_seed]) == 0
    h = model_hash(merged_seed)
    children = {}
    for i, unit in enumerate(("x_0", "x_1")):
        d = str(tmp_path / "children" / unit)
        state = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(i))}
        lineage = Lineage(kind="unit", seed_hash=h, units=[unit], weights=[1.0], tokens_seen=10)
        save_model_checkpoint(d, state, {"h": 4}, lineage)
        children[unit] = d
    capsys.readouterr()
    before = snapshot(merged_seed)
    spec = _spec(tmp_path / "b.yaml", children)
    rc = main(["merge", "--spec", spec, "--out", merged_seed, "--overwrite"])
    refused(capsys, rc, f"--out {merged_seed}: is the seed checkpoint the spec's inputs continue")
    assert snapshot(merged_seed) == before


def test_overwrite_refuses_a_checkpoint_an_input_was_merged_from(family, tmp_path, capsys):
    _, units = family
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    spec = _spec(tmp_path / "a.yaml", {u: units[u] for u in ("cs_0", "cs_1")})
    assert main(["merge", "--spec", spec, "--out", first]) == 0
    spec = _spec(tmp_path / "b.yaml", {"cs": first, "bio_0": units["bio_0"]})
    assert main(["merge", "--spec", spec, "--out", second]) == 0
    capsys.readouterr()
    before = snapshot(first)
    spec = _spec(tmp_path / "c.yaml", {"m": second, "cs_0": units["cs_0"]})
    rc = main(["merge", "--spec", spec, "--out", first, "--overwrite"])
    refused(capsys, rc, f"--out {first}: is a checkpoint the input {second} was merged from")
    assert snapshot(first) == before
    # a merge's own output nothing was built from is replaced, as before
    assert main(["merge", "--spec", spec, "--out", str(tmp_path / "third")]) == 0
    assert main(["merge", "--spec", spec, "--out", str(tmp_path / "third"), "--overwrite"]) == 0


def test_a_merge_into_a_locked_output_is_refused_naming_the_holder(family, tmp_path, capsys):
    from megablocks_ablate.utils.output_files import output_lock

    _, units = family
    out = str(tmp_path / "merged")
    spec = _spec(tmp_path / "m.yaml", units)
    with output_lock(out, f"merge --out {out}"):
        rc = main(["merge", "--spec", spec, "--out", out, "--overwrite"])
    refused(capsys, rc, f"merge --out {out} is in progress (pid {os.getpid()} on ")
    assert not os.path.exists(out)
    assert main(["merge", "--spec", spec, "--out", out]) == 0  # released: written
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".lock")]


# A merge that takes 2 s (the tiny one takes milliseconds): two started together overlap.
SLOW_MERGE = """
import sys, time
from megablocks_ablate.merge import file_merge
merge = file_merge.merge_checkpoints
def slow(*args, **kwargs):
    time.sleep(2.0)
    return merge(*args, **kwargs)
file_merge.merge_checkpoints = slow
from megablocks_ablate.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.integration
def test_two_concurrent_merges_to_one_out_do_not_both_succeed(family, tmp_path):
    _, units = family
    out = str(tmp_path / "merged")
    spec = _spec(tmp_path / "m.yaml", units)
    argv = [sys.executable, "-c", SLOW_MERGE, "merge", "--spec", spec, "--out", out, "--overwrite"]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    # with --overwrite, one after the other would both succeed: these overlapped, and the
    # second was refused instead of silently replacing the first one's output
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert f"merge --out {out} is in progress (pid " in err, err
