"""A tiny study scored on Paloma-layout domains, through `study plan` and `study run`.

The study (2 partitions of one unit, one 2-mixture, no seq model) points
``eval.paloma.dir`` at a miniature copy of allenai/paloma in its published layout
(tests/evaluate/paloma_layout.py) by a command-line override, split by subdomain, plus
one extra domain mapped in-domain to a partition. The store must hold every mixture,
proxy and Paloma domain; the Paloma domains must be out-of-domain for the mixture (not
in ``domain_units``, not pooled into ID); and a unit model's stored score on a
subdomain must equal evaluating its checkpoint directly on that subdomain's documents.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import pytest
import yaml
from runner_fixtures import tiny_settings

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.demo import build_data, study_spec
from megablocks_ablate.ablate.runner import StudyRunner, load_study
from megablocks_ablate.ablate.store import ResultStore

pytestmark = pytest.mark.integration  # trains a whole tiny study

PALOMA_DOMAINS = [
    "c4_100_domains/www.ign.com",
    "c4_100_domains/www.nytimes.com",
    "m2d2_s2orc_unsplit/cs.CL",
    "m2d2_s2orc_unsplit/math.AG",
]


def _cli(argv: list[str]) -> int:
    from megablocks_ablate.commands import study

    parser = argparse.ArgumentParser()
    study.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def paloma_study(tmp_path_factory):
    from megablocks_ablate.corpora.synthetic import write_corpus

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "evaluate"))
    from paloma_layout import corpus_texts, write_paloma

    root = tmp_path_factory.mktemp("pal_study")
    corpus = write_corpus(str(root / "corpus.jsonl"), n_docs=600, seed=3)
    s = tiny_settings(str(root), corpus)
    s.max_partitions, s.n_seq = 2, 0
    data, seed_data = build_data(s, time.time())
    spec = study_spec(s, data, seed_data)
    names = list(spec["partitions"])
    extra = root / "notes.jsonl"
    extra.write_text('{"text": "notes about the first partition"}\n')
    spec["validation"] = {"n": 0, "mixtures": []}
    spec["eval"] = {"heldout": True, "extra": [f"notes={extra}"], "in_domain": {"notes": names[0]}}
    path = str(root / "study.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    pal = write_paloma(str(root), corpus_texts(corpus, start=300))
    overrides = [
        f"eval.paloma.dir={pal}",
        "eval.paloma.split_by=subdomain",
        "eval.paloma.sources=[c4_100_domains, m2d2_s2orc_unsplit]",
    ]
    return path, overrides, pal, names


def test_plan_and_run_score_every_paloma_domain(paloma_study, capsys):
    from megablocks_ablate.data.tokenizer import load_tokenizer
    from megablocks_ablate.evaluate import EvalSuite, evaluate
    from megablocks_ablate.evaluate.paloma import paloma_sources
    from megablocks_ablate.model.loading import load_model

    path, overrides, pal, names = paloma_study
    assert _cli(["study", "plan", path, *overrides]) == 0
    assert "c4_100_domains/www.ign.com" in capsys.readouterr().out
    assert _cli(["study", "run", path, *overrides, "--device", "cpu"]) == 0

    study = load_study(path, overrides)
    domains = names + ["notes"] + PALOMA_DOMAINS
    assert list(study.eval_sets) == domains
    out_dir = study.spec.out_dir
    with ResultStore(os.path.join(out_dir, "results.sqlite")) as store:
        meta = store.get_meta("study")
        results, units = store.results(), store.unit_results()
    assert list(meta["eval_sets"]) == domains
    assert set(meta["domain_units"]) == set(names) | {"notes"}  # Paloma: out-of-domain
    assert meta["domain_units"]["notes"] == study.partitions[names[0]]
    (m,) = study.mixtures
    assert mx.in_domain_sets(m, meta["domain_units"]) == sorted(names + ["notes"])  # ID pool
    for proxy in ("merged", "macro", "micro"):
        got = {r.domain for r in results if r.subject == m.id and r.proxy == proxy}
        assert set(domains) <= got
    assert {r.domain for r in units} >= set(domains)

    # a unit model's stored score on a subdomain = its checkpoint evaluated directly
    runner = StudyRunner(study)
    unit = runner.plan().units[0]
    tok = load_tokenizer(runner.planner.manifest.data["tokenizer"]["path"])
    srcs = paloma_sources(pal, split_by="subdomain", sources=["c4_100_domains"])
    suite = EvalSuite.load(srcs, tok, cache_dir=os.path.join(out_dir, "direct-cache"))
    model, _ = load_model(unit.entry.model_dir)
    direct = evaluate(model.eval(), suite)
    stored = {r.domain: r.score for r in units if r.subject == unit.name}
    for d in ("c4_100_domains/www.ign.com", "c4_100_domains/www.nytimes.com"):
        assert stored[d].tokens == direct[d].tokens == suite.sets[d].num_tokens
        assert math.isclose(stored[d].nll_sum, direct[d].nll_sum, rel_tol=1e-5)
    runner.close()
