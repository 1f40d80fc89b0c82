"""`megablocks-ablate demo`: a whole study through the CLI, at tiny scale, on a user corpus.

The built-in stdlib corpus at the demo's real sizes takes minutes (measured in the
README); here the same code path runs on a synthetic corpus with the tiny presets.
"""

from __future__ import annotations

import math
import os

import pytest
from runner_fixtures import tiny_demo_args

from megablocks_ablate.ablate.demo import DemoSettings, study_spec
from megablocks_ablate.ablate.spec import StudySpec
from megablocks_ablate.ablate.store import ResultStore
from megablocks_ablate.cli import main as cli_main

TINY = tiny_demo_args()


@pytest.mark.integration
def test_demo_on_a_user_corpus_end_to_end_and_rerun(tmp_path, capsys):
    from megablocks_ablate.corpora.synthetic import write_corpus

    corpus = write_corpus(str(tmp_path / "corpus.jsonl"), n_docs=600, seed=5)
    out = str(tmp_path / "demo")
    assert cli_main(["demo", "--corpus", corpus, "--out", out, "--k", "2", *TINY]) == 0
    captured = capsys.readouterr()
    for step in range(1, 7):  # progress narration is logged (stderr), the result printed
        assert f"[{step}/6]" in captured.err
    text = captured.out
    assert "headline proxy: fisher" in text  # the demo's merge: Fisher-weighted
    assert "fisher vs seq, pooled over domains: Pearson" in text
    assert f"report: {os.path.join(out, 'study', 'report', 'report.md')}" in text
    assert os.path.isfile(os.path.join(out, "study", "report", "scatter_fisher.png"))
    store = os.path.join(out, "study", "results.sqlite")
    with ResultStore(store) as s:
        counts = (s.count("results"), s.count("unit_results"))
    assert counts == (3 * 3 + 2 * 3, 3 * 3)  # 3 pairs x fisher x 3 domains + seq; units
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
    from megablocks_ablate.corpora.synthetic import write_corpus

    corpus = write_corpus(str(tmp_path / "c.jsonl"), n_docs=200, seed=1)
    rc = cli_main(["demo", "--corpus", corpus, "--out", str(tmp_path / "d"), "--k", "4", *TINY])
    assert rc == 2
    err = capsys.readouterr().err
    assert "has 3 partition(s)" in err and "fewer than k=4" in err


# --------------------------------------------------------------------- --builtin manpages


def _demo_settings(argv):
    from megablocks_ablate.cli import build_parser
    from megablocks_ablate.commands.demo import settings

    return settings(build_parser().parse_args(["demo", *argv]))


def test_builtin_manpages_arguments_and_defaults():
    s = _demo_settings(["--builtin", "manpages", "--eval-extra", "x.jsonl"])
    assert (s.builtin, s.out, s.heldout_fraction) == ("manpages", "demo_manpages_out", 0.02)
    assert s.eval_extra == ["x.jsonl"]
    d = _demo_settings([])  # the default demo is unchanged
    assert (d.builtin, d.out, d.heldout_fraction, d.eval_extra) == ("stdlib", "demo_out", 0.02, [])
    assert _demo_settings(["--builtin", "manpages", "--out", "o"]).out == "o"


def test_builtin_manpages_study_has_the_three_ood_sets(tmp_path):
    import dataclasses
    import json
    import time

    from megablocks_ablate.ablate.demo import _manpage_corpus
    from megablocks_ablate.corpora.manpages import DOMAINS, OOD_SETS
    from tests.corpora.test_manpages import make_tree

    extra = tmp_path / "mine.jsonl"
    extra.write_text('{"text": "an extra evaluation document"}\n')
    s = dataclasses.replace(
        _demo_settings(["--builtin", "manpages", "--eval-extra", f"mine={extra}"]),
        out=str(tmp_path / "out"),
        corpus_root=make_tree(tmp_path / "tree"),
    )
    corpus, seed = _manpage_corpus(s, time.time())
    with open(corpus, encoding="utf-8") as f:
        assert {json.loads(line)["domain"] for line in f} == set(DOMAINS)
    assert seed == str(tmp_path / "out" / "seed.jsonl") and os.path.getsize(seed) > 0
    spec = study_spec(s, "d", "sd", partitions={p: [f"{p}-0000"] for p in DOMAINS[:3]})
    ood = [str(tmp_path / "out" / "ood" / f"{n}.jsonl") for n in OOD_SETS]
    assert spec["eval"] == {"heldout": True, "extra": [*ood, f"mine={extra}"]}
    assert all(os.path.getsize(p) > 0 for p in ood)
    assert spec["name"] == "manpages-demo"
    assert StudySpec.from_dict(spec).eval.extra == [*ood, f"mine={extra}"]
    # --eval-extra on the stdlib demo: its held-out seed files (out of domain for every
    # mixture), then the user's sets; with the user's own seed corpus only the user's
    plain = study_spec(
        DemoSettings(eval_extra=["a.jsonl"]), "d", "sd", partitions=spec["partitions"]
    )
    general = os.path.join("demo_out", "ood", "general.jsonl")
    assert plain["eval"]["extra"] == [general, "a.jsonl"] and plain["name"] == "stdlib-demo"
    own_seed = DemoSettings(eval_extra=["a.jsonl"], seed_corpus="s.jsonl")
    assert study_spec(own_seed, "d", "sd", partitions=spec["partitions"])["eval"]["extra"] == [
        "a.jsonl"
    ]


