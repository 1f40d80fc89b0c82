"""The `megablocks-ablate` command. Thin: each subcommand lives in `commands/<name>.py`.

A command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (taking the parsed args, returning an exit code). Heavy imports happen
inside ``func`` so ``megablocks-ablate --help`` stays instant, and running one
subcommand imports only its own module (``COMMANDS``): ``merge`` starts in a tenth of
a second because nothing of training, evaluation or torch is loaded for it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from megablocks_ablate import __version__
from megablocks_ablate.errors import MBAError
from megablocks_ablate.utils.log import setup_logging

# Order is the order shown in --help.
COMMAND_MODULES = [
    "megablocks_ablate.commands.preprocess",
    "megablocks_ablate.commands.tokenizer",
    "megablocks_ablate.commands.index",
    "megablocks_ablate.commands.train",
    "megablocks_ablate.commands.export_hf",
    "megablocks_ablate.commands.merge",
    "megablocks_ablate.commands.eval",
    "megablocks_ablate.commands.study",
    "megablocks_ablate.commands.demo",
    "megablocks_ablate.commands.config",
    "megablocks_ablate.commands.launch_templates",
]
_PKG = "megablocks_ablate.commands."
# Which module registers each subcommand (tests/merge/test_merge_startup.py checks
# it against what the modules register), so that running one imports that module alone.
COMMANDS = {
    "preprocess": _PKG + "preprocess",
    "tokenizer": _PKG + "tokenizer",
    "index": _PKG + "index",
    "train": _PKG + "train",
    "train-pool": _PKG + "train",
    "export-hf": _PKG + "export_hf",
    "import-hf": _PKG + "export_hf",
    "merge": _PKG + "merge",
    "eval": _PKG + "eval",
    "study": _PKG + "study",
    "demo": _PKG + "demo",
    "config": _PKG + "config",
    "launch-templates": _PKG + "launch_templates",
}
_VALUE_OPTIONS = ("--log-level", "--log-ranks")  # top-level options that take a value


def command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not a top-level option
    or its value), or None."""
    words = iter(argv)
    for word in words:
        if word in _VALUE_OPTIONS:
            next(words, None)
        elif word == "--":
            return next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command's parser: every subcommand, or, when ``argv`` names a known one,
    only that one (its module is then the only command module imported)."""
    parser = argparse.ArgumentParser(
        prog="megablocks-ablate",
        description="Data-ablation studies by modular training and merging (Na et al. 2024).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        metavar="LEVEL",
        help="DEBUG, INFO (default, or $MBA_LOG_LEVEL), WARNING or ERROR",
    )
    parser.add_argument(
        "--log-ranks",
        default=None,
        metavar="RANKS",
        help="ranks whose info lines are shown: 0 (default, or $MBA_LOG_RANKS), "
        "all, or a list like 0,3; warnings show from every rank",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    command = command_of(argv) if argv is not None else None
    for name in [COMMANDS[command]] if command in COMMANDS else COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        setup_logging(args.log_level, args.log_ranks)
    except ValueError as e:
        parser.error(str(e))
    try:
        rc = args.func(args)
    except MBAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no partial outputs were kept", file=sys.stderr)
        return 130
    except OSError as e:
        # disk full, read-only or unwritable directory, a name too long, ...: the
        # environment's refusal, not a bug: one line naming the path (traceback at DEBUG)
        logging.getLogger(__name__).debug("OS error", exc_info=True)
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 1
    return int(rc or 0)


def os_error_line(e: OSError) -> str:
    """``<path>: <reason>`` (``<path> -> <path2>: <reason>`` for a rename or link) of an
    OSError; its reason alone when it names no file."""
    reason = e.strerror or str(e) or type(e).__name__
    names = [
        os.fsdecode(n) if isinstance(n, str | bytes) else str(n)
        for n in (e.filename, e.filename2)
        if n is not None
    ]
    return f"{' -> '.join(names)}: {reason}" if names else reason


if __name__ == "__main__":
    sys.exit(main())
