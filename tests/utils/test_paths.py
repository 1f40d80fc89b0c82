"""utils/paths.py: recorded paths are relative to the file that records them."""

from __future__ import annotations

import os

from megablocks_ablate.utils.paths import record_path, recorded_as_given, resolve_recorded


def test_record_relative_paths_relative_to_the_recording_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "run").mkdir(parents=True)
    rec = os.path.join("out", "run", "lineage.json")
    assert record_path("tok.model", rec) == os.path.join("..", "..", "tok.model")
    assert record_path("out/run/x.bin", rec) == "x.bin"
    assert record_path("out/data/../data/u", rec) == os.path.join("..", "data", "u")
    # the recording file given absolute records the same string
    assert record_path("tok.model", str(tmp_path / rec)) == os.path.join("..", "..", "tok.model")
    # absolute paths are kept exactly as given, even inside the recording directory
    assert record_path("/abs/tok.model", rec) == "/abs/tok.model"
    assert record_path(str(tmp_path / "out" / "run" / "x"), rec) == str(
        tmp_path / "out" / "run" / "x"
    )
    assert record_path("", rec) == ""


def test_resolve_against_the_recording_file_not_the_working_directory(tmp_path, monkeypatch):
    rec = str(tmp_path / "a" / "b" / "manifest.json")
    monkeypatch.chdir(tmp_path)
    assert resolve_recorded("../tok.model", rec) == str(tmp_path / "a" / "tok.model")
    assert resolve_recorded("x/y", rec) == str(tmp_path / "a" / "b" / "x" / "y")
    assert resolve_recorded("/abs/t", rec) == "/abs/t"
    # the same from another working directory, and with the recording file relative
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resolve_recorded("../tok.model", rec) == str(tmp_path / "a" / "tok.model")
    assert resolve_recorded("../tok.model", "../a/b/manifest.json") == str(
        tmp_path / "a" / "tok.model"
    )


def test_record_then_resolve_round_trips_after_a_move(tmp_path, monkeypatch):
    """A directory holding the recording file and the recorded file moves as a whole."""
    (tmp_path / "study" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    value = record_path("study/tok.model", "study/data/manifest.json")
    assert value == os.path.join("..", "tok.model")
    os.rename(tmp_path / "study", tmp_path / "moved")
    assert resolve_recorded(value, str(tmp_path / "moved" / "data" / "manifest.json")) == str(
        tmp_path / "moved" / "tok.model"
    )


def test_cwd_fallback_only_when_unambiguous(tmp_path, monkeypatch):
    """Records written before the rule were relative to the writer's working directory:
    accepted there only when the path is not beside the recording file."""
    (tmp_path / "data").mkdir()
    (tmp_path / "tok.model").write_bytes(b"t")
    rec = str(tmp_path / "data" / "manifest.json")
    monkeypatch.chdir(tmp_path)
    assert resolve_recorded("tok.model", rec) == str(tmp_path / "data" / "tok.model")
    assert resolve_recorded("tok.model", rec, cwd_fallback=True) == str(tmp_path / "tok.model")
    # beside the recording file too: the recording file's wins
    (tmp_path / "data" / "tok.model").write_bytes(b"u")
    assert resolve_recorded("tok.model", rec, cwd_fallback=True) == str(
        tmp_path / "data" / "tok.model"
    )
    # neither: the recording file's (the error then names where it was looked for)
    assert resolve_recorded("nope", rec, cwd_fallback=True) == str(tmp_path / "data" / "nope")


def test_recorded_as_given_keeps_the_form(tmp_path, monkeypatch):
    rec = str(tmp_path / "s" / "data" / "manifest.json")
    monkeypatch.chdir(tmp_path)
    # relative stays relative (to the working directory), so it is recorded relative again
    assert recorded_as_given("../tok.model", rec) == os.path.join("s", "tok.model")
    assert record_path(recorded_as_given("../tok.model", rec), "s/pool/u/final/lineage.json") == (
        os.path.join("..", "..", "..", "tok.model")
    )
    assert recorded_as_given("/abs/tok.model", rec) == "/abs/tok.model"
    monkeypatch.chdir(tmp_path / "..")
    assert os.path.abspath(recorded_as_given("../tok.model", rec)) == str(
        tmp_path / "s" / "tok.model"
    )
