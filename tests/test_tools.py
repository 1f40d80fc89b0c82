"""tools/*.py are thin Megatron-style entry points over the CLI: each must run."""

import glob
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # runs every tool and subcommand as a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = sorted(glob.glob(os.path.join(ROOT, "tools", "*.py")))


def test_every_cli_subcommand_has_help():
    from megablocks_ablate.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {
        "preprocess",
        "tokenizer",
        "index",
        "train",
        "train-pool",
        "export-hf",
        "import-hf",
        "merge",
        "eval",
        "study",
        "demo",
        "config",
    } <= set(sub.choices)


@pytest.mark.parametrize("tool", TOOLS, ids=os.path.basename)
def test_tool_runs_help(tool):
    proc = subprocess.run(
        [sys.executable, tool, "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
