"""``Lineage.trained_seq_len``: recorded, read back, inherited by merges, and the fallback
for checkpoints written before it was recorded (checkpoint/lineage.py)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from megablocks_ablate.checkpoint import (
    Lineage,
    merged_seq_len,
    read_checkpoint_meta,
    save_model_checkpoint,
    trained_seq_len,
)
from megablocks_ablate.errors import DataFormatError


def test_round_trip_and_validation(tmp_path):
    d = str(tmp_path / "ckpt")
    save_model_checkpoint(
        d, {"w": torch.zeros(2)}, {"max_seq_len": 64}, Lineage("seed", trained_seq_len=32)
    )
    _, lin = read_checkpoint_meta(d)
    assert lin.trained_seq_len == 32 and lin.recorded_seq_len() == 32
    with open(os.path.join(d, "lineage.json")) as f:
        assert json.load(f)["trained_seq_len"] == 32
    for bad in (0, -4, 3.5, True, "64"):
        with pytest.raises(DataFormatError, match="field 'trained_seq_len' must be a positive"):
            Lineage.from_dict({"kind": "seed", "trained_seq_len": bad}, path="x/lineage.json")


def test_older_lineages_read_the_trainers_record_or_none():
    # written before the field: the trainer's extra.seq_len is the same record
    assert Lineage("unit", extra={"seq_len": 256}).recorded_seq_len() == 256
    assert Lineage.from_dict({"kind": "unit"}).recorded_seq_len() is None
    assert Lineage("merged", extra={"seq_len": "long"}).recorded_seq_len() is None
    # the field wins over the older record
    assert Lineage("unit", trained_seq_len=64, extra={"seq_len": 256}).recorded_seq_len() == 64


def test_unrecorded_falls_back_to_max_seq_len_with_one_warning(caplog):
    old = Lineage("imported")
    with caplog.at_level(logging.WARNING, logger="megablocks_ablate.checkpoint.lineage"):
        assert trained_seq_len(old, 512, "runs/old-ckpt-a") == 512
        assert trained_seq_len(old, 512, "runs/old-ckpt-a") == 512
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # once per checkpoint
    assert "runs/old-ckpt-a" in warnings[0] and "max_seq_len=512" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megablocks_ablate.checkpoint.lineage"):
        # recorded: no warning, and never above the model's max_seq_len
        assert trained_seq_len(Lineage("seed", trained_seq_len=256), 512, "runs/new") == 256
        assert trained_seq_len(Lineage("seed", trained_seq_len=1024), 512, "runs/new") == 512
    assert not caplog.records


def test_merges_inherit_the_minimum(caplog):
    same = {"a": Lineage("unit", trained_seq_len=64), "b": Lineage("unit", extra={"seq_len": 64})}
    with caplog.at_level(logging.WARNING, logger="megablocks_ablate.checkpoint.lineage"):
        assert merged_seq_len(same) == 64
    assert not caplog.records
    differ = {"a": Lineage("unit", trained_seq_len=64), "b": Lineage("unit", trained_seq_len=32)}
    with caplog.at_level(logging.WARNING, logger="megablocks_ablate.checkpoint.lineage"):
        assert merged_seq_len(differ, "m.yaml") == 32
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("m.yaml:") and "a 64, b 32" in msg and "minimum, 32" in msg
    caplog.clear()
    unknown = {"a": Lineage("unit", trained_seq_len=64), "old": Lineage("unit")}
    with caplog.at_level(logging.WARNING, logger="megablocks_ablate.checkpoint.lineage"):
        assert merged_seq_len(unknown, "m.yaml") is None  # its reader falls back and warns
    assert "input old records no trained_seq_len" in caplog.records[0].getMessage()


def test_paths_are_recorded_relative_to_the_checkpoint(tmp_path, monkeypatch):
    """Parents and the tokenizer record travel with the checkpoint (utils/paths.py): a
    path given relative is stored relative to the checkpoint directory and read back
    against it; an absolute one is kept as given."""
    (tmp_path / "study" / "seed").mkdir(parents=True)
    (tmp_path / "study" / "tok.model").write_bytes(b"t")
    monkeypatch.chdir(tmp_path)
    lin = Lineage(
        "unit",
        parents=["study/seed", "/abs/other"],
        extra={"tokenizer": {"path": "study/tok.model", "fingerprint": "f"}},
    )
    d = os.path.join("study", "pool", "u", "final")
    save_model_checkpoint(d, {"w": torch.zeros(2)}, {"max_seq_len": 8}, lin)
    with open(os.path.join(d, "lineage.json")) as f:
        raw = json.load(f)
    up3 = os.path.join("..", "..", "..")
    assert raw["parents"] == [os.path.join(up3, "seed"), "/abs/other"]
    assert raw["extra"]["tokenizer"] == {"path": os.path.join(up3, "tok.model"), "fingerprint": "f"}
    assert lin.parents == ["study/seed", "/abs/other"]  # the object is not changed
    # the study moves and is read from elsewhere: the same files, relative to here
    os.rename(tmp_path / "study", tmp_path / "moved")
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path / "x")
    _, got = read_checkpoint_meta(str(tmp_path / "moved" / "pool" / "u" / "final"))
    assert got.parents == [os.path.join("..", "moved", "seed"), "/abs/other"]
    assert got.extra["tokenizer"]["path"] == os.path.join("..", "moved", "tok.model")
    assert os.path.isfile(got.extra["tokenizer"]["path"])


def test_an_older_lineage_relative_to_the_working_directory_is_still_read(tmp_path, monkeypatch):
    (tmp_path / "tok.model").write_bytes(b"t")
    d = tmp_path / "ckpt"
    save_model_checkpoint(str(d), {"w": torch.zeros(2)}, {"max_seq_len": 8}, Lineage("seed"))
    with open(d / "lineage.json") as f:
        raw = json.load(f)
    raw["extra"]["tokenizer"] = "tok.model"  # as the trainer's working directory had it
    (d / "lineage.json").write_text(json.dumps(raw))
    monkeypatch.chdir(tmp_path)
    assert read_checkpoint_meta(str(d))[1].extra["tokenizer"] == "tok.model"
    (d / "tok.model").write_bytes(b"u")  # beside the checkpoint too: that one
    assert read_checkpoint_meta(str(d))[1].extra["tokenizer"] == os.path.join("ckpt", "tok.model")
