"""Progress bars: tqdm on a terminal, periodic log lines otherwise (CI, Slurm logs)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(total=None, desc: str = "", unit: str = "it", disable: bool | None = None, **kwargs):
    """A tqdm bar; disabled with MBA_NO_PROGRESS=1, sparse updates when not a TTY."""
    if disable is None:
        disable = os.environ.get("MBA_NO_PROGRESS") == "1"
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        dynamic_ncols=True,
        unit_scale=True,
        **kwargs,
    )
