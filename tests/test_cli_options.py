"""One line for every bad argument (docs/reliability.md): every option of every
subcommand is range- and type-checked when the command line is parsed.

The test walks the real parser (``cli.build_parser()``): each option that takes a value
must have a check from ``megablocks_ablate.utils.cli_types``, or ``choices``, or be
listed below as free text (a path or a name, checked when read) or as checked right
after parsing. Each checked option is fed values it must refuse; every one must end in
exit 2 with exactly one ``error:`` line, no traceback and nothing written.
"""

from __future__ import annotations

import argparse
import os
import re

import pytest

from megablocks_ablate import cli
from megablocks_ablate.utils import cli_types as ct

# --- the allow-tables: a new option without a check fails until someone decides --------

# Options whose valid range includes 0 (none may be negative). Their types must accept 0.
ZERO_OK = {
    ("tokenizer", "train", "--max-documents"): "0 = every document",
    ("tokenizer", "train", "--seed"): "a seed; 0 is the default",
    ("train", "--unit-index"): "the first unit of the manifest",
    ("study", "report", "--seed"): "the bootstrap seed; 0 is the default",
    ("study", "optimize", "--min-share"): "no floor on the shares (the default)",
    ("preprocess", "--heldout-fraction"): "nothing held out (the default)",
    ("preprocess", "--heldout-min-docs"): "0 = the fraction alone",
    ("demo", "--heldout-fraction"): "nothing held out",
    ("demo", "--n-seq"): "no seq validation models",
}

# Free text: paths, globs, keys and names that only reading them can check (a missing
# file, an unknown field or preset is refused then, in one `error:` line).
FREE_TEXT = {
    (): {"--log-level", "--log-ranks"},  # checked right after parsing: LATE_CHECKED
    ("preprocess",): {
        "--config",
        "--input",
        "--out",
        "--tokenizer",
        "--eod-token",
        "--text-key",
        "--order-by",  # a metadata field: only the corpus says which exist
        "--eval",
    },
    ("tokenizer", "train"): {"--input", "--out", "--text-key"},
    ("tokenizer", "info"): {"--eod-token"},
    ("tokenizer", "encode"): {"--eod-token"},
    ("index", "validate"): {"--tokenizer", "--manifest"},
    ("index", "concat"): {"--out"},
    ("train",): {"--config"},
    ("train-pool",): {"--config"},
    ("export-hf",): {"--tokenizer"},
    ("merge",): {"--spec", "--out"},
    ("eval",): {"--model", "--eval-sets", "--out", "--tokenizer", "--cache-dir", "--text-key"},
    ("study", "run"): {"--registry", "--pool-dir"},
    ("study", "report"): {"--store", "--out"},
    ("study", "search"): {"--pool-dir"},
    ("study", "export"): {"--out"},
    ("study", "optimize"): {"--out", "--pool-dir"},
    ("demo",): {
        "--out",
        "--eval-extra",
        "--corpus",
        "--partition-by",  # metadata fields of the corpus
        "--order-by",
        "--seed-corpus",
        "--preset",  # a preset name: configs/train/<preset>_{seed,unit,seq}.yaml
    },
    ("launch-templates",): {"--out"},
}

# Checked by the command right after parsing (setup_logging -> parser.error).
LATE_CHECKED = {"--log-level": ["nope", "5"], "--log-ranks": ["x", "-1", ","]}

