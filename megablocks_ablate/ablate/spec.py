"""The study spec: one YAML file describing a whole data-ablation study.

:class:`StudySpec` is the typed file (see ``configs/studies/demo.yaml`` and
docs/studies.md); :func:`resolve` checks it against the preprocessed data and returns
a :class:`Study`: the partitions (groups of base units), every mixture to score, the
validation mixtures that get seq models, the evaluation domains and the cost. All
checks happen here, before any training or evaluation, and every error names the
spec field at fault::

    spec = StudySpec.load("configs/studies/demo.yaml", ["mixtures.k_subsets=3"])
    study = resolve(spec)
    for m in study.mixtures: ...

Relative paths in a spec file are relative to the spec file's directory, so a study
directory can move and be used from anywhere (:mod:`.spec_paths` has the rule and the
two cases that keep the working directory: the shipped presets, and an older spec whose
``data`` exists only relative to the working directory).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.mixtures import Mixture
from megablocks_ablate.ablate.spec_eval import EvalSpec, partitions_without_heldout, resolve_eval
from megablocks_ablate.ablate.spec_names import study_spec_file
from megablocks_ablate.ablate.spec_paths import map_spec_paths, resolve_spec_paths
from megablocks_ablate.ablate.spec_proxies import FisherSpec, ScaledSpec
from megablocks_ablate.config import (
    Config,
    doc,
)
from megablocks_ablate.errors import ConfigError, MBAError

logger = logging.getLogger(__name__)

ProxyName = Literal["merged", "macro", "micro", "mean_ind", "ind_id", "scaled", "fisher"]


# ----------------------------------------------------------------------------- the file


@dataclass
class TrainRef(Config):
    """A training config: a YAML path or a preset name (configs/train/<name>.yaml)."""

    config: str = doc("train config YAML path, or a preset name such as demo_unit", "")
    overrides: list[str] = doc("key=value overrides of that config", default_factory=list)


@dataclass
class SeedSpec(Config):
    """The seed model every unit and seq model continues from."""

    checkpoint: str | None = doc("an existing seed checkpoint directory", None)
    config: str | None = doc("or a seed train config (path or preset) to train it", None)
    overrides: list[str] = doc("key=value overrides of the seed train config", default_factory=list)

    def validate(self) -> None:
        if self.checkpoint and self.config:
            raise ConfigError("give exactly one of seed.checkpoint or seed.config, not both")


@dataclass
class RandomMixtures(Config):
    k: int = doc("partitions per mixture", 2)
    n: int = doc("how many distinct k-subsets to draw (all if fewer exist)", 10)
    seed: int = doc("sampling seed", 0)


@dataclass
class DirichletMixtures(Config):
    """Proportion mixtures drawn from a Dirichlet: n share vectors over all partitions,
    or each over a k-subset drawn uniformly (docs/proportions.md)."""

    n: int = doc("how many share vectors to draw", 8)
    k: int | None = doc("partitions per vector (None: all partitions)", None)
    alpha: float = doc("Dirichlet concentration (1: uniform on the simplex)", 1.0)
    seed: int = doc("sampling seed", 0)


@dataclass
class MixturesSpec(Config):
    """Candidate mixtures; every form given is used, duplicates are scored once."""

    explicit: list[list[str]] = doc("mixtures as lists of partition names", default_factory=list)
    k_subsets: int | None = doc("every k-subset of the partitions", None)
    random: RandomMixtures | None = doc("a seeded sample of n k-subsets", None)
    leave_one_out: list[str] = doc(
        "a base mixture and each one-partition-less mixture", default_factory=list
    )
    add_one: list[str] = doc(
        "a base mixture and the base plus each other partition", default_factory=list
    )
    weighted: list[dict[str, float]] = doc(
        "proportion mixtures as {partition: share} (shares are normalised to sum 1)",
        default_factory=list,
    )
    dirichlet: DirichletMixtures | None = doc("a seeded Dirichlet sample of proportions", None)

    @property
    def empty(self) -> bool:
        return not (
            self.weighted
            or self.dirichlet is not None
            or self.explicit
            or self.k_subsets is not None
            or self.random is not None
            or self.leave_one_out
            or self.add_one
        )


@dataclass
class ValidationSpec(Config):
    """Mixtures that also get a seq model trained on their union, to validate the proxies."""

    mixtures: list[list[str]] = doc(
        "explicit validation mixtures (each among the study's)", default_factory=list
    )
    weighted: list[dict[str, float]] = doc(
        "explicit proportion validation mixtures {partition: share} (each among the study's)",
        default_factory=list,
    )
    n: int = doc("plus this many more drawn at random from the study's mixtures", 0)
    seed: int = doc("seed of that draw", 0)
    train_tokens: int | None = doc(
        "one token budget for every seq model, so that blends over different numbers of "
        "partitions compare at equal cost (default: one unit budget per unit of the "
        "mixture, the paper's §2.1.1)",
        None,
    )
    train: TrainRef = field(default_factory=TrainRef)
    model: str | None = doc(
        "model preset for seq models if it differs from the unit "
        "models' (e.g. 1.1b seq vs 130m units, paper §5.4)",
        None,
    )
    ind_seq: bool = doc(
        "cross-scale studies (validation.model set): also train each validation "
        "mixture's seq model at the unit models' scale, scored as the proxy `ind_seq` of "
        "the target-scale seq model (paper Table 4's 'ind seq' column)",
        False,
    )

    def validate(self) -> None:
        if self.n < 0:
            raise ConfigError(f"validation.n: must be >= 0, got {self.n}")
        if self.train_tokens is not None and self.train_tokens < 1:
            raise ConfigError(f"validation.train_tokens: must be >= 1, got {self.train_tokens}")
        if self.ind_seq and not self.model:
            raise ConfigError(
                "validation.ind_seq: only for cross-scale studies (set validation.model to "
                "the seq models' preset); at one scale the seq models are the unit scale's"
            )


@dataclass
class StudySpec(Config):
    """A data-ablation study (Na et al. 2024): see docs/studies.md."""

    name: str = doc("study name (shown in the report)", "study")
    data: str = doc("preprocess output directory (or its manifest.json)", "")
    out_dir: str = doc("study directory: pool/, seq/, results.sqlite, report/", "")
    seed: SeedSpec = doc(
        "seed checkpoint or seed train config (required)", default_factory=SeedSpec
    )
    unit: TrainRef = doc(
        "unit-model train config (data.unit is set per unit)", default_factory=TrainRef
    )
    partitions: dict[str, list[str]] = doc(
        "partition -> units or manifest partitions (default: the manifest's partitions)",
        default_factory=dict,
    )
    unit_partitions: bool = doc("treat every base unit as its own partition (paper §5.1)", False)
    partition_models: bool = doc(
        "also train one model per partition of several units on all of them, for "
        "len(units) x the unit budget (paper §5.2): `merged` then averages these "
        "partition-level models and `mean_ind` / `ind_id` use their scores, exactly as the "
        "paper defines them (a one-unit partition's model is its unit model)",
        False,
    )
    mixtures: MixturesSpec = doc("candidate mixtures (required)", default_factory=MixturesSpec)
    proxies: list[ProxyName] = doc("proxies to compute", default_factory=lambda: list(mx.PROXIES))
    eval: EvalSpec = field(default_factory=EvalSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    scaled: ScaledSpec = doc(
        "the scaled proxy's lambda grid and split (with proxies: [..., scaled])",
        default_factory=ScaledSpec,
    )
    fisher: FisherSpec = doc(
        "the Fisher-weighted merge's settings (with proxies: [..., fisher])",
        default_factory=FisherSpec,
    )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        overrides: Iterable[str] = (),
        preset_dir: str | os.PathLike | None = None,
        *,
        report_no_ops: bool = True,
    ) -> StudySpec:
        """:meth:`Config.load`, with the file's relative paths resolved against the file's
        directory before the overrides (which are as typed) apply; see :mod:`.spec_paths`.
        A spec's overrides are a user's: those that change nothing are reported."""
        if path is not None:
            path = study_spec_file(path)  # a bare name such as "demo": the packaged preset
        return super().load(path, overrides, preset_dir, report_no_ops=report_no_ops)

    @classmethod
    def _file_loaded(cls, data: dict, path: str) -> None:
        resolve_spec_paths(data, path)

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("data: required (a preprocess output directory)")
        if not self.out_dir:
            raise ConfigError("out_dir: required (the study directory)")
        if not (self.seed.checkpoint or self.seed.config):
            raise ConfigError("seed: required (seed.checkpoint or seed.config)")
        if self.mixtures.empty:
            raise ConfigError(
                "mixtures: give at least one of explicit, k_subsets, random, leave_one_out, "
                "add_one, weighted, dirichlet"
            )
        if not self.unit.config:
            raise ConfigError("unit.config: required (the unit-model train config)")
        if not self.proxies:
            raise ConfigError("proxies: give at least one of " + ", ".join(mx.PROXIES))
        if len(set(self.proxies)) != len(self.proxies):
            raise ConfigError(f"proxies: listed twice in {self.proxies}")
        if "scaled" in self.proxies and not (self.validation.mixtures or self.validation.n):
            raise ConfigError(
                "proxies: scaled fits its lambda on validation mixtures: give validation.n "
                "or validation.mixtures (at least 8, half of them to fit)"
            )
        if (
            self.validation.mixtures or self.validation.weighted or self.validation.n
        ) and not self.validation.train.config:
            raise ConfigError(
                "validation.train.config: required when validation mixtures are "
                "given (the seq-model train config)"
            )


# ----------------------------------------------------------------------------- resolved


@dataclass
class Study:
    """A spec checked against its data: everything a runner or the report needs."""

    spec: StudySpec
    manifest_dir: str
    partitions: dict[str, list[str]]  # study partition -> its units
    mixtures: list[Mixture]
    validation: list[Mixture]
    eval_sets: dict[str, str]  # domain -> JSONL path (or a ``paloma:`` shard reference)
    domain_units: dict[str, list[str]]  # held-out domain -> study units trained on it
    unit_tokens: int
    unit_paths: dict[str, str] = field(default_factory=dict)  # unit -> indexed-data prefix
    # partition -> why no evaluation domain is in-domain for it (see without_heldout)
    no_heldout: dict[str, str] = field(default_factory=dict)

    @property
    def units(self) -> list[str]:
        return [u for us in self.partitions.values() for u in us]

    @property
    def used_units(self) -> list[str]:
        """Units some mixture needs (the pool to train), in partition order."""
        used = {u for m in self.mixtures for u in m.units}
        return [u for u in self.units if u in used]

    @property
    def cost(self) -> mx.Cost:
        return mx.study_cost(
            self.mixtures,
            self.validation,
            self.unit_tokens,
            [len(us) for us in self.partition_jobs.values()],
            self.spec.validation.train_tokens,
        )

    def seq_tokens(self, mixture: Mixture) -> int:
        fixed = self.spec.validation.train_tokens
        return int(fixed) if fixed else mx.seq_tokens(mixture, self.unit_tokens)

    @property
    def partition_models(self) -> dict[str, str]:
        """Partition -> the name of its partition-level model, for the partitions some
        mixture uses (empty unless ``partition_models: true``)."""
        if not self.spec.partition_models:
            return {}
        used = {g for m in self.mixtures for g in m.names}
        return {g: mx.partition_model_name(g, us) for g, us in self.partitions.items() if g in used}

    @property
    def partition_jobs(self) -> dict[str, list[str]]:
        """Partition-level models to train: used partitions of several units -> their units
        (a one-unit partition's model is its unit model)."""
        return {g: self.partitions[g] for g in self.partition_models if len(self.partitions[g]) > 1}

    def merge_plan(self, mixture: Mixture) -> list[tuple[dict[str, float], list[str]]]:
        """The distinct merges ``mixture`` needs for this study's proxies."""
        return mx.merge_plan(mixture, self.spec.proxies, self.partition_models)

    def without_heldout(self) -> dict[str, str]:
        """Study partition -> why it has no held-out set: no evaluation domain is
        in-domain for any of its units, so the report has no in-domain row for it and it
        is no evaluation domain (e.g. preprocess could not hold out a document of a
        one-document partition). Empty when every partition is evaluated in-domain."""
        return dict(self.no_heldout)

    def to_meta(self, store_file: str | None = None) -> dict:
        """What a results store keeps so that `study report` needs nothing else.
        ``store_file``: the store it goes to; the spec's and the evaluation sets' paths
        are recorded relative to it when relative (see :mod:`.store`)."""
        from megablocks_ablate.utils.paths import record_path

        spec = self.spec.to_dict()
        eval_sets = dict(self.eval_sets)
        if store_file is not None:
            map_spec_paths(spec, lambda _f, p: record_path(p, store_file), os.path.exists)
            eval_sets = {
                d: p if p.startswith("paloma:") else record_path(p, store_file)
                for d, p in eval_sets.items()
            }
        return {
            "name": self.spec.name,
            "proxies": list(self.spec.proxies),
            "partitions": self.partitions,
            "partitions_without_heldout": self.without_heldout(),
            "domain_units": self.domain_units,
            "eval_sets": eval_sets,
            "unit_tokens": self.unit_tokens,
            "mixtures": [m.id for m in self.mixtures],
            "validation": [m.id for m in self.validation],
            "partition_models": self.partition_models,
            "spec": spec,
        }


def _resolve_partitions(spec: StudySpec, manifest) -> dict[str, list[str]]:
    by_manifest = manifest.partition_units()
    parts: dict[str, list[str]] = {}
    if not spec.partitions:
        parts = {p: list(us) for p, us in by_manifest.items()}
    else:
        owner: dict[str, str] = {}  # unit -> the partition listing it
        for name, entries in spec.partitions.items():
            if not entries:
                raise ConfigError(f"partitions.{name}: empty (list units or manifest partitions)")
            units: list[str] = []
            for entry in entries:
                if entry in manifest.units:
                    new = [entry]
                elif entry in by_manifest:
                    new = by_manifest[entry]
                else:
                    raise ConfigError(
                        f"partitions.{name}: unknown unit or partition {entry!r} (manifest "
                        f"partitions: {', '.join(sorted(by_manifest))}; units are named like "
                        f"{next(iter(manifest.units), '?')!r})"
                    )
                for u in new:
                    if u in owner:
                        where = "twice in" if owner[u] == name else f"in both {owner[u]} and"
                        raise ConfigError(f"partitions: unit {u!r} is listed {where} {name}")
                    owner[u] = name
                units.extend(new)
            parts[name] = units
    if spec.unit_partitions:
        parts = {u: [u] for us in parts.values() for u in us}
    if not parts:
        raise ConfigError(f"data: {manifest.root} has no base units")
    return parts


Blend = tuple[tuple[str, ...], dict[str, float] | None]  # partitions, shares (None: equal)


def _resolve_mixtures(spec: MixturesSpec, names: list[str]) -> list[Blend]:
    known = set(names)

    def check(field_name: str, members) -> tuple[str, ...]:
        members = tuple(members)
        if not members:
            raise ConfigError(f"{field_name}: empty mixture")
        for p in members:
            if p not in known:
                raise ConfigError(
                    f"{field_name}: unknown partition {p!r} (partitions: {', '.join(names)})"
                )
        if len(set(members)) != len(members):
            raise ConfigError(f"{field_name}: partition listed twice in {list(members)}")
        return members

    def check_k(field_name: str, k: int) -> None:
        if k < 1:
            raise ConfigError(f"{field_name}: k must be >= 1, got {k}")
        if k > len(names):
            raise ConfigError(
                f"{field_name}: k={k} is larger than the number of partitions "
                f"({len(names)}: {', '.join(names)})"
            )

    out: list[tuple[str, ...]] = []
    for i, m in enumerate(spec.explicit):
        out.append(check(f"mixtures.explicit[{i}]", m))
    blends: list[Blend] = []
    for i, shares in enumerate(spec.weighted):
        blends.append(_check_shares(f"mixtures.weighted[{i}]", shares, check))
    if spec.dirichlet is not None:
        d = spec.dirichlet
        try:
            drawn = mx.dirichlet_shares(names, d.n, d.alpha, d.seed, d.k)
        except ValueError as e:
            raise ConfigError(f"mixtures.dirichlet: {e}") from None
        blends += [(tuple(s), s) for s in drawn]
    if spec.k_subsets is not None:
        check_k("mixtures.k_subsets", spec.k_subsets)
        out += mx.k_subsets(names, spec.k_subsets)
    if spec.random is not None:
        check_k("mixtures.random.k", spec.random.k)
        if spec.random.n < 1:
            raise ConfigError(f"mixtures.random.n: must be >= 1, got {spec.random.n}")
        picked = mx.random_subsets(names, spec.random.k, spec.random.n, spec.random.seed)
        _report_idle_random(spec.random, len(names), picked, set(out))
        out += picked
    if spec.leave_one_out:
        base = check("mixtures.leave_one_out", spec.leave_one_out)
        if len(base) < 2:
            raise ConfigError("mixtures.leave_one_out: the base mixture needs >= 2 partitions")
        out += mx.leave_one_out(base)
    if spec.add_one:
        base = check("mixtures.add_one", spec.add_one)
        if len(base) == len(names):
            raise ConfigError("mixtures.add_one: the base mixture already holds every partition")
        out += mx.add_one(base, names)
    return [(m, None) for m in out] + blends


def _report_idle_random(r: RandomMixtures, n_names: int, drawn: list, before: set) -> None:
    """Warn when ``mixtures.random`` asks for more than it can add (e.g. n=50 2-subsets
    of 8 partitions, all 28 of them already k_subsets: 2 mixtures)."""
    why = []
    if r.n > len(drawn):
        why.append(f"only {len(drawn)} {r.k}-subsets of {n_names} partitions exist")
    if before and before.issuperset(drawn):
        why.append("every one drawn is already a mixture of the study (k_subsets/explicit)")
        logger.warning("mixtures.random (n=%d, k=%d) adds no mixture: %s", r.n, r.k, "; ".join(why))
    elif why:
        logger.warning("mixtures.random.n=%d draws %d: %s", r.n, len(drawn), why[0])


def _check_shares(field_name: str, shares, check) -> Blend:
    if not isinstance(shares, dict) or not shares:
        raise ConfigError(f"{field_name}: expected a non-empty mapping {{partition: share}}")
    members = check(field_name, list(shares))
    try:
        mx.normalise_shares(shares, list(members))
    except ValueError as e:
        raise ConfigError(f"{field_name}: {e}") from None
    return members, {p: float(v) for p, v in shares.items()}


def _resolve_validation(
    spec: ValidationSpec, mixtures: list[Mixture], parts: dict[str, list[str]]
) -> list[Mixture]:
    by_id = {m.id: m for m in mixtures}
    chosen: list[Mixture] = []
    for i, names in enumerate(spec.mixtures):
        unknown = [p for p in names if p not in parts]
        if unknown or not names:
            raise ConfigError(
                f"validation.mixtures[{i}]: {list(names)} is not among the study's "
                "mixtures" + (f" (unknown partition {unknown[0]!r})" if unknown else "")
            )
        m = Mixture.of({p: parts[p] for p in names})
        if m.id not in by_id:
            raise ConfigError(
                f"validation.mixtures[{i}]: {list(names)} is not among the study's mixtures"
            )
        if m not in chosen:
            chosen.append(m)
    for i, shares in enumerate(spec.weighted):
        unknown = [p for p in shares if p not in parts]
        if unknown or not shares:
            raise ConfigError(
                f"validation.weighted[{i}]: {dict(shares)} is not among the study's mixtures"
                + (f" (unknown partition {unknown[0]!r})" if unknown else "")
            )
        try:
            m = mx.weighted_mixture(shares, parts)
        except ValueError as e:
            raise ConfigError(f"validation.weighted[{i}]: {e}") from None
        if m.id not in by_id:
            raise ConfigError(
                f"validation.weighted[{i}]: {dict(shares)} is not among the study's mixtures "
                "(list it under mixtures.weighted too)"
            )
        if m not in chosen:
            chosen.append(m)
    rest = [m for m in mixtures if m not in chosen]
    if spec.n > len(rest):
        raise ConfigError(
            f"validation.n: {spec.n} more validation mixtures asked for, but only "
            f"{len(rest)} other mixtures exist"
        )
    if spec.n:
        rng = np.random.default_rng(spec.seed)
        chosen += [rest[i] for i in sorted(rng.choice(len(rest), size=spec.n, replace=False))]
    return chosen


def resolve_data(spec: StudySpec, unit_tokens: int) -> Study:
    """Check ``spec`` against its data and enumerate the study; raises ConfigError.

    The train configs it names are resolved by the study runner's plan step
    (:func:`megablocks_ablate.ablate.runner.plan.resolve`), which gives ``unit_tokens``:
    this module knows studies, not training.
    """
    from megablocks_ablate.data.manifest import Manifest

    try:
        manifest = Manifest.load(spec.data)
    except MBAError as e:
        raise ConfigError(f"data: {e}") from None
    parts = _resolve_partitions(spec, manifest)
    names_list = _resolve_mixtures(spec.mixtures, list(parts))
    mixtures: list[Mixture] = []
    seen: set[str] = set()
    for names, shares in names_list:
        m = Mixture.of({p: parts[p] for p in names}, shares)
        if m.id not in seen:
            seen.add(m.id)
            mixtures.append(m)
    validation = _resolve_validation(spec.validation, mixtures, parts)
    study_units = {u for us in parts.values() for u in us}
    eval_sets, domain_units = resolve_eval(
        spec.eval, manifest, study_units, parts, spec.unit_partitions
    )
    if spec.seed.checkpoint and not os.path.isdir(spec.seed.checkpoint):
        raise ConfigError(f"seed.checkpoint: no such directory: {spec.seed.checkpoint}")
    return Study(
        spec=spec,
        manifest_dir=manifest.root,
        partitions=parts,
        mixtures=mixtures,
        validation=validation,
        eval_sets=eval_sets,
        domain_units=domain_units,
        unit_tokens=unit_tokens,
        unit_paths={u: manifest.unit_prefix(u) for u in study_units},
        no_heldout=partitions_without_heldout(spec.eval, manifest, parts, domain_units),
    )


def describe_plan(study: Study) -> str:
    """A human-readable plan: partitions, mixtures, validation, evaluation, cost."""
    c = study.cost
    lines = [
        f"study {study.spec.name!r}: data {study.manifest_dir}",
        f"  partitions: {len(study.partitions)}, units: {len(study.units)} "
        f"({len(study.used_units)} used), unit budget {study.unit_tokens:,} tokens",
    ]
    for p, us in study.partitions.items():
        lines.append(
            f"    {p}: {len(us)} unit(s)" + (f" ({', '.join(us)})" if len(us) <= 4 else "")
        )
    lines.append(f"  mixtures: {len(study.mixtures)}; proxies: {', '.join(study.spec.proxies)}")
    val_ids = {m.id for m in study.validation}
    for m in study.mixtures:
        tag = "  [seq validation]" if m.id in val_ids else ""
        lines.append(f"    {m.id}  k={m.k} units={len(m.units)}  {m.label}{tag}")
    lines.append(
        f"  evaluation domains: {len(study.eval_sets)} ({', '.join(study.eval_sets)})"
        f" + {mx.ID_DOMAIN} (each mixture's own held-out sets, pooled)"
    )
    if study.no_heldout:
        lines.append(
            "  partitions without a held-out set (no in-domain row, not an evaluation "
            f"domain): {len(study.no_heldout)} of {len(study.partitions)}"
        )
        lines += [f"    {p}: {why}" for p, why in study.no_heldout.items()]
    if study.partition_jobs:
        lines.append(
            f"  partition-level models: {len(study.partition_jobs)} "
            f"({c.partition_model_tokens:,} tokens): "
            + ", ".join(f"{g} ({len(us)} units)" for g, us in study.partition_jobs.items())
        )
    if study.spec.validation.ind_seq:
        lines.append(
            f"  ind_seq: each seq validation mixture also trained at the unit models' scale "
            f"({c.seq_validation_tokens:,} more tokens at that scale)"
        )
    lines.append(
        f"  cost: {c.units_trained} unit models x {c.unit_tokens:,} = "
        f"{c.modular_tokens:,} tokens; {c.seq_models} seq validation models = "
        f"{c.seq_validation_tokens:,} tokens; a seq model per mixture would be "
        f"{c.naive_tokens:,} tokens ({c.savings:.1f}x the unit models)"
    )
    return "\n".join(lines)
