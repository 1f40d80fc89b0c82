"""The built-in demo: a complete data-ablation study on CPU, in minutes, no download.

1. **corpus**: text of this machine's Python standard library
   (:mod:`megablocks_ablate.corpora.stdlib`): 8 partitions (``docs`` and seven code
   families) plus a separate seed corpus; or, with ``--builtin manpages``, English prose
   from its manual pages and package docs (:mod:`megablocks_ablate.corpora.manpages`):
   8 partitions, a seed corpus and 3 out-of-domain evaluation sets (added to the study's
   ``eval.extra``); or the user's JSONL (``--corpus``) with a metadata field naming the
   partition;
2. **tokenizer**: a 2,048-piece SentencePiece BPE trained on it;
3. **preprocess**: partitions by domain, base units, a 2% held-out set per partition
   (the evaluation domains);
4. **study**: ``<out>/study.yaml`` (a normal study spec; rerun or edit it with
   ``megablocks-ablate study run``; its paths are relative to it, so ``<out>`` can be
   moved and used from anywhere): one base unit per partition, every k-subset of
   the partitions as a mixture, ``n_seq`` of them validated by seq models;
5. **run**: seed model, unit models, seq models, then every mixture scored by an
   in-memory merge of its unit models (:mod:`.runner`);
6. **report**: ``<out>/study/report/`` and the headline figures.

Every step skips what is already done, so rerunning after a kill continues.
Sizes (:class:`DemoSettings`) train like the paper at CPU scale (the `paperlike`
presets; docs/fidelity.md); wall time and figures are measured in docs/user-guide.md.
"""

from __future__ import annotations

import logging
import os
import time
import typing
from dataclasses import dataclass, field

import yaml

from megablocks_ablate.errors import ConfigError, MBAError
from megablocks_ablate.utils.outputs import claim_output_dir

logger = logging.getLogger(__name__)

DEMO_PROXIES = ("fisher", "mean_ind", "ind_id")


