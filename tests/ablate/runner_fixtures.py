"""The tiny study every runner test starts from (helpers; the fixture is in conftest.py).

Synthetic corpus, 3 partitions of one unit each, all pairs as mixtures, 2 fixed seq
validations, the tiny model: a whole `study run` in seconds.
"""

from __future__ import annotations

import time

import yaml

from megablocks_ablate.ablate.demo import DemoSettings, build_data, study_spec
from megablocks_ablate.ablate.store import ResultStore

TINY = ["model_overrides=[vocab_size=384]", "checkpoint.every=2", "logging.every=2"]


def tiny_demo_args(n_seq: int = 2, max_partitions: int = 3, *extra: str) -> list[str]:
    """`demo` options for a tiny study on a synthetic corpus (fos partitions, year order,
    tiny models, 6K-token units, an 8K-token seed): the CLI tests' shared settings."""
    return [
        *("--partition-by", "fos", "--order-by", "year", "--preset", "tiny"),
        *("--vocab-size", "384", "--unit-tokens", "6k", "--unit-passes", "1"),
        *("--seed-tokens", "8k", "--n-seq", str(n_seq)),
        *("--max-partitions", str(max_partitions), "--heldout-fraction", "0.04"),
        *("--workers", "1", *extra, "model_overrides=[vocab_size=384]"),
    ]


def tiny_settings(out: str, corpus: str) -> DemoSettings:
    return DemoSettings(
        out=out,
        corpus=corpus,
        partition_by="fos",
        order_by="year",
        vocab_size=384,
        unit_tokens="6k",
        unit_passes=1,
        seed_tokens="8k",
        k=2,
        n_seq=2,
        preset="tiny",
        heldout_fraction=0.04,
        train_overrides=TINY,
        workers=1,
        max_partitions=3,
        # the paper's proxies (the demo's default is the Fisher merge, tested on its own)
        proxies=["merged", "macro", "micro", "mean_ind", "ind_id"],
    )


def write_spec(path: str, spec: dict, **changes) -> str:
    spec = dict(spec, **changes)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return path


def tiny_study_spec(root) -> tuple[dict, str]:
    """(spec dict, spec path) of the tiny study under ``root`` (data built, nothing trained)."""
    from megablocks_ablate.corpora.synthetic import write_corpus

    corpus = write_corpus(str(root / "corpus.jsonl"), n_docs=600, seed=3)
    s = tiny_settings(str(root), corpus)
    data, seed_data = build_data(s, time.time())
    spec = study_spec(s, data, seed_data)
    # fixed validation mixtures, so adding a partition later adds no seq model
    names = list(spec["partitions"])
    spec["validation"] = dict(
        spec["validation"], n=0, mixtures=[[names[0], names[1]], [names[1], names[2]]]
    )
    return spec, write_spec(str(root / "study.yaml"), spec)


def rows(store_path: str) -> dict:
    """Every stored row of a study: {(table, subject, proxy, domain): (nll_sum, tokens)}."""
    with ResultStore(store_path) as store:
        out = {
            ("r", r.subject, r.proxy, r.domain): (r.score.nll_sum, r.score.tokens)
            for r in store.results()
        }
        out.update(
            {
                ("u", r.subject, r.proxy, r.domain): (r.score.nll_sum, r.score.tokens)
                for r in store.unit_results()
            }
        )
        assert len(out) == store.count("results") + store.count("unit_results")
    return out
