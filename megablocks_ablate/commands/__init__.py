"""Subcommands of `megablocks-ablate`; one module each (see cli.py)."""