@dataclass
class DemoSettings:
    out: str = "demo_out"
    corpus: str | None = None  # user JSONL; default: the built-in stdlib corpus
    seed_corpus: str | None = None  # JSONL for the seed; default: built-in "general", or
    # with --corpus the whole corpus (natural proportions)
    partition_by: str = "domain"
    order_by: str | None = None
    vocab_size: int = 2048
    # The paper-like regime (docs/fidelity.md, 2026-12-06): the `paperlike` presets (a
    # 205K-parameter model, seed 4.2M tokens = 20 per parameter, unit and seq models from
    # the seed's AdamW state, as measured), 32K-token base units trained for 3 passes (96K
    # tokens: 94 steps, 2.3% of the seed), 2% of each partition held out.
    heldout_fraction: float = 0.02
    unit_tokens: str = "32k"  # base unit size (the unit-model budget at one pass)
    unit_passes: int = 3  # passes over its base unit per unit model: budget = passes x size
    seed_tokens: str = "4.2M"
    # every pair scored, 12 of the 28 validated (docs/fidelity.md: random 12-pair sets read
    # the all-pairs figure to +-0.02; 6 k=3 triples swung by +-0.3)
    k: int = 2  # mixtures: every k-subset of the partitions
    n_seq: int = 12  # seq validation models (k x unit budget each)
    preset: str = "paperlike"  # configs/train/<preset>_{seed,unit,seq}.yaml
    train_overrides: list[str] = field(default_factory=list)  # applied to every model
    workers: int = 2
    max_partitions: int | None = None  # keep the first N partitions (smaller demos)
    builtin: str = "stdlib"  # the built-in corpus without --corpus: one of BUILTINS
    eval_extra: list[str] = field(default_factory=list)  # more eval sets: PATH or NAME=PATH
    # The Fisher-weighted merge heads the demo: on both built-in corpora it predicts seq
    # models better than the paper's plain merge (docs/fidelity.md, seventh session), and
    # scoring both would cost the demo ~50 s more (28 more merges); add `merged` to compare.
    proxies: list[str] = field(default_factory=lambda: list(DEMO_PROXIES))
    corpus_root: str = "/"  # filesystem prefix the manpages corpus is read from (tests)

    def __post_init__(self) -> None:
        if self.builtin not in BUILTINS:
            raise ConfigError(
                f"--builtin: unknown corpus {self.builtin!r} (known: {', '.join(BUILTINS)})"
            )
        if self.corpus and self.builtin != "stdlib":
            raise ConfigError(f"--builtin {self.builtin} and --corpus: give one of them")
        if self.unit_passes < 1:
            raise ConfigError(f"--unit-passes: must be >= 1, got {self.unit_passes}")
        if self.workers < 1:
            raise ConfigError(f"--workers: must be >= 1, got {self.workers}")
        from megablocks_ablate.ablate.spec import ProxyName

        known = typing.get_args(ProxyName)
        bad = [p for p in self.proxies if p not in known]
        if bad or not self.proxies or len(set(self.proxies)) != len(self.proxies):
            raise ConfigError(
                f"--proxies: expected distinct names among {', '.join(known)}, got "
                f"{','.join(self.proxies) or 'none'}"
            )
        if "scaled" in self.proxies and not self.n_seq:
            raise ConfigError("--proxies scaled: fits its lambda on seq models: --n-seq >= 8")

    def validate(self, *, check_n_seq: bool = True) -> dict:
        """Check every option before anything is written (ConfigError naming the option):
        counts, k against the partitions the demo will have (when known before the data
        is built), the input files, the train presets with the overrides as the study will
        apply them (``{seed,unit,seq}`` configs and their models resolved), the preprocess
        settings and the claim on ``out``. Touches nothing; returns the resolved train
        configs by role. ``check_n_seq``: also check ``n_seq`` against the k-subsets
        (``demo --proportions`` validates blends instead)."""
        import math

        from megablocks_ablate.config import parse_count
        from megablocks_ablate.utils.outputs import check_output_dir

        for flag, text in (
            ("--unit-tokens", self.unit_tokens),
            ("--seed-tokens", self.seed_tokens),
        ):
            if parse_count(text, flag) < 1:
                raise ConfigError(f"{flag}: expected a count >= 1, got {text!r}")
        for flag, n, lo in (
            ("--k", self.k, 1),
            ("--n-seq", self.n_seq, 0),
            ("--vocab-size", self.vocab_size, 1),
        ):
            if n < lo:
                raise ConfigError(f"{flag}: expected an integer >= {lo}, got {n}")
        if self.max_partitions is not None and self.max_partitions < 1:
            raise ConfigError(
                f"--max-partitions: expected an integer >= 1, got {self.max_partitions}"
            )
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(
                f"--heldout-fraction: expected a number in [0, 1), got {self.heldout_fraction}"
            )
        n_parts = known_partitions(self)
        if n_parts is not None and n_parts < self.k:
            raise ConfigError(
                f"--k {self.k}: the demo has {n_parts} partition(s)"
                + (" (--max-partitions)" if self.max_partitions == n_parts else "")
                + f", fewer than k={self.k}; lower --k"
            )
        if check_n_seq and n_parts is not None and self.n_seq > math.comb(n_parts, self.k):
            raise ConfigError(
                f"--n-seq {self.n_seq}: more seq validation models than the "
                f"{math.comb(n_parts, self.k)} {self.k}-subsets of {n_parts} partitions"
            )
        if self.corpus and not os.path.isfile(self.corpus):
            raise ConfigError(f"--corpus: no such file: {self.corpus}")
        if self.seed_corpus and not os.path.isfile(self.seed_corpus):
            raise ConfigError(f"--seed-corpus: no such file: {self.seed_corpus}")
        _check_eval_extra(self)
        configs = _train_configs(self)
        _preprocess_config(self, self.corpus or os.path.join(self.out, "corpus.jsonl"), "")
        check_output_dir(
            self.out, demo_kind(self), reuse=True, inputs=[self.corpus, self.seed_corpus]
        )
        return configs

    @property
    def unit_budget(self) -> int:
        """Tokens each unit model trains on: ``unit_passes`` x the base unit size."""
        from megablocks_ablate.config import parse_count

        return self.unit_passes * parse_count(self.unit_tokens, "--unit-tokens")


BUILTINS = ("stdlib", "manpages")
# The manpages partitions have 560-960 documents each (the stdlib ones thousands); 2% is
# the stdlib demo's share too (preprocess keeps at least one held-out document anyway).
MANPAGES_HELDOUT_FRACTION = 0.02


