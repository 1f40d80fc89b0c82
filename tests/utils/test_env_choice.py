"""The shared reader of the MBA_* setting switches: normalised, defaulted, refused by name."""

from __future__ import annotations

import pytest

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.env_choice import check_choice, env_choice

CHOICES = ("auto", "off")


def test_unset_or_blank_gives_the_default(monkeypatch):
    monkeypatch.delenv("MBA_TEST_SWITCH", raising=False)
    assert env_choice("MBA_TEST_SWITCH", CHOICES) == "auto"
    assert env_choice("MBA_TEST_SWITCH", CHOICES, "off") == "off"
    monkeypatch.setenv("MBA_TEST_SWITCH", "  ")
    assert env_choice("MBA_TEST_SWITCH", CHOICES, "off") == "off"


def test_case_and_blanks_are_ignored(monkeypatch):
    monkeypatch.setenv("MBA_TEST_SWITCH", " OFF\n")
    assert env_choice("MBA_TEST_SWITCH", CHOICES) == "off"
    assert check_choice(" Auto ", CHOICES, "somewhere") == "auto"


def test_other_values_are_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("MBA_TEST_SWITCH", "on")
    with pytest.raises(
        ConfigError, match=r"^MBA_TEST_SWITCH: expected one of auto, off, got 'on'$"
    ):
        env_choice("MBA_TEST_SWITCH", CHOICES)
    with pytest.raises(ConfigError, match=r"^merge: expected one of auto, off, got 'x'$"):
        check_choice("x", CHOICES, "merge")


@pytest.mark.parametrize(
    "variable, reader",
    [
        ("MBA_KERNELS", "megablocks_ablate.kernels.dispatch:_env_backend"),
        ("MBA_CE_CHUNKS", "megablocks_ablate.kernels.cross_entropy:ce_chunk_mode"),
        ("MBA_COMPILE_ORDER", "megablocks_ablate.train.parallel:compile_order"),
        ("MBA_MERGE_VEC", "megablocks_ablate.kernels.merge_switch:_env_mode"),
    ],
)
def test_every_switch_reads_through_it(monkeypatch, variable, reader):
    import importlib

    module, name = reader.split(":")
    fn = getattr(importlib.import_module(module), name)
    monkeypatch.setenv(variable, "no-such-setting")
    with pytest.raises(ConfigError, match=rf"^{variable}: expected one of .*'no-such-setting'$"):
        fn()
