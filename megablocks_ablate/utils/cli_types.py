"""argparse ``type=`` helpers: every option value is checked when the command line is
parsed, so a bad one ends in argparse's usage and one ``error:`` line (exit 2), before
anything is imported, read or written (docs/reliability.md "One line for every bad
argument"; tests/test_cli_options.py walks every option).

Each helper raises :class:`argparse.ArgumentTypeError` naming what was expected and what
was given; argparse prefixes it with the option (``argument --k: expected an integer
>= 1, got '0'``). Stdlib only: importing this keeps ``--help`` instant.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

__all__ = [
    "at_least_one",
    "count",
    "count_text",
    "devices",
    "finite_float",
    "float_range",
    "fraction_from_zero",
    "fraction_open",
    "fraction_to_one",
    "int_at_least",
    "mixture",
    "name_weights",
    "nonempty_csv",
    "nonneg_float",
    "nonneg_int",
    "positive_float",
    "positive_int",
]


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = fn.__qualname__ = name  # argparse names the type in some messages
    return fn


def int_at_least(lo: int) -> Callable[[str], int]:
    """An integer >= ``lo`` (``"1.5"``, ``"nan"``, ``"abc"`` refused)."""

    def check(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {n}")
        return n

    return _named(check, f"int_at_least_{lo}")


positive_int = _named(int_at_least(1), "positive_int")
at_least_one = positive_int  # the name commands/study.py used for --cpu-workers
nonneg_int = _named(int_at_least(0), "nonneg_int")


def _float(text: str, expected: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r} (not finite)")
    return x


def float_range(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    name: str = "float_range",
) -> Callable[[str], float]:
    """A finite number within ``[lo, hi]`` (an end open where ``*_open``; None: unbounded)."""
    if lo is not None and hi is not None:
        expected = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        expected = f"a number {'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        expected = f"a number {'<' if hi_open else '<='} {hi:g}"
    else:
        expected = "a finite number"

    def check(text: str) -> float:
        x = _float(text, expected)
        if lo is not None and (x < lo or (lo_open and x == lo)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        if hi is not None and (x > hi or (hi_open and x == hi)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return x

    return _named(check, name)


finite_float = float_range(name="finite_float")
positive_float = float_range(0.0, lo_open=True, name="positive_float")
nonneg_float = float_range(0.0, name="nonneg_float")
fraction_open = float_range(0.0, 1.0, lo_open=True, hi_open=True, name="fraction_open")  # (0, 1)
fraction_to_one = float_range(0.0, 1.0, lo_open=True, name="fraction_to_one")  # (0, 1]
fraction_from_zero = float_range(0.0, 1.0, hi_open=True, name="fraction_from_zero")  # [0, 1)


def _items(text: str, what: str) -> list[str]:
    items = [it.strip() for it in text.split(",")]
    if not text.strip() or any(not it for it in items):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {what} with no empty item, got {text!r}"
        )
    return items


def nonempty_csv(text: str) -> str:
    """``a,b,c``: at least one item, none empty (``""``, ``","``, ``"a,,b"`` refused).
    Returns the text unchanged (the commands split it)."""
    _items(text, "names")
    return text


def _name_value_items(text: str, what: str, example: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for it in _items(text, what):
        name, sep, value = it.partition("=")
        name = name.strip()
        form = f"NAME=NUMBER (e.g. {example})"
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected {form}, got {it!r} in {text!r}")
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {form}, got {it!r} in {text!r}") from None
        if not math.isfinite(x) or x < 0:
            raise argparse.ArgumentTypeError(
                f"{name}: expected a finite number >= 0, got {value.strip()!r} in {text!r}"
            )
        if name in out:
            raise argparse.ArgumentTypeError(f"{name} is given twice in {text!r}")
        out[name] = x
    if not any(out.values()):
        raise argparse.ArgumentTypeError(f"expected at least one value > 0, got {text!r}")
    return out


def name_weights(text: str) -> str:
    """``docs=2,core=1``: names with finite weights >= 0, at least one > 0, no name twice.
    Returns the text unchanged."""
    _name_value_items(text, "NAME=WEIGHT items", "docs=2,core=1")
    return text


def mixture(text: str) -> str:
    """``docs,core`` (equal shares, no name twice) or ``docs=0.5,core=0.5`` (every item
    NAME=SHARE, finite, >= 0, at least one > 0). Returns the text unchanged."""
    items = _items(text, "partitions")
    if any("=" in it for it in items):
        _name_value_items(text, "NAME=SHARE items", "docs=0.5,core=0.5")
    elif len(set(items)) != len(items):
        dup = next(it for it in items if items.count(it) > 1)
        raise argparse.ArgumentTypeError(f"{dup} is given twice in {text!r}")
    return text


def devices(text: str) -> str:
    """``auto``, ``cpu`` / ``cpu:N`` (N >= 1) or GPU indices like ``0,1,2`` (each >= 0,
    none twice). Returns the text unchanged."""
    form = "auto, cpu:N (N >= 1) or GPU indices like 0,1,2"
    if text == "auto":
        return text
    if text.startswith("cpu"):
        rest = text[3:]
        if rest == "":
            return text
        n = rest[1:]
        if rest[:1] == ":" and n.isdigit() and int(n) >= 1:
            return text
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
    try:
        gpus = [int(x) for x in _items(text, "GPU indices")]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"expected {form} (each once, >= 0), got {text!r}")
    return text


# The one grammar of counts: config.parse_count (config files, overrides) uses it too.
_COUNT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtTbB]?)\s*$")
_COUNT_MULT = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}


def parse_count_text(text: str) -> int | None:
    """``"32000"``, ``"32k"``, ``"1.5M"`` -> the count; None if not a whole count."""
    m = _COUNT_RE.match(text)
    if not m:
        return None
    f = float(m.group(1)) * _COUNT_MULT[m.group(2).lower()]
    return int(f) if f.is_integer() else None


def count(lo: int = 0) -> Callable[[str], int]:
    """A count like ``32000``, ``32k`` or ``1.5M`` (as config files take them), >= ``lo``."""

    def check(text: str) -> int:
        n = parse_count_text(text)
        if n is None:
            raise argparse.ArgumentTypeError(
                f"expected a count like 32000, 32k or 1.5M (>= {lo}), got {text!r}"
            )
        if n < lo:
            raise argparse.ArgumentTypeError(f"expected a count >= {lo}, got {text!r}")
        return n

    return _named(check, f"count_at_least_{lo}")


def count_text(lo: int = 0) -> Callable[[str], str]:
    """As :func:`count`, but returns the text (``50M``) for settings that keep it."""
    parse = count(lo)

    def check(text: str) -> str:
        parse(text)
        return text

    return _named(check, f"count_text_at_least_{lo}")
