"""`megablocks-ablate demo`: a whole study through the CLI, at tiny scale, on a user corpus.

The built-in stdlib corpus at the demo's real sizes takes minutes (measured in the
README); here the same code path runs on a synthetic corpus with the tiny presets.
"""

from __future__ import annotations

import os

import pytest

from megablocks_ablate.ablate.demo import DemoSettings, study_spec
from megablocks_ablate.ablate.spec import StudySpec
from megablocks_ablate.ablate.store import ResultStore
from megablocks_ablate.cli import main as cli_main

TINY = [
    "--partition-by",
    "fos",
    "--order-by",
    "year",
    "--preset",
    "tiny",
    "--vocab-size",
    "384",
    "--unit-tokens",
    "6k",
    "--seed-tokens",
    "8k",
    "--n-seq",
    "2",
    "--max-partitions",
    "3",
    "--heldout-fraction",
    "0.04",
    "--workers",
    "1",
    "model_overrides=[vocab_size=384]",
]


@pytest.mark.integration
def test_demo_on_a_user_corpus_end_to_end_and_rerun(tmp_path, capsys):
    from megablocks_ablate.data.synthetic import write_corpus

    corpus = write_corpus(str(tmp_path / "corpus.jsonl"), n_docs=600, seed=5)
    out = str(tmp_path / "demo")
    assert cli_main(["demo", "--corpus", corpus, "--out", out, "--k", "2", *TINY]) == 0
    captured = capsys.readouterr()
    for step in range(1, 7):  # progress narration is logged (stderr), the result printed
        assert f"[{step}/6]" in captured.err
    text = captured.out
    assert "merged vs seq, pooled over domains: Pearson" in text
    assert f"report: {os.path.join(out, 'study', 'report', 'report.md')}" in text
    assert os.path.isfile(os.path.join(out, "study", "report", "scatter_merged.png"))
    store = os.path.join(out, "study", "results.sqlite")
    with ResultStore(store) as s:
        counts = (s.count("results"), s.count("unit_results"))
    assert counts == (3 * 3 * 3 + 2 * 3, 3 * 3)  # 3 pairs x 3 proxies x 3 domains + seq; units
    # the written spec is a normal study spec
    spec = StudySpec.load(os.path.join(out, "study.yaml"))
    assert spec.mixtures.k_subsets == 2 and spec.validation.n == 2
    # a rerun finds everything done: nothing trained, no row added
    assert cli_main(["demo", "--corpus", corpus, "--out", out, "--k", "2", *TINY]) == 0
    assert "training 0" in capsys.readouterr().err
    with ResultStore(store) as s:
        assert (s.count("results"), s.count("unit_results")) == counts


def test_demo_missing_corpus_is_a_clear_error(tmp_path, capsys):
    rc = cli_main(["demo", "--corpus", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "d")])
    assert rc == 2
    assert "--corpus: no such file" in capsys.readouterr().err


def test_study_config_is_the_demo_study():
    """configs/studies/demo.yaml is exactly what `make demo` runs (partitions aside)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    written = StudySpec.load(os.path.join(repo, "configs", "studies", "demo.yaml")).to_dict()
    demo = StudySpec.from_dict(
        study_spec(
            DemoSettings(), "demo_out/data", "demo_out/seed_data", partitions=written["partitions"]
        )
    ).to_dict()
    assert written == demo


def test_demo_k_larger_than_partitions(tmp_path, capsys):
    from megablocks_ablate.data.synthetic import write_corpus

    corpus = write_corpus(str(tmp_path / "c.jsonl"), n_docs=200, seed=1)
    rc = cli_main(["demo", "--corpus", corpus, "--out", str(tmp_path / "d"), "--k", "4", *TINY])
    assert rc == 2
    err = capsys.readouterr().err
    assert "has 3 partition(s)" in err and "fewer than k=4" in err