def ood_sets(s: DemoSettings) -> dict[str, str]:
    """{name: path} of the built-in corpus's out-of-domain evaluation sets,
    ``<out>/ood/<name>.jsonl`` (manpages: 3; stdlib: ``general``, files of the seed
    corpus held out from the seed; none for a user corpus)."""
    if s.corpus:
        return {}
    if s.builtin == "stdlib":
        from megablocks_ablate.corpora.stdlib import OOD_SET

        return {} if s.seed_corpus else {OOD_SET: os.path.join(s.out, "ood", f"{OOD_SET}.jsonl")}
    from megablocks_ablate.corpora.manpages import OOD_SETS

    return {n: os.path.join(s.out, "ood", f"{n}.jsonl") for n in OOD_SETS}


def eval_extra(s: DemoSettings) -> list[str]:
    """The study's ``eval.extra``: the built-in out-of-domain sets, then ``--eval-extra``."""
    return list(ood_sets(s).values()) + list(s.eval_extra)


def known_partitions(s: DemoSettings) -> int | None:
    """How many partitions the demo's study will have, when known before the data is
    built (a built-in corpus, or ``--max-partitions``); an upper bound: partitions without
    a full base unit are dropped later."""
    if s.corpus:
        return s.max_partitions
    if s.builtin == "manpages":
        from megablocks_ablate.corpora.manpages import DOMAINS
    else:
        from megablocks_ablate.corpora.stdlib import DOMAINS
    return min(len(DOMAINS), s.max_partitions or len(DOMAINS))


def demo_kind(s: DemoSettings) -> str:
    """The output kind of ``s.out``: a manpages demo's corpus, tokenizer and data must never
    be taken for (or reused by) a stdlib demo's in the same directory."""
    return "demo" if s.corpus or s.builtin == "stdlib" else f"demo-{s.builtin}"


def train_overrides(s: DemoSettings, seed_data: str) -> dict[str, list[str]]:
    """``{seed,unit,seq}``: the overrides the study applies to each role's train preset."""
    over = list(s.train_overrides)
    unit = s.unit_tokens if s.unit_passes == 1 else s.unit_budget
    return {
        "seed": over
        + [
            f"data.manifest={seed_data}",
            f"out_dir={os.path.join(s.out, 'seed')}",
            f"train_tokens={s.seed_tokens}",
        ],
        "unit": over + [f"train_tokens={unit}"],
        "seq": list(over),
    }


def _train_configs(s: DemoSettings) -> dict:
    """The train presets ``<preset>_{seed,unit,seq}`` with the study's overrides, resolved
    with their models (no data needed); ConfigError naming ``--preset`` or the override."""
    from megablocks_ablate.ablate.runner.plan import load_train_config
    from megablocks_ablate.config import known_presets, shipped_preset_dir

    known = set(known_presets(shipped_preset_dir("train")))
    roles = ("seed", "unit", "seq")
    missing = [f"{s.preset}_{r}" for r in roles if f"{s.preset}_{r}" not in known]
    if missing:
        full = sorted(n.rsplit("_", 1)[0] for n in known if n.endswith("_seed"))
        full = [n for n in full if all(f"{n}_{r}" in known for r in roles)]
        raise ConfigError(
            f"--preset {s.preset}: no train preset {', '.join(missing)} "
            f"(presets with _seed, _unit and _seq: {', '.join(full)})"
        )
    seed_data = os.path.join(s.out, "seed_data")
    configs = {}
    for role, over in train_overrides(s, seed_data).items():
        cfg = load_train_config(f"{role} model ({s.preset}_{role})", f"{s.preset}_{role}", over)
        try:
            cfg.model_config()
        except MBAError as e:
            raise ConfigError(f"{role} model ({s.preset}_{role}): {e}") from None
        configs[role] = cfg
    return configs


def _preprocess_config(s: DemoSettings, corpus: str, tok_path: str):
    """The preprocess config of the partitions (checked by :meth:`DemoSettings.validate`
    with a placeholder tokenizer)."""
    from megablocks_ablate.data.preprocess import PreprocessConfig

    return PreprocessConfig.from_dict(
        dict(
            input=[corpus],
            out=os.path.join(s.out, "data"),
            tokenizer=tok_path,
            partition_by=[s.partition_by],
            order_by=s.order_by or (None if s.corpus else "order"),
            unit_tokens=s.unit_tokens,
            heldout_fraction=s.heldout_fraction,
            workers=s.workers,
        )
    )


