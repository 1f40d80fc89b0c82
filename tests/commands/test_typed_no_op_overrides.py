"""A `key=value` a user types on `train` or `config show` that changes nothing is
reported (a warning naming it), as for study specs (tests/ablate/test_spec_no_ops.py);
the overrides a program adds itself (train's unit choice) are not."""

import logging

import pytest

from megablocks_ablate import config as config_mod
from megablocks_ablate.cli import main


@pytest.fixture(autouse=True)
def fresh_reports(monkeypatch):
    monkeypatch.setattr(config_mod, "_REPORTED_NO_OPS", set())


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_config_show_reports_an_override_already_in_place(caplog, capsys):
    caplog.set_level(logging.WARNING)
    assert main(["config", "show", "train", "tiny_seed", "seq_len=64", "optimizer.lr=1e-3"]) == 0
    warned = _warnings(caplog)
    assert len(warned) == 1 and "seq_len=64 changes nothing" in warned[0], warned
    assert "seq_len: 64" in capsys.readouterr().out


def test_train_print_config_reports_it_too(caplog, capsys):
    caplog.set_level(logging.WARNING)
    rc = main(["train", "--config", "tiny_seed", "--print-config", "seq_len=64"])
    assert rc == 0
    warned = _warnings(caplog)
    assert len(warned) == 1 and "seq_len=64 changes nothing" in warned[0], warned
