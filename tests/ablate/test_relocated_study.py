"""A finished study copied elsewhere gives the same results from any working directory.

Every path a manifest, study spec, lineage or results row records is relative to the
file that records it (megablocks_ablate/utils/paths.py), so the demo's output directory
(study.yaml, tokenizer, data, seed, study) is copied, the original moved away, and
every command that reads a finished study runs on the copy from a third directory:
the same numbers as on the original, no model trained again, and export-hf ships the
tokenizer.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
from runner_fixtures import rows, tiny_demo_args

from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.utils.hashing import sha256_file

pytestmark = pytest.mark.integration

# the paper's proxies (search and optimize merge with them) and the Fisher merge, whose
# per-unit files must move with the study too
TINY = tiny_demo_args(0, 2, "--k", "2", "--proxies", "merged,macro,micro,mean_ind,ind_id,fisher")


def _cli(capsys, *argv: str) -> str:
    """Run one command; its stdout (the result), with a zero exit status."""
    rc = cli_main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, f"{argv}: {out.err[-2000:]}"
    return out.out


def _commands(capsys, exp: str, domains: list[str], mixture: str) -> dict:
    """Every command that reads the finished study under ``exp`` (a path relative to the
    working directory); returns what each gave, with the study's absolute location
    replaced by ``<exp>`` (the one thing allowed to differ)."""
    spec = os.path.join(exp, "study.yaml")
    where = os.path.abspath(exp)
    units = sorted(glob.glob(os.path.join(exp, "study", "pool", "*", "final")))
    heldout = sorted(glob.glob(os.path.join(exp, "data", "heldout", "*.jsonl")))
    assert len(units) == 2 and heldout
    got: dict = {}

    def run(name: str, *argv: str) -> None:
        got[name] = _cli(capsys, *argv).replace(where, "<exp>")

    run("plan", "study", "plan", spec)
    run("run", "study", "run", spec)  # finished: nothing to train or score
    run("report", "study", "report", spec)
    with open(os.path.join(exp, "study", "report", "report.md"), encoding="utf-8") as f:
        got["report.md"] = f.read().replace(where, "<exp>")
    run("search", "study", "search", spec, "--k", "2", "--domains", ",".join(domains))
    run("export", "study", "export", spec, "--mixture", mixture)
    run("export-megatron", "study", "export", spec, "--mixture", mixture, "--format", "megatron")
    run("optimize", "study", "optimize", spec, "--budget", "2", "--out", "optimize.json")
    with open("optimize.json", encoding="utf-8") as f:
        opt = json.load(f)
    got["optimize.json"] = json.dumps(opt, sort_keys=True).replace(where, "<exp>")
    # eval of a copied unit model (its tokenizer from its lineage)
    _cli(capsys, "eval", "--model", units[0], "--eval-sets", *heldout, "--out", "eval.json")
    with open("eval.json", encoding="utf-8") as f:
        got["eval"] = next(iter(json.load(f)["models"].values()))["results"]
    # merge two copied unit models (a merge spec beside the working directory)
    with open("merge.yaml", "w", encoding="utf-8") as f:
        json.dump({"checkpoints": {"a": units[0], "b": units[1]}, "uniform": True}, f)
    _cli(capsys, "merge", "--spec", "merge.yaml", "--out", "merged")
    got["merged sha256"] = sha256_file(os.path.join("merged", "model.safetensors"))
    # export-hf of the merge and of a unit model: each ships the tokenizer it records
    for what, ckpt in (("merged", "merged"), ("unit", units[-1])):
        out = f"hf-{what}"
        _cli(capsys, "export-hf", ckpt, out)
        names = set(os.listdir(out))
        assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= names, (
            what,
            names,
        )
        got[f"hf {what} tokenizer"] = sha256_file(os.path.join(out, "tokenizer.model"))
        got[f"hf {what} weights"] = sha256_file(os.path.join(out, "model.safetensors"))
    return got


def _models(exp: str) -> list[str]:
    """The trained run directories of a study (to see that none is added)."""
    return sorted(
        os.path.relpath(p, exp)
        for p in glob.glob(os.path.join(exp, "**", "COMPLETE.json"), recursive=True)
    )


def test_a_copied_study_gives_the_same_results_from_a_third_directory(
    tmp_path, monkeypatch, capsys
):
    from megablocks_ablate.ablate.runner import load_study
    from megablocks_ablate.corpora.synthetic import write_corpus

    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    for d in (first, second, third):
        d.mkdir()
    # the demo, run with relative paths where it was started
    monkeypatch.chdir(first)
    write_corpus("corpus.jsonl", n_docs=600, seed=5)
    _cli(capsys, "demo", "--corpus", "corpus.jsonl", "--out", "exp", *TINY)
    with open(os.path.join("exp", "data", "manifest.json"), encoding="utf-8") as f:
        assert json.load(f)["tokenizer"]["path"] == os.path.join("..", "tokenizer.model")
    study = load_study(os.path.join("exp", "study.yaml"))
    domains = list(study.eval_sets)[:2]
    mixture = ",".join(list(study.partitions)[:2])
    shutil.copytree(first / "exp", second / "exp")  # the finished study, untouched
    trained = _models(str(second / "exp"))
    assert len(trained) == 3  # the seed and 2 unit models

    original = _commands(capsys, "exp", domains, mixture)
    store_first = rows(os.path.join("exp", "study", "results.sqlite"))

    # the original is gone; the copy is used from a third directory by relative paths
    monkeypatch.chdir(third)
    os.rename(first, tmp_path / "first.gone")
    copied = _commands(capsys, os.path.join("..", "second", "exp"), domains, mixture)

    assert copied == original
    assert _models(str(second / "exp")) == trained  # found, not trained again
    assert rows(str(second / "exp" / "study" / "results.sqlite")) == store_first
