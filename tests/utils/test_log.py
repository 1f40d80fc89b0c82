"""Rank-aware logging: rank 0 by default, any rank on demand, warnings from every rank."""

from __future__ import annotations

import logging

import pytest

from megablocks_ablate.utils.log import parse_ranks, setup_logging

log = logging.getLogger("megablocks_ablate.tests")


def _emit(monkeypatch, capsys, rank: int, world: int, ranks: str | None) -> str:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    setup_logging("INFO", ranks)
    log.info("info line")
    log.warning("warning line")
    log.debug("debug line")
    return capsys.readouterr().err


def test_single_process_lines_have_no_rank_prefix(monkeypatch, capsys):
    err = _emit(monkeypatch, capsys, 0, 1, None)
    assert err.splitlines() == ["info line", "warning: warning line"]


def test_other_ranks_show_only_warnings_by_default(monkeypatch, capsys):
    assert _emit(monkeypatch, capsys, 0, 2, None).splitlines() == [
        "[rank 0] info line",
        "[rank 0] warning: warning line",
    ]
    assert _emit(monkeypatch, capsys, 1, 2, None).splitlines() == ["[rank 1] warning: warning line"]


def test_any_rank_on_demand(monkeypatch, capsys):
    assert "[rank 3] info line" in _emit(monkeypatch, capsys, 3, 4, "all")
    assert "[rank 3] info line" in _emit(monkeypatch, capsys, 3, 4, "1,3")
    assert "info line" not in _emit(monkeypatch, capsys, 2, 4, "1,3")


def test_setup_is_idempotent_and_level_applies(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    for _ in range(3):
        setup_logging("WARNING")
    log.info("hidden")
    log.warning("shown")
    assert capsys.readouterr().err.splitlines() == ["warning: shown"]
    setup_logging("INFO")


def test_bad_settings_are_clear_errors():
    assert parse_ranks("all") is None and parse_ranks(None) == {0}
    assert parse_ranks(" 0, 3 ") == {0, 3}
    with pytest.raises(ValueError, match="--log-ranks"):
        parse_ranks("first")
    with pytest.raises(ValueError, match="--log-level"):
        setup_logging("LOUD")


def test_cli_rejects_a_bad_log_option(capsys):
    from megablocks_ablate.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--log-ranks", "x", "config", "describe", "model"])
    assert e.value.code == 2 and "--log-ranks" in capsys.readouterr().err
