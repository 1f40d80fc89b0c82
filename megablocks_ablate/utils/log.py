"""Logging for every rank of a job: rank 0 speaks, the others only when asked or warning.

Library modules log with ``logging.getLogger(__name__)`` and never print; the
``megablocks-ablate`` command calls :func:`setup_logging` once. Which ranks' info
lines appear is chosen by ``--log-ranks`` (or ``MBA_LOG_RANKS``): ``0`` (default),
``all``, or a list such as ``0,3``. Warnings and errors appear from every rank, since a
problem on rank 5 is exactly what a user needs to see. Under more than one rank each
line starts with ``[rank N]``. Progress bars stay tqdm (:mod:`.progress`).
"""

from __future__ import annotations

import logging
import os
import sys

LOG_RANKS_ENV = "MBA_LOG_RANKS"
LOG_LEVEL_ENV = "MBA_LOG_LEVEL"
ROOT_LOGGER = "megablocks_ablate"
# Launchers' rank variables, in the order they are trusted before torch.distributed is up.
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return default


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed's once it is
    initialised (without importing torch just for this), else the launcher's variables."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return _first_int(_RANK_VARS, 0), _first_int(_WORLD_VARS, 1)


def parse_ranks(value: str | None) -> frozenset[int] | None:
    """``"0"`` / ``"0,3"`` -> those ranks; ``"all"`` -> None (every rank)."""
    value = (value or "0").strip().lower()
    if value == "all":
        return None
    try:
        ranks = frozenset(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ValueError(
            f"--log-ranks: expected 'all' or comma-separated ranks like 0,3, got {value!r}"
        ) from None
    if not ranks or min(ranks) < 0:
        raise ValueError(f"--log-ranks: expected 'all' or ranks >= 0, got {value!r}")
    return ranks


class RankFilter(logging.Filter):
    """Pass warnings from every rank and lower levels from the chosen ranks only; sets
    ``record.rank_prefix`` (``"[rank N] "`` when the job has more than one rank)."""

    def __init__(self, ranks: frozenset[int] | None = frozenset({0})):
        super().__init__()
        self.ranks = ranks

    def filter(self, record: logging.LogRecord) -> bool:
        rank, world = rank_and_world()
        record.rank_prefix = f"[rank {rank}] " if world > 1 else ""
        return record.levelno >= logging.WARNING or self.ranks is None or rank in self.ranks


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the moment (test capture, redirection)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = getattr(record, "rank_prefix", "")
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{prefix}{level}{super().format(record)}"


def setup_logging(level: str | None = None, ranks: str | None = None) -> logging.Logger:
    """Configure the package's logger (idempotent): one handler on stderr with a
    :class:`RankFilter`. ``level`` / ``ranks`` default to ``MBA_LOG_LEVEL`` (INFO) and
    ``MBA_LOG_RANKS`` (0)."""
    logger = logging.getLogger(ROOT_LOGGER)
    level_name = (level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper()
    if not isinstance(logging.getLevelName(level_name), int):
        raise ValueError(f"--log-level: expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.addFilter(RankFilter(parse_ranks(ranks or os.environ.get(LOG_RANKS_ENV))))
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level_name)
    # Records still propagate: the command's root logger has no handlers (nothing is
    # printed twice), and an embedding application or pytest's caplog still sees them.
    return logger
