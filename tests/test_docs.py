"""Docs that run: every command and Python block in README.md and docs/*.md is checked.

Each fenced block that holds a command (```bash/sh/console or an untagged block whose
lines start with a command word) or Python (```python) is one of:

* marked illustrative in the markdown, on the line before its fence:
  ``<!-- illustrative: why -->`` (needs a GPU, Slurm, a corpus or trained models that
  are not here, hours of training, a placeholder synopsis);
* mapped below (``MAPPED``) to the existing test that runs what it shows;
* checked here: every ``megablocks-ablate`` command (also after ``torchrun ... -m
  megablocks_ablate``) is parsed by the real CLI parser, which catches a misspelt
  subcommand or option and a bad value; ``make`` targets must exist in the Makefile and
  ``python <file>.py`` scripts in the repository; the commands in ``EXECUTED`` are run
  in-process, with the substitutions of ``SUBSTITUTIONS`` (tiny presets for the big
  ones, fixture paths for real ones), and must exit 0.

A new block that is none of these fails the test until someone decides.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from megablocks_ablate import cli

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND_WORDS = ("megablocks-ablate", "python", "make", "torchrun", "mpiexec", "pip", "sbatch")
SHELL_LANGS = ("bash", "sh", "console", "")
ILLUSTRATIVE = re.compile(r"^<!--\s*illustrative:\s*\S.*-->\s*$")

# Blocks another test runs: (file, first line of the block, stripped) -> that test.
MAPPED: dict[tuple[str, str], str] = {
    (
        "README.md",
        "megablocks-ablate demo                          # the built-in study on CPU, "
        "into demo_out/ (~5 min)",
    ): "tests/ablate/test_demo.py (the demo end to end, at tiny scale)",
}

# How an executed command is made tiny and local: documented text -> what runs.
SUBSTITUTIONS: dict[str, str] = {
    "--out launch/": "--out {tmp}/launch",  # a fresh directory of the test's own
    # the shipped preset by name (the test runs in its own directory, where a fake
    # demo_out/data holds the demo's 8 partitions: a manifest and held-out files only)
    "configs/studies/demo.yaml": "demo",
}

# Documented commands run here (after SUBSTITUTIONS), each must exit 0: cheap ones.
EXECUTED = [
    "megablocks-ablate train --config tiny_seed --print-config",
    "megablocks-ablate config describe train",
    "megablocks-ablate train --config demo_unit --print-config optimizer.lr=1e-3",
    "megablocks-ablate config show train demo_unit optimizer.lr=1e-3",
    "megablocks-ablate launch-templates --out launch/",
    "megablocks-ablate study plan configs/studies/demo.yaml",
    "megablocks-ablate study plan configs/studies/demo.yaml mixtures.k_subsets=3",
]
DEMO_PARTITIONS = ["concurrency", "core", "docs", "formats", "gui", "networking", "testing"]
DEMO_PARTITIONS += ["tooling"]


class Block:
    def __init__(self, path: Path, line: int, lang: str, body: list[str], before: str):
        self.path, self.line, self.lang, self.body, self.before = path, line, lang, body, before

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def key(self) -> tuple[str, str]:
        return str(self.path.relative_to(REPO)), self.body[0].strip() if self.body else ""

    @property
    def illustrative(self) -> bool:
        return bool(ILLUSTRATIVE.match(self.before.strip()))

    def commands(self) -> list[list[str]]:
        """The block's command lines (continuations joined, comments dropped), split."""
        out, pending = [], ""
        for raw in self.body:
            line = pending + raw
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1] + " "
                continue
            pending = ""
            # a `\` continuation line may carry a comment before the next line: drop it
            words = shlex.split(re.sub(r"\\\s+#.*", "", line), comments=True)
            if words:
                out.append(words)
        return out


