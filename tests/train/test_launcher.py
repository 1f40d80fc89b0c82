"""The local pool launcher: one unit model per slot, queueing, idempotent reruns."""

from __future__ import annotations

import logging
import os

import pytest
import yaml
from conftest import subprocess_env, tiny_overrides, tree_sha256

from megablocks_ablate.checkpoint import load_model_checkpoint
from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.train.launcher import parse_slots, run_pool
from megablocks_ablate.train.state import is_complete

pytestmark = pytest.mark.integration  # trains unit models in subprocesses


def test_parse_slots():
    slots = parse_slots("cpu:2", cpu_count=8)
    assert [s.name for s in slots] == ["cpu0", "cpu1"]
    assert dict(slots[0].env) == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "4"}
    gpus = parse_slots("0,3")
    assert [dict(s.env)["CUDA_VISIBLE_DEVICES"] for s in gpus] == ["0", "3"]
    for bad in ("cpu:x", "cpu:0", "a,b", ","):
        with pytest.raises(ConfigError):
            parse_slots(bad)


def _pool_yaml(tmp_path, manifest, **extra):
    data = {}
    for item in tiny_overrides(
        manifest, str(tmp_path / "pool" / "{unit}"), train_tokens=256 * 2, **extra
    ):
        key, value = item.split("=", 1)
        node = data
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
    path = tmp_path / "unit.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_pool_trains_queued_units_and_skips_complete_ones(
    train_manifest, tmp_path, monkeypatch, caplog
):
    for k, v in subprocess_env().items():
        monkeypatch.setenv(k, v)
    config = _pool_yaml(tmp_path, train_manifest)
    units = ["history-0000", "physics-0003"]
    caplog.set_level(logging.INFO, logger="megablocks_ablate")
    result = run_pool(config, [], parse_slots("cpu:1", cpu_count=2), units)
    logs = [r.getMessage() for r in caplog.records if r.name.endswith("launcher")]
    assert result == {u: "done" for u in units}
    for u in units:
        out = str(tmp_path / "pool" / u)
        assert is_complete(out)
        assert load_model_checkpoint(os.path.join(out, "final"))[2].units == [u]
        assert os.path.getsize(os.path.join(out, "train.log")) > 0
    # one slot: the second unit was queued until the first finished
    started = [i for i, line in enumerate(logs) if "started" in line]
    finished = [i for i, line in enumerate(logs) if line.endswith(" done")]
    assert len(started) == 2 and finished[0] < started[1]
    # idempotent: a rerun skips the finished units
    result = run_pool(config, [], parse_slots("cpu:2", cpu_count=2), units)
    assert result == {u: "skipped" for u in units}
    # a finished unit is compared with the request, as `train` compares it: other
    # logging is reused, another lr is refused naming the field, and nothing is touched
    before = tree_sha256(str(tmp_path / "pool"))
    result = run_pool(config, ["logging.every=5"], parse_slots("cpu:1", cpu_count=2), units)
    assert result == {u: "skipped" for u in units}
    caplog.clear()
    result = run_pool(config, ["optimizer.lr=0.01"], parse_slots("cpu:1", cpu_count=2), units)
    assert all(r.startswith("failed") for r in result.values()), result
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all("optimizer.lr: recorded 0.003 vs now 0.01" in e for e in errors)
    assert tree_sha256(str(tmp_path / "pool")) == before


def test_pool_reports_failures_and_bad_configs(train_manifest, tmp_path, monkeypatch, capsys):
    for k, v in subprocess_env().items():
        monkeypatch.setenv(k, v)
    # a unit whose run fails (seq_len beyond the model's max_seq_len) -> exit 1, others unaffected
    config = _pool_yaml(tmp_path, train_manifest, seq_len=256, global_batch_tokens=1024)
    assert (
        cli_main(
            ["train-pool", "--config", config, "--devices", "cpu:1", "--units", "history-0000"]
        )
        == 1
    )
    assert "1 failed" in capsys.readouterr().out
    # out_dir without {unit} is refused before anything runs
    assert cli_main(["train-pool", "--config", config, "out_dir=" + str(tmp_path / "same")]) == 2
    assert "{unit}" in capsys.readouterr().err
