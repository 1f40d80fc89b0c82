"""Packaging: a non-editable install works away from the checkout, and setup.py's build
decisions hold without building anything.

The integration test builds the wheel (compiling the C++ extension), installs it with
``--no-deps`` into a fresh venv that reuses this environment's torch and other packages
through a ``.pth`` file, and runs the installed ``megablocks-ablate`` from a directory
outside the repository: presets must come from the installed package data, not from
``configs/`` next to the sources. There it trains a few steps and runs the README's
quick start as written (the demo at tiny scale; the study steps that train or search are
left out): the shipped study spec by name, the launch templates, ``py.typed``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Not copied into the build tree: environments, build outputs, caches, run outputs (the
# top-level names only at the top: megablocks_ablate/data/ is a package).
_TOP_IGNORE = {".git", ".venv", "build", "dist", "demo_out", "demo_manpages_out", "data", "runs"}
_ANY_IGNORE = shutil.ignore_patterns("*.egg-info", "__pycache__", "*.so", ".*_cache")


def _copy_ignore(directory: str, names: list[str]) -> set[str]:
    top = _TOP_IGNORE.intersection(names) if Path(directory) == REPO else set()
    return top | set(_ANY_IGNORE(directory, names))


def _load_setup_py():
    """setup.py as a module: its ``setup()`` runs only as ``__main__``."""
    spec = importlib.util.spec_from_file_location("mba_setup_py", REPO / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _no_call():
    raise AssertionError("device_count must not be asked when TORCH_CUDA_ARCH_LIST is set")


def test_cuda_arch_list_defaults_only_without_gpu_and_without_choice():
    setup_py = _load_setup_py()
    choose = setup_py.default_cuda_arch_list
    assert choose({}, 0) == setup_py.DEFAULT_CUDA_ARCH_LIST == "8.0;9.0"
    assert choose({}, lambda: 0) == "8.0;9.0"  # a callable count is asked lazily
    assert choose({"TORCH_CUDA_ARCH_LIST": "  "}, 0) == "8.0;9.0"  # blank is unset
    assert choose({}, 1) is None  # a visible GPU: torch detects its arch
    assert choose({}, lambda: 8) is None
    assert choose({"TORCH_CUDA_ARCH_LIST": "9.0a"}, 0) is None  # the user's choice wins
    assert choose({"TORCH_CUDA_ARCH_LIST": "8.6"}, _no_call) is None


def test_presets_are_package_data():
    """The presets live in the package (the top-level configs/ is a link to them) and are
    found through importlib.resources."""
    import importlib.resources

    from megablocks_ablate.model.config import PRESET_DIR as MODEL_DIR
    from megablocks_ablate.train.config import PRESET_DIR as TRAIN_DIR

    pkg = Path(str(importlib.resources.files("megablocks_ablate")))
    assert pkg / "configs" / "train" == TRAIN_DIR and (TRAIN_DIR / "tiny_seed.yaml").is_file()
    assert pkg / "configs" / "model" == MODEL_DIR and (MODEL_DIR / "tiny.yaml").is_file()
    assert (pkg / "configs" / "studies" / "demo.yaml").is_file()
    link = REPO / "configs"
    assert link.is_symlink() and link.resolve() == (REPO / "megablocks_ablate" / "configs")


def _run(cmd, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} -> {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


# The README's quick start at tiny scale: `megablocks-ablate demo` gets these options (the
# built-in stdlib corpus, 3 of its 8 partitions studied, tiny models; ~1 CPU-minute).
TINY_DEMO = [
    "--preset",
    "tiny",
    "--vocab-size",
    "384",
    "--unit-tokens",
    "6k",
    "--unit-passes",
    "1",
    "--seed-tokens",
    "8k",
    "--n-seq",
    "2",
    "--max-partitions",
    "3",
    "--workers",
    "1",
    "model_overrides=[vocab_size=384]",
]


def quick_start() -> list[list[str]]:
    """The ``megablocks-ablate`` commands of the README's quick start, as argument lists."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    words = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [w[1:] for w in words if w and w[0] == "megablocks-ablate"]


def _cheap(argv: list[str]) -> bool:
    """A quick-start step the packaging test runs as written (training and searching
    steps are left to the tests of those commands)."""
    return (
        argv[:2] in (["study", "plan"], ["study", "report"], ["study", "export"])
        or (argv[:2] == ["study", "run"] and "--dry-run" in argv)
        or argv[0] == "launch-templates"
    )


def test_quick_start_parses_and_needs_no_checkout():
    """Every quick-start command parses with the real CLI and names no checkout path; the
    steps the packaging test runs are all there."""
    from megablocks_ablate.cli import build_parser

    commands = quick_start()
    for argv in commands:
        build_parser(argv).parse_args(argv)
        assert not any(w.startswith(("configs/", "tools/")) for w in argv), argv
    ran = [a[:2] for a in commands if a == ["demo"] or _cheap(a)]
    assert ran == [
        ["demo"],
        ["study", "plan"],
        ["study", "run"],
        ["study", "report"],
        ["study", "export"],
        ["launch-templates", "--out"],
    ]