def test_unit_passes_set_the_unit_and_seq_budgets():
    """--unit-passes 3: each unit model trains 3 passes over its base unit (the paper's
    ~3.5); the seq budget follows (k x the unit budget, in the runner)."""
    s = _demo_settings(["--unit-tokens", "32k", "--unit-passes", "3"])
    assert (s.unit_passes, s.unit_budget) == (3, 96_000)
    spec = study_spec(s, "d", "sd", partitions={"a": ["a-0000"], "b": ["b-0000"]})
    assert spec["unit"]["overrides"][-1] == "train_tokens=96000"
    from megablocks_ablate.errors import ConfigError

    with pytest.raises(ConfigError, match="--unit-passes: must be >= 1"):
        DemoSettings(unit_passes=0)


def test_builtin_manpages_errors(tmp_path, capsys):
    out = tmp_path / "d"
    rc = cli_main(["demo", "--builtin", "manpages", "--corpus", "c.jsonl", "--out", str(out)])
    assert rc == 2 and "--builtin manpages and --corpus: give one" in capsys.readouterr().err
    missing = str(tmp_path / "missing.jsonl")
    rc = cli_main(["demo", "--builtin", "manpages", "--eval-extra", missing, "--out", str(out)])
    assert rc == 2 and f"--eval-extra {missing}: no such file" in capsys.readouterr().err
    assert not out.exists()  # refused before any work
    # a stdlib demo directory is not reused for the manpages corpus
    from megablocks_ablate.ablate.demo import build_data
    from megablocks_ablate.errors import ConfigError
    from megablocks_ablate.utils.outputs import claim_output_dir

    claim_output_dir(str(out), "demo")
    (out / "corpus.jsonl").write_text("")
    with pytest.raises(ConfigError, match="holds a demo output"):
        build_data(DemoSettings(out=str(out), builtin="manpages"), 0.0)


@pytest.mark.integration
def test_proportions_demo_checks_weighted_merges_against_seq_blends(tmp_path, capsys):
    """`demo --proportions` at tiny scale: sampled blends get seq models of one budget,
    the optimizer's blend and the baselines are trained, the figures are printed and
    written, and every correlation is recomputable from the store."""
    import json

    import numpy as np

    from megablocks_ablate.ablate import mixtures as mx
    from megablocks_ablate.ablate.analysis import pearson
    from megablocks_ablate.corpora.synthetic import write_corpus

    corpus = write_corpus(str(tmp_path / "corpus.jsonl"), n_docs=600, seed=5)
    out = str(tmp_path / "demo")
    argv = ["demo", "--proportions", "--corpus", corpus, "--out", out, "--k", "2", *TINY]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "weighted merge (macro) vs seq over 6 sampled blends" in text
    f = json.load(open(os.path.join(out, "proportions.json")))
    assert set(f["checks"]) == {"optimizer", "best_subset", "natural"}
    spec = StudySpec.load(os.path.join(out, "study-proportions.yaml"))
    assert spec.validation.train_tokens == 3 * 6000
    with ResultStore(os.path.join(spec.out_dir, "results.sqlite")) as store:
        parts = {p: list(us) for p, us in spec.partitions.items()}
        sampled = [mx.weighted_mixture(b, parts) for b in spec.validation.weighted[:6]]
        seq_ids = {r.subject for r in store.results(mx.SEQ)}
        domain = next(iter(f["pearson"]["per_domain"]))
        x = [store.scores(m.id, "macro")[domain].perplexity for m in sampled]
        y = [store.scores(m.id, mx.SEQ)[domain].perplexity for m in sampled]
    assert {m.id for m in sampled} <= seq_ids
    want = f["pearson"]["per_domain"][domain]["macro"]
    assert want == pytest.approx(round(pearson(np.array(x), np.array(y)), 4), abs=1e-4)
    for c in f["checks"].values():
        assert math.isfinite(c["seq"]) and c["seq"] > 1
    assert f["optimizer"]["best"]["objective"] <= f["optimizer"]["search"]["path"][0]["objective"]


def test_demo_proxies_option(tmp_path, capsys):
    """--proxies sets the study's proxies (default: the Fisher merge and the unit-model
    baselines); an unknown or repeated name is refused before anything is written."""
    from megablocks_ablate.ablate.demo import DEMO_PROXIES
    from megablocks_ablate.commands.demo import settings

    assert DemoSettings().proxies == list(DEMO_PROXIES) == ["fisher", "mean_ind", "ind_id"]
    spec = study_spec(
        DemoSettings(proxies=["merged", "fisher"]), "d", "s", {"a": ["a0"], "b": ["b0"]}
    )
    assert spec["proxies"] == ["merged", "fisher"]
    out = str(tmp_path / "d")
    for bad, what in (("merged,nope", "nope"), ("fisher,fisher", "fisher,fisher")):
        rc = cli_main(["demo", "--out", out, "--proxies", bad, *TINY])
        assert rc == 2
        err = capsys.readouterr().err
        assert "--proxies: expected distinct names" in err and what in err
    with pytest.raises(SystemExit):  # an empty list: refused by the parser
        cli_main(["demo", "--out", out, "--proxies", ","])
    assert not os.path.exists(out)
    from megablocks_ablate.cli import build_parser

    args = build_parser().parse_args(["demo", "--proxies", "merged, fisher"])
    assert settings(args).proxies == ["merged", "fisher"]
