"""The JSON file a benchmark script (``benchmarks/*.py``) writes its figures to.

A result file names the script that wrote it and the command line::

    {"benchmark": "fidelity_design", "command": "python benchmarks/fidelity_design.py ...", ...}

A script replaces an existing file only when it carries the script's own name: rerunning
a benchmark refreshes its figures (that is what ``make bench`` is for), while a mistyped
``--json`` / ``--out`` that points at a user's file, another benchmark's results or
anything unreadable is refused before any measuring starts, and nothing is touched.
Writes are atomic (temp file, fsync, rename). An undefined figure (NaN, e.g. a Pearson
coefficient of a constant input) is written as ``null``: absent, and the file stays
strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from megablocks_ablate.utils.atomic import atomic_write_json

FIELD = "benchmark"


def _refuse(path: str, why: str) -> SystemExit:
    return SystemExit(
        f"error: {path}: {why}; not overwriting it (choose another output path, or move "
        "that file away)"
    )


def load_own(path: str, benchmark: str) -> dict[str, Any] | None:
    """The results ``benchmark`` wrote at ``path`` earlier (None: no file there yet).

    Raises SystemExit (a message naming the file and what was found) when ``path``
    exists and is not a results file of ``benchmark``.
    """
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        raise _refuse(path, "exists and is not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _refuse(path, f"exists and is not a JSON results file ({e})") from None
    owner = data.get(FIELD) if isinstance(data, dict) else None
    if owner != benchmark:
        if isinstance(owner, str):
            why = f"is a results file of benchmarks/{owner}.py, not of benchmarks/{benchmark}.py"
        else:
            why = (
                f"is not a results file of benchmarks/{benchmark}.py (those say "
                f'"{FIELD}": "{benchmark}")'
            )
        raise _refuse(path, f"exists and {why}")
    return data


def check_writable(path: str, benchmark: str) -> None:
    """Fail now, before minutes of measuring, if :func:`write_result` would refuse."""
    load_own(path, benchmark)


def command_line(script: str, args: list[str] | None = None) -> str:
    """``python benchmarks/<script> <args>`` (default: this process's arguments): the
    command to put in a result. The script is named as the repository has it wherever
    it ran from; the arguments are as given (paths relative to where it ran)."""
    args = sys.argv[1:] if args is None else args
    return " ".join(["python", f"benchmarks/{os.path.basename(script)}", *args])


def _absent_if_undefined(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON ``null``)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _absent_if_undefined(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_absent_if_undefined(v) for v in obj]
    return obj


def write_result(
    path: str, benchmark: str, result: dict[str, Any], command: str | None = None
) -> None:
    """Write ``result`` to ``path`` under ``benchmark``'s name, atomically; an existing
    file there must be ``benchmark``'s own. ``command``: the command line that produced
    it (default: ``result["command"]``); the two identifying keys come first."""
    load_own(path, benchmark)
    if result.get(FIELD, benchmark) != benchmark:
        raise ValueError(f"result says {FIELD}={result[FIELD]!r}, written as {benchmark!r}")
    command = command or result.get("command")
    if not command:
        raise ValueError("a benchmark result records the command that produced it")
    obj = {
        FIELD: benchmark,
        "command": command,
        **{k: v for k, v in result.items() if k not in (FIELD, "command")},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(path, _absent_if_undefined(obj))