# Values each check must refuse ("0" is added for types that refuse 0; see ZERO_OK).
_NUMBER_JUNK = ["-1", "nan", "inf", "-inf", "abc", ""]
BAD = {
    "positive_int": ["0", "1.5", *_NUMBER_JUNK],
    "nonneg_int": ["1.5", *_NUMBER_JUNK],
    "count_at_least_0": ["1.5x", *_NUMBER_JUNK],
    "count_at_least_1": ["0", "0k", "1.5x", *_NUMBER_JUNK],
    "count_text_at_least_1": ["0", "0k", "1.5x", *_NUMBER_JUNK],
    "positive_float": ["0", *_NUMBER_JUNK],
    "nonneg_float": _NUMBER_JUNK,
    "fraction_open": ["0", "1", "1.5", *_NUMBER_JUNK],
    "fraction_to_one": ["0", "1.5", *_NUMBER_JUNK],
    "fraction_from_zero": ["1", "1.5", *_NUMBER_JUNK],
    "nonempty_csv": ["", ",", "a,,b", " "],
    "name_weights": ["", ",", "docs=-1", "docs=nan", "docs=inf", "docs", "=1", "docs=x", "docs=0"],
    "mixture": ["", ",", "a,,b", "a,a", "a=-1", "a=nan", "a=0.5,b", "a=0"],
    "devices": ["", ",", "cpu:0", "cpu:x", "-1", "0,0", "0,,1", "gpu"],
}
ZERO_TYPES = {"nonneg_int", "count_at_least_0", "nonneg_float", "fraction_from_zero"}


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(subcommand path, action) of every argument of every (nested) subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))
        else:
            yield path, action


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0 and not isinstance(action, (argparse._HelpAction,))


def _actions():
    return [(p, a) for p, a in _walk(cli.build_parser()) if _takes_value(a)]


def _name(path, action) -> str:
    return " ".join((*path, action.option_strings[0] if action.option_strings else action.dest))


def _cases():
    cases = []
    for path, action in _actions():
        opt = action.option_strings[0] if action.option_strings else None
        if action.choices is not None and not isinstance(action.choices, dict):
            values = ["nope"]
        elif action.type is not None and getattr(action.type, "__name__", "") in BAD:
            values = list(BAD[action.type.__name__])
        else:
            continue
        for value in values:
            argv = [*path, opt, value] if opt else [*path, value]
            cases.append(pytest.param(argv, id=f"{_name(path, action)}={value!r}"))
    for opt, values in LATE_CHECKED.items():
        for value in values:
            cases.append(
                pytest.param([opt, value, "config", "describe", "train"], id=f"{opt}={value!r}")
            )
    return cases


# --- the named cases of issue 25 (parse-time) -----------------------------------------
NAMED = [
    ["study", "optimize", "s.yaml", "--budget", "0"],
    ["study", "optimize", "s.yaml", "--step", "nan"],
    ["study", "optimize", "s.yaml", "--domain-weights", "docs=-1"],
    ["study", "search", "s.yaml", "--k", "0"],
    ["study", "search", "s.yaml", "--k", "2", "--domains", ","],
    ["study", "report", "--store", "r.sqlite", "--top-k", "0"],
    ["train-pool", "--config", "u.yaml", "--units", ","],
    ["study", "export", "s.yaml", "--mixture", "docs=nan"],
    ["eval", "--model", "m", "--eval-sets", "e", "--out", "o.json", "--stride", "0"],
    ["tokenizer", "train", "--input", "x", "--out", "t", "--vocab-size", "0"],
    ["preprocess", "--workers", "0"],
    ["preprocess", "--heldout-fraction", "nan"],
    ["demo", "--k", "0"],
    ["config", "describe", "nope"],  # KIND: checked first thing by the command, one line
    ["config", "show", "nope", "demo_unit"],
]

ERROR_LINE = re.compile(r"^(megablocks-ablate[\w\- ]*: )?error: ")


def _run(argv, capsys) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    return rc, capsys.readouterr().err


def _assert_one_error_line(argv, rc: int, err: str) -> list[str]:
    assert rc == 2, f"{argv}: exit {rc}, stderr {err!r}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ERROR_LINE.match(ln)]
    assert len(lines) == 1, f"{argv}: {err!r}"
    # argparse prints usage lines, then the one error line, last; nothing follows it
    assert err.rstrip("\n").splitlines()[-1] == lines[0], err
    return lines