def _install_wheel(tmp_path: Path) -> tuple[Path, Path, dict, Path]:
    """Build the wheel from a copy of the tree and install it into a fresh venv:
    (its python, its megablocks-ablate, the environment, its site-packages)."""
    # a copy, so that build/ and *.egg-info never touch the checkout
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=_copy_ignore)
    dist = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(MBA_SKIP_CUDA="1", OMP_NUM_THREADS="1", MBA_NO_PROGRESS="1")
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", dist], src, env, 600)
    (wheel,) = dist.glob("megablocks_ablate-*.whl")

    # A fresh venv reusing this environment's packages (torch, numpy, ...) via a .pth file;
    # its own site-packages comes first, so the wheel shadows any editable install here.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    py = venv / "bin" / "python"
    new_site = _run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env
    ).stdout.strip()
    Path(new_site, "_mba_reuse_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([*pip, "--python", py, "install", "--no-deps", "-q", wheel], tmp_path, env)
    return py, venv / "bin" / "megablocks-ablate", env, Path(new_site)


def _check_installed(py: Path, site: Path, work: Path, env: dict) -> None:
    """The package, its extension and its data come from the venv, not the checkout."""
    where = json.loads(
        _run(
            [
                py,
                "-c",
                "import json, megablocks_ablate as m, megablocks_ablate._C as c, "
                "megablocks_ablate.train.config as t; "
                "print(json.dumps([m.__file__, c.__file__, str(t.PRESET_DIR)]))",
            ],
            work,
            env,
        ).stdout
    )
    for path in where:
        assert Path(path).resolve().is_relative_to(site.resolve()), where
        assert not Path(path).resolve().is_relative_to(REPO), where
    pkg = site / "megablocks_ablate"
    assert (pkg / "py.typed").is_file()
    assert (pkg / "configs" / "studies" / "demo.yaml").is_file()
    shipped = REPO / "megablocks_ablate" / "templates" / "launch"
    assert sorted(os.listdir(pkg / "templates" / "launch")) == sorted(os.listdir(shipped))


def _train_a_few_steps(py: Path, cli: Path, work: Path, env: dict) -> None:
    """A few steps of the tiny seed preset on a tiny corpus, every step by the CLI."""
    corpus = work / "corpus.jsonl"
    _run(
        [
            py,
            "-c",
            "from megablocks_ablate.corpora.synthetic import write_corpus; "
            f"write_corpus({str(corpus)!r}, n_docs=400, seed=1)",
        ],
        work,
        env,
    )
    _run(
        [cli, "tokenizer", "train", "--input", corpus, "--vocab-size", "512", "--out", "tok"],
        work,
        env,
    )
    _run(
        [
            *(cli, "preprocess", "--input", corpus, "--tokenizer", "tok.model"),
            *("--partition-by", "fos", "--order-by", "year", "--unit-tokens", "3000"),
            *("--heldout-fraction", "0.05", "--workers", "1", "--out", "data"),
        ],
        work,
        env,
    )
    overrides = {
        "model_overrides": "[vocab_size=512]",
        "data.manifest": "data",
        "out_dir": "runs/seed",
        "seq_len": 32,
        "global_batch_tokens": 256,
        "micro_batch": 4,
        "train_tokens": 256 * 4,
        "schedule.warmup_steps": 1,
        "device": "cpu",
        "logging.every": 1,
        "logging.progress": False,
        "logging.tensorboard": False,
        "checkpoint.every": 0,
    }
    _run(
        [cli, "train", "--config", "tiny_seed", *(f"{k}={v}" for k, v in overrides.items())],
        work,
        env,
    )
    run = work / "runs" / "seed"
    assert (run / "COMPLETE.json").is_file() and (run / "final" / "model.safetensors").is_file()


def _run_quick_start(cli: Path, work: Path, env: dict) -> dict[str, str]:
    """The README's quick start as written (the demo at tiny scale, the cheap steps):
    ``{first words: stdout}``."""
    shown = {}
    for argv in quick_start():
        if argv == ["demo"]:
            argv = ["demo", *TINY_DEMO]
        elif not _cheap(argv):
            continue
        shown[" ".join(argv[:2])] = _run([cli, *argv], work, env).stdout
    return shown


@pytest.mark.integration
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    py, cli, env, site = _install_wheel(tmp_path)
    work = tmp_path / "work"  # outside the repository: no configs/ to fall back on
    work.mkdir()
    _check_installed(py, site, work, env)

    assert "demo" in _run([cli, "demo", "--help"], work, env).stdout
    printed = _run([cli, "train", "--config", "tiny_seed", "--print-config"], work, env).stdout
    assert "kind: seed" in printed and "model: tiny" in printed
    assert "global_batch_tokens" in _run([cli, "config", "describe", "train"], work, env).stdout
    assert "name:" in _run([cli, "config", "show", "study", "demo"], work, env).stdout
    assert "study plan demo" in _run([cli, "study", "--help"], work, env).stdout
    _train_a_few_steps(py, cli, work, env)

    shown = _run_quick_start(cli, work, env)
    assert "fisher vs seq" in shown["demo --preset"]
    assert (work / "demo_out" / "study" / "results.sqlite").is_file()
    # the shipped spec by name, its paths read from the working directory (demo_out/)
    assert "concurrency+core" in shown["study plan"]
    assert "store demo_out/study/results.sqlite" in shown["study run"]
    assert "recommended mixture" in shown["study report"]
    assert (work / "demo_out" / "study" / "report" / "report.md").is_file()
    assert "docs-0000" in shown["study export"]
    written = sorted(os.listdir(work / "launch"))
    shipped = REPO / "megablocks_ablate" / "templates" / "launch"
    assert [n for n in written if not n.startswith(".")] == sorted(os.listdir(shipped))
    for name in os.listdir(shipped):
        assert (work / "launch" / name).read_bytes() == (shipped / name).read_bytes()
        assert os.access(work / "launch" / name, os.X_OK), name