def _check_eval_extra(s: DemoSettings) -> None:
    """Fail before any work when an ``--eval-extra`` file is missing (the study spec would
    only find out after the corpus, tokenizer and preprocess)."""
    for item in s.eval_extra:
        target = item.partition("=")[2] if "=" in item and not os.path.exists(item) else item
        if not target or (not any(c in target for c in "*?[") and not os.path.exists(target)):
            raise ConfigError(f"--eval-extra {item}: no such file or directory: {target!r}")


def _step(i: int, n: int, msg: str, t0: float) -> None:
    logger.info("[%d/%d] %s  (%.0f s)", i, n, msg, time.time() - t0)


def build_data(s: DemoSettings, t0: float, *, validated: bool = False) -> tuple[str, str]:
    """Corpus, tokenizer, preprocess; returns (data dir, seed data dir). Every option is
    checked first (:meth:`DemoSettings.validate`, unless the caller did: ``validated``)."""
    from megablocks_ablate.data.preprocess import PreprocessConfig, run_preprocess
    from megablocks_ablate.data.tokenizer import load_tokenizer, train_sentencepiece

    if not validated:
        s.validate(check_n_seq=False)
    claim_output_dir(s.out, demo_kind(s), reuse=True, inputs=[s.corpus, s.seed_corpus])
    if s.corpus:
        corpus, seed_corpus = s.corpus, s.seed_corpus
        _step(1, 6, f"corpus: {corpus} (partitions from field {s.partition_by!r})", t0)
    elif s.builtin == "manpages":
        corpus, seed_corpus = _manpage_corpus(s, t0)
    else:
        corpus, seed_corpus = _stdlib_corpus(s, t0)

    tok_path = os.path.join(s.out, "tokenizer.model")
    if not os.path.isfile(tok_path):
        train_sentencepiece(
            [corpus] + ([seed_corpus] if seed_corpus else []),
            tok_path,
            vocab_size=s.vocab_size,
            num_threads=2,
        )
    tok = load_tokenizer(tok_path)
    _step(2, 6, f"tokenizer: {tok_path} ({tok.vocab_size} pieces)", t0)

    data = os.path.join(s.out, "data")
    run_preprocess(_preprocess_config(s, corpus, tok_path))
    seed_data = data
    if seed_corpus:
        seed_data = os.path.join(s.out, "seed_data")
        run_preprocess(
            PreprocessConfig.from_dict(
                dict(
                    input=[seed_corpus],
                    out=seed_data,
                    tokenizer=tok_path,
                    partition_by=[s.partition_by],
                    workers=s.workers,
                )
            )
        )
    _step(
        3, 6, f"preprocess: {data}" + (f", seed data {seed_data}" if seed_data != data else ""), t0
    )
    return data, seed_data


def _stdlib_corpus(s: DemoSettings, t0: float) -> tuple[str, str]:
    """The stdlib corpus, its seed corpus and (without ``--seed-corpus``) the held-out
    seed files as the out-of-domain set, written once; returns (corpus, seed corpus)."""
    from megablocks_ablate.corpora.stdlib import OOD_SET, write_corpus, write_seed_and_ood

    corpus = os.path.join(s.out, "corpus.jsonl")
    seed_corpus = s.seed_corpus or os.path.join(s.out, "seed.jsonl")
    if not os.path.isfile(corpus):
        write_corpus(corpus)
    ood = ood_sets(s)
    if not s.seed_corpus and not all(os.path.isfile(p) for p in (seed_corpus, *ood.values())):
        os.makedirs(os.path.join(s.out, "ood"), exist_ok=True)
        write_seed_and_ood(seed_corpus, ood[OOD_SET])
    _step(
        1,
        6,
        f"corpus: Python standard library -> {corpus} (8 partitions) + seed corpus "
        f"{seed_corpus}" + (f" + out-of-domain set {', '.join(ood.values())}" if ood else ""),
        t0,
    )
    return corpus, seed_corpus


def _manpage_corpus(s: DemoSettings, t0: float) -> tuple[str, str]:
    """The manual-page corpus, its seed and its out-of-domain sets, written once (one
    build makes all of them, so they are disjoint); returns (corpus, seed corpus)."""
    from megablocks_ablate.corpora.manpages import DOMAINS, write_all

    corpus = os.path.join(s.out, "corpus.jsonl")
    seed = os.path.join(s.out, "seed.jsonl")
    ood = ood_sets(s)
    if not all(os.path.isfile(p) for p in (corpus, seed, *ood.values())):
        write_all(s.out, root=s.corpus_root)
    seed_corpus = s.seed_corpus or seed
    _step(
        1,
        6,
        f"corpus: manual pages -> {corpus} ({len(DOMAINS)} partitions) + seed corpus "
        f"{seed_corpus} + out-of-domain sets {', '.join(ood.values())}",
        t0,
    )
    return corpus, seed_corpus