@pytest.mark.parametrize("argv", _cases() + [pytest.param(a, id=" ".join(a)) for a in NAMED])
def test_bad_value_is_one_usage_error(argv, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    rc, err = _run(argv, capsys)
    _assert_one_error_line(argv, rc, err)
    assert sorted(os.listdir(tmp_path)) == before


def test_every_option_is_checked_or_listed():
    """Each option taking a value has a cli_types check or choices, or is free text listed
    in FREE_TEXT; a plain ``type=int``/``float`` is refused (it takes 0, -1, nan)."""
    unchecked, zero = [], []
    for path, action in _actions():
        if not action.option_strings:
            continue  # positionals: specs, paths, overrides (choices ones are fed above)
        opt = action.option_strings[0]
        tname = getattr(action.type, "__name__", None)
        if action.choices is not None:
            continue
        if tname in BAD:
            key = (*path, opt)
            if tname in ZERO_TYPES:
                zero.append(key)
                assert key in ZERO_OK, f"{_name(path, action)} takes 0: list it in ZERO_OK"
                action.type("0")  # and it does take it
            else:
                assert key not in ZERO_OK, f"{_name(path, action)} is in ZERO_OK but refuses 0"
            continue
        if opt in FREE_TEXT.get(path, set()) and action.type is None:
            continue
        unchecked.append(f"{_name(path, action)} (type={tname})")
    assert not unchecked, "options without a parse-time check: " + ", ".join(unchecked)
    assert sorted(zero) == sorted(ZERO_OK), set(ZERO_OK) ^ set(zero)


def test_free_text_table_names_real_options():
    seen = {(p, a.option_strings[0]) for p, a in _actions() if a.option_strings}
    stale = [(p, o) for p, opts in FREE_TEXT.items() for o in opts if (p, o) not in seen]
    assert not stale


def test_override_nan_and_bad_config_yaml_are_one_line(capsys, monkeypatch, tmp_path):
    """Checked when the config is built, before any work: still one `error:` line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("a: [1, 2\nb: {\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    before = sorted(os.listdir(tmp_path))
    for argv in (
        ["train", "--print-config", "optimizer.lr=nan"],
        ["train", "--print-config", "optimizer.lr=.inf"],
        ["train", "--config", "bad.yaml", "--print-config"],
        ["preprocess", "--config", "bad.yaml", "--print-config"],
        ["preprocess", "--config", "list.yaml", "--print-config"],
    ):
        rc, err = _run(argv, capsys)
        (line,) = _assert_one_error_line(argv, rc, err)
        assert "bad.yaml" in line or "list.yaml" in line or "optimizer.lr" in line, line
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(
    "text", ["0", "7", "32000", "32k", "1.5M", " 2k ", "2B", "1T", ".5k", "1.5", "0.5k", "1e3", "x"]
)
def test_count_grammar_matches_config(text):
    from megablocks_ablate.config import parse_count
    from megablocks_ablate.errors import ConfigError

    try:
        expected: int | None = parse_count(text)
    except ConfigError:
        expected = None
    assert ct.parse_count_text(text) == expected


@pytest.mark.parametrize(
    ("check", "text", "value"),
    [
        (ct.positive_int, "3", 3),
        (ct.nonneg_int, "0", 0),
        (ct.fraction_to_one, "1", 1.0),
        (ct.fraction_from_zero, "0", 0.0),
        (ct.fraction_open, "0.5", 0.5),
        (ct.positive_float, "1e-3", 1e-3),
        (ct.finite_float, "-2", -2.0),
        (ct.count(1), "32k", 32000),
        (ct.count_text(1), "50M", "50M"),
        (ct.nonempty_csv, "docs, core", "docs, core"),
        (ct.name_weights, "docs=2,core=0", "docs=2,core=0"),
        (ct.mixture, "docs,core", "docs,core"),
        (ct.mixture, "docs=0.6,core=0.4", "docs=0.6,core=0.4"),
        (ct.devices, "auto", "auto"),
        (ct.devices, "cpu:4", "cpu:4"),
        (ct.devices, "0,1,3", "0,1,3"),
    ],
)
def test_good_values_pass(check, text, value):
    assert check(text) == value


def test_messages_name_expected_and_given():
    with pytest.raises(argparse.ArgumentTypeError, match=r"integer >= 1, got 0"):
        ct.positive_int("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"\(0, 1\], got 'nan'"):
        ct.fraction_to_one("nan")
    with pytest.raises(argparse.ArgumentTypeError, match=r"docs: expected a finite number >= 0"):
        ct.name_weights("docs=-1")
