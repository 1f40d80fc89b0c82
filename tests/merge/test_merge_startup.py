"""What `megablocks-ablate merge` loads: only its own command module, and neither
torch (beyond what the checkpoint package itself imports), numpy nor tqdm, training,
evaluation or model code; and the CLI's lazy command table."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

import pytest
import yaml

from megablocks_ablate.cli import COMMAND_MODULES, COMMANDS, command_of, main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FORBIDDEN = [
    "transformers",
    "tqdm",
    "triton",
    "megablocks_ablate.train",
    "megablocks_ablate.evaluate",
    "megablocks_ablate.model",
    "megablocks_ablate.ablate",
    "megablocks_ablate.kernels",
    "megablocks_ablate.commands.demo",
    "megablocks_ablate.commands.train",
]


def _modules_after(code: str) -> set[str]:
    r = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        cwd=ROOT,
        env=dict(os.environ, MBA_NO_PROGRESS="0"),
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def test_merge_command_imports_only_what_it_needs(family, tmp_path):
    _, ckpts = family
    spec = tmp_path / "merge.yaml"
    spec.write_text(yaml.safe_dump({"checkpoints": ckpts, "uniform": True}))
    out = tmp_path / "merged"
    merged = _modules_after(
        "from megablocks_ablate.cli import main\n"
        f"assert main(['merge', '--spec', {str(spec)!r}, '--out', {str(out)!r}]) == 0"
    )
    assert (out / "model.safetensors").is_file()
    # Measured against what importing the checkpoint package loads by itself (today
    # torch, which brings tqdm and numpy): the merge path adds none of these, nor any
    # training, evaluation or model code (it runs the C++ kernel over mapped bytes).
    floor = _modules_after("import megablocks_ablate.checkpoint")
    added = merged - floor
    loaded = {m for m in added if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)}
    assert not loaded, sorted(loaded)
    assert not {m.split(".")[0] for m in added} & {"torch", "numpy"}


def test_command_table_matches_what_modules_register():
    registered = {}
    for name in COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(name).register(sub)
        registered.update(dict.fromkeys(sub.choices, name))
    assert registered == COMMANDS


@pytest.mark.parametrize(
    "argv, command",
    [
        (["merge", "--spec", "x"], "merge"),
        (["--log-level", "DEBUG", "merge"], "merge"),
        (["--log-level=DEBUG", "--log-ranks", "all", "eval", "a"], "eval"),
        (["--", "merge"], "merge"),
        (["--version"], None),
        ([], None),
    ],
)
def test_command_of(argv, command):
    assert command_of(argv) == command


def test_help_still_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in COMMANDS)
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert "invalid choice" in capsys.readouterr().err
