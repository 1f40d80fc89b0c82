"""End-to-end training on CPU: seed -> unit lineage, exact resume after SIGKILL, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from conftest import PYTHON, flip_byte, subprocess_env, tiny_overrides

from megablocks_ablate.checkpoint import load_model_checkpoint, model_hash
from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.train import state as st
from megablocks_ablate.train.config import TrainConfig
from megablocks_ablate.train.optim import lr_at
from megablocks_ablate.train.trainer import STEP_DELAY_ENV, train


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def seed_run(train_manifest, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("seed") / "seed")
    cfg = TrainConfig.load(
        None,
        tiny_overrides(
            train_manifest,
            out,
            kind="seed",
            **{"data.mixture": "['*']", "checkpoint.every": 3, "checkpoint.keep_last": 2},
        ),
    )
    summary = train(cfg)
    return cfg, out, summary


def test_seed_run_outputs(seed_run, train_manifest):
    cfg, out, summary = seed_run
    assert summary["steps"] == cfg.train_steps == 8
    assert st.is_complete(out)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    # the logged LR is the schedule's, and the loss goes down from ~ln(512)
    assert [r["lr"] for r in rows] == [lr_at(s, cfg) for s in range(8)]
    assert abs(rows[0]["loss"] - torch.log(torch.tensor(512.0)).item()) < 0.3
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert all(r["tokens"] == 256 * r["step"] and r["tokens_per_s"] > 0 for r in rows)
    # keep_last=2 of the checkpoints at steps 3 and 6 (none at the end: final/ instead)
    assert [s for s, _ in st.list_checkpoints(out)] == [3, 6]
    _, config, lineage = load_model_checkpoint(os.path.join(out, "final"))
    assert lineage.kind == "seed" and lineage.seed_hash is None
    assert lineage.tokens_seen == 8 * 256 and abs(sum(lineage.weights) - 1) < 1e-9
    assert lineage.trained_seq_len == cfg.seq_len == 32  # evaluation's default window
    from megablocks_ablate.data.manifest import Manifest

    assert sorted(lineage.units) == sorted(Manifest.load(train_manifest).units)
    assert config["vocab_size"] == 512
    done = json.load(open(os.path.join(out, "COMPLETE.json")))
    assert done["model_sha256"] == model_hash(os.path.join(out, "final"))
    # a finished run is skipped
    assert train(cfg)["skipped"] is True


def test_unit_from_seed_has_lineage_and_fresh_optimizer(seed_run, train_manifest, tmp_path):
    _, seed_out, _ = seed_run
    seed_final = os.path.join(seed_out, "final")
    out = str(tmp_path / "pool" / "{unit}")
    cfg = TrainConfig.load(
        None,
        tiny_overrides(
            train_manifest,
            out,
            kind="unit",
            init_from=seed_final,
            train_tokens=256 * 4,
            **{"data.unit": "physics-0002", "checkpoint.every": 2},
        ),
    )
    train(cfg)
    unit_dir = str(tmp_path / "pool" / "physics-0002")
    _, _, lineage = load_model_checkpoint(os.path.join(unit_dir, "final"))
    assert lineage.kind == "unit" and lineage.units == ["physics-0002"]
    assert lineage.seed_hash == model_hash(seed_final)
    assert lineage.parents == [seed_final] and lineage.tokens_seen == 4 * 256
    assert lineage.trained_seq_len == 32
    # fresh optimizer: Adam's step count at the unit's step-2 checkpoint is 2, not 8 + 2
    ckpt = st.load_train_checkpoint(st.step_dir(unit_dir, 2))
    steps = {float(v["step"]) for v in ckpt["optim"]["state"].values()}
    assert steps == {2.0}
    # and it started from the seed's weights: step-1 loss is near the seed's final loss
    assert abs(_metrics(unit_dir)[0]["loss"] - _metrics(seed_out)[-1]["loss"]) < 0.5


def test_init_from_a_run_directory_means_its_final(seed_run, train_manifest, tmp_path):
    """``init_from: runs/seed`` (the run directory) trains the same model as ``.../final``
    and records the final/ it read; an unfinished run is refused naming its checkpoint."""
    _, seed_out, _ = seed_run
    outs = {}
    for name, init in (("run", seed_out), ("final", os.path.join(seed_out, "final"))):
        outs[name] = str(tmp_path / name)
        over = tiny_overrides(
            train_manifest,
            outs[name],
            kind="unit",
            init_from=init,
            train_tokens=256 * 2,
            **{"data.unit": "physics-0002"},
        )
        train(TrainConfig.load(None, over))
    _, _, lineage = load_model_checkpoint(os.path.join(outs["run"], "final"))
    assert lineage.parents == [os.path.join(seed_out, "final")]
    assert model_hash(os.path.join(outs["run"], "final")) == model_hash(
        os.path.join(outs["final"], "final")
    )
    unfinished = tmp_path / "unfinished"
    shutil.copytree(seed_out, unfinished)
    os.remove(unfinished / "COMPLETE.json")
    over = tiny_overrides(
        train_manifest,
        str(tmp_path / "x"),
        kind="unit",
        init_from=str(unfinished),
        **{"data.unit": "physics-0002"},
    )
    with pytest.raises(DataFormatError, match="has not finished"):
        train(TrainConfig.load(None, over))
    assert not (tmp_path / "x").exists()


@pytest.mark.integration
def test_resume_after_sigkill_is_bitwise_identical(train_manifest, tmp_path):
    """Kill a run mid-way (SIGKILL) and restart it: same losses and final weights, bit for bit."""
    ov = dict(
        train_tokens=256 * 10,
        kind="seq",
        **{
            "data.mixture": "[biology, physics-0001]",
            "checkpoint.every": 3,
            "checkpoint.keep_last": 1,
        },
    )
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    cmd = [PYTHON, "-m", "megablocks_ablate", "train"]
    p_ref = subprocess.Popen(
        cmd + tiny_overrides(train_manifest, ref, **ov),
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    p = subprocess.Popen(
        cmd + tiny_overrides(train_manifest, killed, **ov),
        env=subprocess_env(**{STEP_DELAY_ENV: "0.15"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline:  # kill once the step-3 checkpoint exists and step 5 ran
        rows = _metrics(killed) if os.path.exists(os.path.join(killed, "metrics.jsonl")) else []
        if st.list_checkpoints(killed) and rows and rows[-1]["step"] >= 5:
            break
        assert p.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not st.is_complete(killed)
    assert [s for s, _ in st.list_checkpoints(killed)] in ([3], [6])
    r = subprocess.run(
        cmd + tiny_overrides(train_manifest, killed, **ov),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert p_ref.wait(timeout=120) == 0, p_ref.stderr.read()
    a, b = _metrics(ref), _metrics(killed)
    assert [x["step"] for x in b] == list(range(1, 11))
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    assert [x["grad_norm"] for x in a] == [x["grad_norm"] for x in b]
    assert model_hash(os.path.join(ref, "final")) == model_hash(os.path.join(killed, "final"))


def test_corrupt_and_incompatible_checkpoints_are_refused(
    seed_run, train_manifest, tmp_path, capsys
):
    import shutil

    cfg, seed_out, _ = seed_run
    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, "checkpoints"))
    shutil.copy(os.path.join(seed_out, "config.yaml"), run)  # a run directory, copied by hand
    src = st.list_checkpoints(seed_out)[-1][1]
    dst = os.path.join(run, "checkpoints", os.path.basename(src))
    shutil.copytree(src, dst)
    args = ["train"] + tiny_overrides(
        train_manifest, run, kind="seed", **{"data.mixture": "['*']", "checkpoint.every": 3}
    )
    # other settings than the run that wrote it
    assert cli_main(args + ["optimizer.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "optimizer" in err and dst in err
    # a flipped bit in the optimizer state
    flip_byte(os.path.join(dst, st.OPTIM_TENSORS))
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and st.OPTIM_TENSORS in err
    # a truncated trainer state
    with open(os.path.join(dst, st.STATE_FILE), "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataFormatError, match="invalid JSON"):
        st.load_train_checkpoint(dst)
    # a missing file
    shutil.rmtree(dst)
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, st.RNG_FILE))
    with pytest.raises(DataFormatError, match="missing checkpoint file"):
        st.load_train_checkpoint(dst)
