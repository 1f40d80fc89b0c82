"""Trainer-state I/O pieces: optimizer flattening, RNG states, pruning, stale staging."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.train import state as st


def test_optimizer_state_flatten_round_trip():
    osd = {
        "state": {
            "layers.0.w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3), "note": "x"}
        },
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["layers.0.w"]}],
    }
    tensors, meta = st.flatten_optimizer_state(osd)
    assert set(tensors) == {"layers.0.w/step", "layers.0.w/exp_avg"}
    back = st.unflatten_optimizer_state(tensors, meta)
    assert back["param_groups"] == osd["param_groups"]
    assert back["state"]["layers.0.w"]["note"] == "x"
    assert torch.equal(
        back["state"]["layers.0.w"]["exp_avg"], osd["state"]["layers.0.w"]["exp_avg"]
    )


def test_rng_state_round_trip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    saved = st.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    st.set_rng_state(saved)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_prune_and_stale_staging(tmp_path):
    out = str(tmp_path)
    for step in (2, 4, 6):
        os.makedirs(st.step_dir(out, step))
    stale = os.path.join(out, "checkpoints", ".step_00000008.abc.tmp")
    os.makedirs(stale)
    assert [s for s, _ in st.list_checkpoints(out)] == [2, 4, 6]
    st.prune_checkpoints(out, keep_last=2)
    assert [s for s, _ in st.list_checkpoints(out)] == [4, 6]
    st.remove_stale_staging(out)
    assert not os.path.exists(stale)
    assert not st.is_complete(out)


def test_recorded_model_sha256(tmp_path):
    run = tmp_path / "run"
    final = run / st.FINAL_DIR
    final.mkdir(parents=True)
    assert st.recorded_model_sha256(str(final)) == (None, "")  # the run never completed
    complete = run / st.COMPLETE_FILE
    complete.write_text(json.dumps({"step": 3, "model_sha256": "ab" * 32}))
    assert st.recorded_model_sha256(str(final)) == ("ab" * 32, str(complete))
    complete.write_text(json.dumps({"step": 3}))
    with pytest.raises(DataFormatError, match="COMPLETE.json: no valid sha256"):
        st.recorded_model_sha256(str(final))
    # a step checkpoint: the hash in its trainer_state.json
    step = tmp_path / "run" / st.CHECKPOINTS_DIR / "step_00000004"
    step.mkdir(parents=True)
    state = {
        "format": st.STATE_FORMAT,
        "step": 4,
        "consumed_samples": 32,
        "tokens_seen": 1024,
        "config": {},
        "rng": [],
        "sha256": {"model.safetensors": "cd" * 32},
    }
    (step / st.STATE_FILE).write_text(json.dumps(state))
    assert st.recorded_model_sha256(str(step)) == ("cd" * 32, str(step / st.STATE_FILE))
    assert st.recorded_model_sha256(str(tmp_path)) == (None, "")  # from elsewhere