def study_spec(
    s: DemoSettings, data: str, seed_data: str, partitions: dict[str, list[str]] | None = None
) -> dict:
    """The demo's study spec (what ``<out>/study.yaml`` holds): one base unit per
    partition (the first), or ``partitions`` as given."""
    if partitions is None:
        from megablocks_ablate.data.manifest import Manifest

        units = Manifest.load(data).partition_units()
        names = list(units)[: s.max_partitions] if s.max_partitions else list(units)
        partitions = {p: [units[p][0]] for p in names}
    if len(partitions) < s.k:
        raise ConfigError(
            f"the corpus has {len(partitions)} partition(s) with a full base unit "
            f"of {s.unit_tokens} tokens, fewer than k={s.k}: use a larger corpus or "
            "a smaller --unit-tokens"
        )
    out = os.path.join(s.out, "study")
    over = train_overrides(s, seed_data)
    return {
        "name": f"{s.builtin}-demo" if not s.corpus else f"demo-{os.path.basename(s.corpus)}",
        "data": data,
        "out_dir": out,
        "seed": {
            "config": f"{s.preset}_seed",
            "overrides": over["seed"],
        },
        "unit": {"config": f"{s.preset}_unit", "overrides": over["unit"]},
        "partitions": partitions,
        "mixtures": {"k_subsets": s.k},
        "proxies": list(s.proxies),
        "eval": {"heldout": True, "extra": eval_extra(s)},
        "validation": {
            "n": s.n_seq,
            "seed": 0,
            "train": {"config": f"{s.preset}_seq", "overrides": over["seq"]},
        },
    }


def run_demo(s: DemoSettings) -> int:
    from megablocks_ablate.ablate.report import write_report
    from megablocks_ablate.ablate.runner import RunOptions, StudyRunner, resolve
    from megablocks_ablate.ablate.spec import StudySpec, describe_plan
    from megablocks_ablate.ablate.spec_paths import record_spec_paths
    from megablocks_ablate.ablate.store import ResultStore, store_path
    from megablocks_ablate.utils.atomic import atomic_write_text

    t0 = time.time()
    s.validate()  # every option, before the first write
    data, seed_data = build_data(s, t0, validated=True)
    spec_path = os.path.join(s.out, "study.yaml")
    # its paths are relative to study.yaml (the demo's own files always): <out> can move
    spec = record_spec_paths(study_spec(s, data, seed_data), spec_path, inside=s.out)
    atomic_write_text(spec_path, yaml.safe_dump(spec, sort_keys=False))
    study = resolve(StudySpec.load(spec_path))
    c = study.cost
    _step(
        4,
        6,
        f"study: {spec_path}: {len(study.partitions)} partitions (one unit each), "
        f"{len(study.mixtures)} mixtures, {len(study.validation)} seq validations; "
        f"training {c.modular_tokens + c.seq_validation_tokens:,} tokens after the seed "
        f"(a seq model per mixture would be {c.naive_tokens:,})",
        t0,
    )
    logger.info(
        "%s",
        "\n".join(
            "      " + line
            for line in describe_plan(study).splitlines()
            if not line.startswith("    ") or "[seq" in line
        ),
    )

    runner = StudyRunner(study, RunOptions(cpu_workers=s.workers))
    try:
        plan = runner.train()
        _step(5, 6, "seed, unit and seq models trained; evaluating", t0)
        runner.evaluate(plan)
    finally:
        runner.close()
    with ResultStore(store_path(study.spec.out_dir)) as store:
        summary = write_report(store, os.path.join(study.spec.out_dir, "report"))
        spent = store.get_meta("spent", {})
    _step(6, 6, "report written", t0)
    logger.info(
        "demo finished in %.0f s; tokens trained: %s",
        time.time() - t0,
        ", ".join(f"{k} {v:,}" for k, v in spent.items()),
    )
    print(summary.headline())  # the result, on stdout
    return 0
