"""Write one benchmark's section of docs/benchmarks.md, replacing its earlier version."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")
sys.path.insert(0, ROOT)

from megablocks_ablate.utils.atomic import atomic_write_text  # noqa: E402


def replace_section(section: str, path: str = DOCS) -> None:
    """``section`` starts with its ``## Title`` line; an existing section of that title is
    replaced in place (up to the next ``## ``), otherwise the section is appended."""
    title = section.lstrip("\n").split("\n", 1)[0]
    if not title.startswith("## "):
        raise ValueError(f"a section must start with '## ', got {title!r}")
    section = section.strip("\n") + "\n"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    start = text.find(title + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    atomic_write_text(path, text)