def doc_blocks() -> list[Block]:
    blocks = []
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^\s*```(\S*)\s*$", lines[i])
            if not m:
                i += 1
                continue
            j = i + 1
            while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
                j += 1
            before = next((x for x in reversed(lines[:i]) if x.strip()), "")
            blocks.append(Block(path, i + 1, m.group(1), lines[i + 1 : j], before))
            i = j + 1
    return blocks


def _is_command_block(b: Block) -> bool:
    if b.lang not in SHELL_LANGS:
        return False
    first = [ln.split()[0] for ln in b.body if ln.strip() and not ln.lstrip().startswith("#")]
    return any(w in COMMAND_WORDS or w.startswith(("SEED=", "N=")) for w in first)


def checked_blocks() -> list[Block]:
    return [b for b in doc_blocks() if b.lang == "python" or _is_command_block(b)]


def _cli_argv(words: list[str]) -> list[str] | None:
    """The megablocks-ablate arguments of a command line, or None when it is another."""
    if words[0] == "megablocks-ablate":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == [
        "megablocks_ablate"
    ]:
        return words[words.index("-m") + 2 :]
    return None


def _check_command(words: list[str]) -> str | None:
    """Why ``words`` is wrong, or None."""
    argv = _cli_argv(words)
    if argv is not None:
        try:
            cli.build_parser(argv).parse_args(argv)
        except SystemExit:
            return f"the CLI refuses {shlex.join(words)!r}"
        return None
    if words[0] == "make":
        makefile = (REPO / "Makefile").read_text(encoding="utf-8")
        missing = [t for t in words[1:] if not re.search(rf"^{re.escape(t)}\b.*:", makefile, re.M)]
        return f"no Makefile target {missing}" if missing else None
    if words[0] == "python" and words[1].endswith(".py") and not (REPO / words[1]).is_file():
        return f"no script {words[1]}"
    return None


def test_every_block_is_run_mapped_or_marked():
    unchecked = []
    for b in checked_blocks():
        if b.illustrative or b.key in MAPPED:
            continue
        if b.lang == "python":
            unchecked.append(f"{b.where}: a Python block neither executed, mapped nor marked")
            continue
        for words in b.commands():
            why = _check_command(words)
            if why:
                unchecked.append(f"{b.where}: {why}")
    assert not unchecked, "\n".join(unchecked)


def test_the_tables_name_real_blocks():
    keys = {b.key for b in checked_blocks()}
    assert set(MAPPED) <= keys, set(MAPPED) - keys
    documented = {
        shlex.join(w) for b in checked_blocks() if b.lang != "python" for w in b.commands()
    }
    for cmd in EXECUTED:
        assert cmd in documented, f"{cmd!r} is not (any longer) in the docs"
    assert all(any(k in cmd for cmd in EXECUTED) for k in SUBSTITUTIONS)


def test_the_check_catches_what_drifts():
    assert _check_command(["megablocks-ablate", "study", "reprot", "demo"])
    assert _check_command(["megablocks-ablate", "eval", "--modle", "runs/seed"])
    assert _check_command(["make", "no-such-target"])
    assert _check_command(["python", "tools/no_such.py"])
    assert _check_command(["megablocks-ablate", "study", "report", "demo"]) is None
    assert _check_command(["make", "test"]) is None


@pytest.mark.parametrize("documented", EXECUTED)
def test_executed_commands_exit_0(documented, tmp_path, monkeypatch, capsys):
    cmd = documented
    for old, new in SUBSTITUTIONS.items():
        cmd = cmd.replace(old, new.format(tmp=tmp_path))
    monkeypatch.chdir(tmp_path)
    if "study" in cmd:
        _fake_demo_data(tmp_path)
    assert cli.main(shlex.split(cmd)[1:]) == 0, cmd
    assert capsys.readouterr().out.strip()


def _fake_demo_data(root: Path) -> None:
    sys.path.insert(0, str(REPO / "tests" / "ablate"))
    try:
        from study_fixtures import write_manifest_dir
    finally:
        sys.path.pop(0)
    write_manifest_dir(root / "demo_out" / "data", dict.fromkeys(DEMO_PARTITIONS, 1))
    (root / "demo_out" / "ood").mkdir()
    (root / "demo_out" / "ood" / "general.jsonl").write_text('{"text": "general"}\n')


def test_study_plan_as_documented_counts_the_mixtures(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _fake_demo_data(tmp_path)
    assert cli.main(["study", "plan", "demo"]) == 0
    assert "mixtures: 28" in capsys.readouterr().out  # all pairs of 8
    assert cli.main(["study", "plan", "demo", "mixtures.k_subsets=3"]) == 0
    assert "mixtures: 56" in capsys.readouterr().out  # the override changes the plan
    # the example these docs used to give changes nothing on 8 partitions: now said so
    assert cli.main(["study", "plan", "demo", "mixtures.random.n=50"]) == 0
    out, err = capsys.readouterr()
    assert "mixtures: 28" in out and "mixtures.random (n=50, k=2) adds no mixture" in err
