"""Shared training fixtures: a tiny preprocessed manifest and a tiny-model config."""

from __future__ import annotations

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def train_manifest(tmp_path_factory, tiny_corpus, sp_model_path) -> str:
    """The tiny corpus preprocessed into 3000-token base units (4 partitions)."""
    from megablocks_ablate.data.preprocess import PreprocessConfig, run_preprocess

    out = tmp_path_factory.mktemp("train-data") / "data"
    run_preprocess(
        PreprocessConfig.from_dict(
            dict(
                input=[tiny_corpus],
                out=str(out),
                tokenizer=sp_model_path,
                partition_by=["fos"],
                order_by="year",
                unit_tokens=3000,
                heldout_fraction=0.05,
                workers=1,
            )
        )
    )
    return str(out)


def tiny_overrides(manifest: str, out_dir: str, **extra) -> list[str]:
    """key=value overrides giving a run of a few steps of the tiny model on CPU."""
    base = {
        "model": "tiny",
        "model_overrides": "[vocab_size=512]",
        "data.manifest": manifest,
        "out_dir": out_dir,
        "seq_len": 32,
        "global_batch_tokens": 256,
        "micro_batch": 4,
        "train_tokens": 256 * 8,
        "optimizer.lr": 3e-3,
        "schedule.warmup_steps": 2,
        "schedule.min_lr": 3e-4,
        "device": "cpu",
        "logging.every": 1,
        "logging.progress": False,
        "logging.tensorboard": False,
        "checkpoint.every": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def subprocess_env(**extra) -> dict:
    """Environment for child training processes: 1 thread each, repo importable."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MBA_NO_PROGRESS="1",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


PYTHON = sys.executable


def flip_byte(path, offset_from_end=3):
    """Corrupt one byte near the end of a file, keeping its size (a changed file)."""
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        b = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


def tree_sha256(root: str) -> dict[str, str]:
    """Every directory and file under ``root``, hidden ones too, with each file's sha256:
    equal snapshots mean nothing was added, removed or changed by a single byte."""
    import hashlib

    found = {}
    for dirpath, _, filenames in os.walk(root):
        found[os.path.relpath(dirpath, root) + os.sep] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


def one_error_line(capsys) -> str:
    """The one ``error: ...`` line the CLI printed (log lines go to stderr too)."""
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def read_complete(out_dir: str) -> dict:
    """A finished run's COMPLETE.json."""
    from megablocks_ablate.train import state as st

    with open(os.path.join(out_dir, st.COMPLETE_FILE), encoding="utf-8") as f:
        return json.load(f)


def assert_nothing_final(out_dir: str) -> None:
    """Neither COMPLETE.json nor final/: the run was not certified."""
    from megablocks_ablate.train import state as st

    assert not os.path.exists(os.path.join(out_dir, st.COMPLETE_FILE))
    assert not os.path.exists(os.path.join(out_dir, st.FINAL_DIR))
