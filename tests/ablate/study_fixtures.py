"""A synthetic study in a results store: known structure, no training.

Imported by the analysis, report and search tests (``from study_fixtures import ...``).
Six partitions (``c`` holds two units, so macro != micro), held-out domains for each
plus two extra domains, all 2-subsets as mixtures, half of them with seq results.
Each partition p has an affinity ``a[p, d]`` to each domain; a model trained on a
mixture has log-perplexity ``base_d - mean affinity``, plus small noise: merged tracks
seq closely, mean_ind less so.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
from types import ModuleType

import numpy as np

from megablocks_ablate.ablate.mixtures import Mixture, Score, proxy_weights
from megablocks_ablate.ablate.store import Result, ResultStore, make_provenance
from megablocks_ablate.data.manifest import MANIFEST_FORMAT

PARTITIONS = {
    "a": ["a-0000"],
    "b": ["b-0000"],
    "c": ["c-0000", "c-0001"],
    "d": ["d-0000"],
    "e": ["e-0000"],
    "f": ["f-0000"],
}
EXTRA = ["wiki", "code"]
DOMAINS = list(PARTITIONS) + EXTRA
TOKENS = 1000


def score(log_ppl: float, tokens: int = TOKENS) -> Score:
    return Score(nll_sum=log_ppl * tokens, tokens=tokens, bytes=4 * tokens)


def fill_store(path: str, seed: int = 0, n_seq: int = 8) -> tuple[ResultStore, list[Mixture]]:
    rng = np.random.default_rng(seed)
    names = list(PARTITIONS)
    aff = {(p, d): rng.uniform(0.0, 1.0) + (0.8 if p == d else 0.0) for p in names for d in DOMAINS}
    base = {d: 3.0 + 0.3 * i for i, d in enumerate(DOMAINS)}
    mixtures = [Mixture.of({p: PARTITIONS[p] for p in c}) for c in itertools.combinations(names, 2)]
    store = ResultStore(path)
    store.add_mixtures(mixtures)
    store.set_meta(
        "study",
        {
            "name": "synthetic",
            "proxies": ["merged", "macro", "micro", "mean_ind", "ind_id"],
            "partitions": PARTITIONS,
            "domain_units": {p: list(us) for p, us in PARTITIONS.items()},
            "eval_sets": {d: f"/eval/{d}.jsonl" for d in DOMAINS},
            "unit_tokens": 440_000,
            "mixtures": [m.id for m in mixtures],
            "validation": [m.id for m in mixtures[:n_seq]],
        },
    )

    def log_ppl(m: Mixture, d: str) -> float:
        return base[d] - float(np.mean([aff[p, d] for p in m.names]))

    rows = []
    for i, m in enumerate(mixtures):
        for d in DOMAINS:
            lp = log_ppl(m, d)
            for proxy in ("merged", "macro", "micro"):
                rows.append(
                    Result(
                        m.id,
                        proxy,
                        d,
                        score(lp + 0.1 + rng.normal(0, 0.01)),
                        make_provenance(weights=proxy_weights(m, proxy), eval_fingerprint="fp"),
                    )
                )
            if i < n_seq:
                rows.append(
                    Result(
                        m.id,
                        "seq",
                        d,
                        score(lp + rng.normal(0, 0.01)),
                        make_provenance(eval_fingerprint="fp"),
                    )
                )
    store.add_results(rows)
    unit_rows = []
    for p, units in PARTITIONS.items():
        for u in units:
            for d in DOMAINS:
                unit_rows.append(
                    Result(
                        u,
                        "ind",
                        d,
                        score(base[d] - aff[p, d] + rng.normal(0, 0.05)),
                        make_provenance(eval_fingerprint="fp"),
                    )
                )
    store.add_unit_results(unit_rows)
    return store, mixtures


def ppl(store: ResultStore, subject: str, proxy: str, domain: str) -> float:
    rows = store.unit_results() if proxy == "ind" else store.results(proxy)
    (r,) = [r for r in rows if r.subject == subject and r.domain == domain]
    return math.exp(r.score.nll_sum / r.score.tokens)


# ----------------------------------------------------------------------------- two lines

ROLE_EXTRA = ["x", "y"]  # evaluation-only domains: out-of-domain for every mixture
ID_GAIN = 0.6  # how much lower a seq model's log-perplexity is on its own partitions


def fill_roles_store(
    path: str,
    *,
    order: tuple[str, ...] = ("q", "p", "s", "r"),
    fixed: str | None = None,
    units: dict[str, int] | None = None,
    partition_models: tuple[str, ...] = (),
    with_order: bool = True,
    seed: int = 3,
) -> tuple[ResultStore, list[Mixture], list[tuple[str, str, str, float, float]]]:
    """A store where in-domain and out-of-domain points lie on two different lines.

    Partitions ``order`` (one unit each unless ``units`` says more), held-out sets for
    each plus :data:`ROLE_EXTRA`. Mixtures: every pair, or with ``fixed`` the fixed
    partition paired with each other one; all have seq models. The merged proxies have
    log-perplexity ``L`` (spread over mixtures and domains); seq has ``L - ID_GAIN`` on
    the mixture's own held-out sets and ``L`` elsewhere, plus noise 0.02.
    Unit models (and a partition model ``<p>-part`` for each partition named in
    ``partition_models``, listed in meta ``partition_models``) have known
    log-perplexities too.

    Returns the store, the mixtures and every (mixture id, domain, role, merged
    perplexity, seq perplexity) point, role ``"id"`` when the mixture holds the
    domain's partition.
    """
    rng = np.random.default_rng(seed)
    units = units or {}
    parts = {p: [f"{p}-{i:04d}" for i in range(units.get(p, 1))] for p in order}
    domains = list(order) + ROLE_EXTRA
    if fixed is None:
        combos = list(itertools.combinations(order, 2))
    else:
        combos = [(fixed, p) for p in order if p != fixed]
    mixtures = [Mixture.of({p: parts[p] for p in c}) for c in combos]
    base = {d: 2.0 + 0.4 * i for i, d in enumerate(domains)}
    meta = {
        "name": "two-lines",
        "proxies": ["merged", "macro", "micro", "mean_ind", "ind_id"],
        "domain_units": {p: list(us) for p, us in parts.items()},
        "eval_sets": {d: f"/eval/{d}.jsonl" for d in domains},
        "unit_tokens": 1000,
        "mixtures": [m.id for m in mixtures],
        "validation": [m.id for m in mixtures],
    }
    if with_order:
        meta["partitions"] = parts
    if partition_models:
        meta["partition_models"] = {p: f"{p}-part" for p in partition_models}
    store = ResultStore(path)
    store.add_mixtures(mixtures)
    store.set_meta("study", meta)
    rows, points = [], []
    for m in mixtures:
        for d in domains:
            lp = base[d] + rng.uniform(0.0, 1.0)
            role = "id" if d in m.names else "ood"
            seq_lp = lp - (ID_GAIN if role == "id" else 0.0) + rng.normal(0, 0.02)
            for proxy in ("merged", "macro", "micro"):
                rows.append(
                    Result(m.id, proxy, d, score(lp), make_provenance(eval_fingerprint="fp"))
                )
            rows.append(
                Result(m.id, "seq", d, score(seq_lp), make_provenance(eval_fingerprint="fp"))
            )
            points.append((m.id, d, role, math.exp(lp), math.exp(seq_lp)))
    store.add_results(rows)
    subjects = [u for us in parts.values() for u in us]
    subjects += [f"{p}-part" for p in partition_models]
    unit_rows = [
        Result(s, "ind", d, score(base[d] + 0.5 + rng.uniform(0, 0.5) - (0.8 if s[0] == d else 0)))
        for s in subjects
        for d in domains
    ]
    store.add_unit_results(unit_rows)
    return store, mixtures, points


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(name, f"{root}/benchmarks/{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_manifest_dir(d, parts: dict[str, int]) -> str:
    """A preprocess output ``d`` (a pathlib.Path) holding only its manifest and one
    one-line held-out set per partition: ``parts`` maps partition -> number of units."""
    (d / "heldout").mkdir(parents=True)
    partitions, units = {}, {}
    for p, n in parts.items():
        names = [f"{p}-{i:04d}" for i in range(n)]
        (d / "heldout" / f"{p}.jsonl").write_text(json.dumps({"text": f"{p} text"}) + "\n")
        partitions[p] = {"units": names, "heldout": {"path": f"heldout/{p}.jsonl"}}
        units.update({u: {"partition": p, "prefix": f"units/{u}"} for u in names})
    manifest = {
        "format": MANIFEST_FORMAT,
        "tokenizer": {"fingerprint": "x"},
        "partitions": partitions,
        "units": units,
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return str(d)
