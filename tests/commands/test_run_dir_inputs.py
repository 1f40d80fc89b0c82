"""`eval`, `merge` and `export-hf` take a training run directory for its final/, and
refuse an unfinished run in one line naming its latest checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml

from megablocks_ablate.checkpoint import Lineage, model_hash, save_model_checkpoint
from megablocks_ablate.cli import main
from megablocks_ablate.utils.hashing import sha256_file


# A tiny-preset model over the 512-piece test tokenizer (as tests/evaluate uses).
def _finished_run(ckpt: str, run: str) -> str:
    """A finished run directory around a copy of ``ckpt``: a step checkpoint, final/,
    and COMPLETE.json as train.state.save_final writes it."""
    os.makedirs(os.path.join(run, "checkpoints"))
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write("seed: 0\n")
    shutil.copytree(ckpt, os.path.join(run, "checkpoints", "step_00000010"))
    shutil.copytree(ckpt, os.path.join(run, "final"))
    record = {
        "step": 20,
        "model_sha256": sha256_file(os.path.join(run, "final", "model.safetensors")),
    }
    with open(os.path.join(run, "COMPLETE.json"), "w") as f:
        json.dump(record, f)
    return run


def _unfinished_run(ckpt: str, run: str) -> tuple[str, str]:
    """``(run, latest step dir)`` of a run killed before final/."""
    for step in (10, 20):
        shutil.copytree(ckpt, os.path.join(run, "checkpoints", f"step_{step:08d}"))
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write("seed: 0\n")
    return run, os.path.join(run, "checkpoints", "step_00000020")


def _refused(capsys, rc: int, run: str, latest: str) -> None:
    """Exit 2 with exactly one `error:` line naming the run and its latest checkpoint."""
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: {run} is a training run that has not finished (no final/); its latest "
        f"checkpoint is {latest}: pass that, or finish the run"
    ]


# ----------------------------------------------------------------------------- eval


def _eval(model: str, eval_set: str, out: str, cache: str) -> int:
    return main(
        ["eval", "--model", model, "--eval-sets", eval_set, "--out", out, "--cache-dir", cache]
    )


def test_eval_reads_a_runs_final(tiny_ckpt, eval_set, tmp_path, capsys):
    run = _finished_run(tiny_ckpt, str(tmp_path / "runs" / "seed"))
    final = os.path.join(run, "final")
    cache = str(tmp_path / "cache")
    assert _eval(run, eval_set, str(tmp_path / "a.json"), cache) == 0
    assert f"using {final} (the run's final checkpoint)" in capsys.readouterr().err
    assert _eval(final, eval_set, str(tmp_path / "b.json"), cache) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert list(a["models"]) == [final]  # recorded under the checkpoint read
    assert a == b


def test_eval_refuses_an_unfinished_run(tiny_ckpt, eval_set, tmp_path, capsys):
    run, latest = _unfinished_run(tiny_ckpt, str(tmp_path / "seed"))
    out = tmp_path / "r.json"
    _refused(capsys, _eval(run, eval_set, str(out), str(tmp_path / "c")), run, latest)
    assert not out.exists() and not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- merge


def _units(root: str) -> dict[str, str]:
    """Two unit checkpoints continued from one seed (tiny tensors, no model needed)."""
    seed = os.path.join(root, "seed")
    save_model_checkpoint(seed, {"w": torch.zeros(3, 4)}, {"h": 4}, Lineage(kind="seed"))
    out = {}
    for i, unit in enumerate(("cs_0", "bio_0")):
        d = os.path.join(root, "units", unit)
        state = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(i))}
        lineage = Lineage(
            kind="unit",
            seed_hash=model_hash(seed),
            units=[unit],
            weights=[1.0],
            tokens_seen=100 * (i + 1),
        )
        save_model_checkpoint(d, state, {"h": 4}, lineage)
        out[unit] = d
    return out


def _merge(spec_path, checkpoints: dict[str, str], out: str) -> int:
    spec = {"checkpoints": checkpoints, "by_tokens": True}
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return main(["merge", "--spec", str(spec_path), "--out", out])


def test_merge_reads_runs_finals(tmp_path, capsys):
    units = _units(str(tmp_path))
    runs = {u: _finished_run(p, str(tmp_path / "runs" / u)) for u, p in units.items()}
    finals = {u: os.path.join(r, "final") for u, r in runs.items()}
    spec = tmp_path / "merge.yaml"
    # run directories, one of them relative to the spec file
    given = dict(runs, cs_0=os.path.relpath(runs["cs_0"], tmp_path))
    assert _merge(spec, given, str(tmp_path / "a")) == 0
    assert f"using {finals['bio_0']} (the run's final checkpoint)" in capsys.readouterr().err
    assert _merge(spec, finals, str(tmp_path / "b")) == 0
    a, b = (str(tmp_path / n) for n in "ab")
    assert sha256_file(os.path.join(a, "model.safetensors")) == sha256_file(
        os.path.join(b, "model.safetensors")
    )
    lineage = json.loads(open(os.path.join(a, "lineage.json")).read())
    assert lineage == json.loads(open(os.path.join(b, "lineage.json")).read())
    assert lineage["parents"] == [os.path.abspath(finals[u]) for u in ("cs_0", "bio_0")]
    assert lineage["weights"] == pytest.approx([1 / 3, 2 / 3])  # by_tokens read final/


def test_merge_refuses_an_unfinished_run(tmp_path, capsys):
    units = _units(str(tmp_path))
    run, latest = _unfinished_run(units["bio_0"], str(tmp_path / "runs" / "bio_0"))
    spec = tmp_path / "merge.yaml"
    rc = _merge(spec, {"cs_0": units["cs_0"], "bio_0": run}, str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: {spec}: checkpoints.bio_0: {run} is a training run that has not finished "
        f"(no final/); its latest checkpoint is {latest}: pass that, or finish the run"
    ]
    assert not (tmp_path / "out").exists()
    # --print-weights reads the same spec
    rc = main(["merge", "--spec", str(spec), "--print-weights"])
    assert rc == 2 and "has not finished" in capsys.readouterr().err


# ----------------------------------------------------------------------------- export-hf


def test_export_hf_reads_a_runs_final(tiny_ckpt, tmp_path, capsys):
    run = _finished_run(tiny_ckpt, str(tmp_path / "runs" / "seed"))
    final = os.path.join(run, "final")
    assert main(["export-hf", run, str(tmp_path / "a")]) == 0
    assert f"using {final} (the run's final checkpoint)" in capsys.readouterr().err
    assert main(["export-hf", final, str(tmp_path / "b")]) == 0
    for name in ("model.safetensors", "config.json", "tokenizer.model", "tokenizer.json"):
        a, b = tmp_path / "a" / name, tmp_path / "b" / name
        assert a.read_bytes() == b.read_bytes(), name


def test_export_hf_refuses_an_unfinished_run(tiny_ckpt, tmp_path, capsys):
    run, latest = _unfinished_run(tiny_ckpt, str(tmp_path / "seed"))
    _refused(capsys, main(["export-hf", run, str(tmp_path / "hf")]), run, latest)
    assert not (tmp_path / "hf").exists()
