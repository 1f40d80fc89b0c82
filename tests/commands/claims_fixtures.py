"""Helpers of the output-claim tests (tests/commands/test_*_claims.py): snapshots of
every byte under a directory, and the one-line refusal check."""

from __future__ import annotations

import hashlib
import os


def snapshot(root) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (links by target)."""
    found = {}
    for d, _, files in os.walk(root):
        for name in files:
            path = os.path.join(d, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                found[rel] = "-> " + os.readlink(path)
                continue
            with open(path, "rb") as f:
                found[rel] = hashlib.sha256(f.read()).hexdigest()
    return found


def refused(capsys, rc: int, *expected: str) -> str:
    """Exit 2 with exactly one ``error:`` line holding each of ``expected``; returns it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]
