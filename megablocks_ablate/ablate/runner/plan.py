"""Plan: a study spec resolved against its data and train configs, and the models it needs.

:func:`resolve` turns a :class:`~megablocks_ablate.ablate.spec.StudySpec` into a
:class:`~megablocks_ablate.ablate.spec.Study` (every error before any work);
:class:`Planner` lists the seed, unit and seq models the study needs, each with its
content-keyed registry entry (:mod:`.registry`), so :mod:`.training` knows what to
train and :mod:`.scoring` where to read each model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.runner.registry import Entry, Registry, run_key
from megablocks_ablate.ablate.spec import Study, StudySpec, describe_plan, resolve_data
from megablocks_ablate.ablate.store import ResultStore, store_path
from megablocks_ablate.checkpoint import read_checkpoint_meta
from megablocks_ablate.data.manifest import Manifest
from megablocks_ablate.errors import ConfigError, MBAError
from megablocks_ablate.train.config import TrainConfig
from megablocks_ablate.train.state import is_complete
from megablocks_ablate.utils.verify import file_sha256, verify_sha256

if TYPE_CHECKING:
    from megablocks_ablate.merge.pool_placement import PoolPlanning


def load_train_config(ref_field: str, config: str, overrides: list[str]) -> TrainConfig:
    """A train config named by the spec field ``ref_field``; errors name that field."""
    try:
        return TrainConfig.from_preset(config, overrides)
    except MBAError as e:
        raise ConfigError(f"{ref_field}: {e}") from None


def scored_train_configs(spec: StudySpec) -> dict[str, TrainConfig]:
    """The train configs of the models a study scores, by spec field: ``unit.config``
    (unit and partition-level models, the merges' inputs) and, when the study has seq
    models, ``validation.train.config``; each checked against its model (``seq_len``
    within ``max_seq_len``)."""
    out = {"unit.config": load_train_config("unit.config", spec.unit.config, spec.unit.overrides)}
    if spec.validation.mixtures or spec.validation.n:
        over = list(spec.validation.train.overrides)
        if spec.validation.model:
            over.append(f"model={spec.validation.model}")
        out["validation.train.config"] = load_train_config(
            "validation.train.config", spec.validation.train.config, over
        )
    for ref_field, cfg in out.items():
        try:
            cfg.model_config()
        except MBAError as e:
            raise ConfigError(f"{ref_field}: {e}") from None
    return out


def check_train_configs(spec: StudySpec) -> int:
    """Resolve every train config the spec names; returns the unit budget in tokens."""
    if spec.seed.config:
        seed = load_train_config("seed.config", spec.seed.config, spec.seed.overrides)
        try:
            seed.model_config()
        except MBAError as e:
            raise ConfigError(f"seed.config: {e}") from None
    return int(scored_train_configs(spec)["unit.config"].train_tokens)


def resolve(spec: StudySpec) -> Study:
    """Check ``spec`` against its train configs and data and enumerate the study."""
    return resolve_data(spec, check_train_configs(spec))


def load_study(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Load a study YAML (plus ``key=value`` overrides) and resolve it."""
    return resolve(StudySpec.load(path, overrides))


@dataclass
class ModelJob:
    """One model the study needs: a unit model or a seq model."""

    kind: str  # "unit" | "partition" | "seq" | "ind_seq"
    name: str  # unit name, partition-level model name, or mixture id
    cfg: TrainConfig  # out_dir set to the entry's
    weights: dict[str, float]  # training blend over units
    entry: Entry

    @property
    def tokens(self) -> int:
        return int(self.cfg.train_steps * self.cfg.global_batch * self.cfg.seq_len)

    @property
    def model_sha256(self) -> str | None:
        """The hash of the trained weights, as recorded when training finished."""
        return self.entry.completion().get("model_sha256")

    def verified_sha256(self) -> str:
        """The hash of the weights on disk, checked against the one recorded at the end of
        training (cached by size and mtime); refuses a model whose bytes changed since."""
        return verify_sha256(
            os.path.join(self.entry.model_dir, "model.safetensors"),
            self.model_sha256,
            f"the {self.kind} model {self.name!r} when it finished training",
            f"delete {self.entry.out_dir} and rerun `study run` to train it again",
        )


@dataclass
class RunPlan:
    seed_dir: str
    seed_job: TrainConfig | None  # a seed still to train, or None
    units: list[ModelJob] = field(default_factory=list)
    seqs: list[ModelJob] = field(default_factory=list)
    partitions: list[ModelJob] = field(default_factory=list)  # partition-level models
    ind_seqs: list[ModelJob] = field(default_factory=list)  # seq models at the units' scale

    @property
    def jobs(self) -> list[ModelJob]:
        """Every model after the seed, in training order."""
        return self.units + self.partitions + self.seqs + self.ind_seqs

    @property
    def pool_jobs(self) -> list[ModelJob]:
        """The models a merge may take rows from: unit and partition-level models."""
        return self.units + self.partitions

    def missing(self) -> list[ModelJob]:
        return [j for j in self.jobs if not j.entry.complete]


class Planner:
    """What a study needs and what exists: the seed, then one job per unit and seq model."""

    def __init__(self, study: Study, registry: Registry):
        self.study, self.registry = study, registry
        self.manifest = Manifest.load(study.manifest_dir)

    def seed(self) -> tuple[str, TrainConfig | None]:
        """(seed model dir, TrainConfig to train it or None)."""
        s = self.study.spec.seed
        if s.checkpoint:
            return s.checkpoint, None
        assert s.config, "StudySpec validation requires seed.checkpoint or seed.config"
        cfg = load_train_config("seed.config", s.config, s.overrides)
        return os.path.join(cfg.resolved_out_dir(), "final"), cfg

    @staticmethod
    def seed_sha256(seed_dir: str, seed_cfg: TrainConfig | None) -> str:
        """The seed's hash: checked against its run's record when the study trained it,
        else hashed (cached); unit and seq keys and lineages are built on it."""
        weights = os.path.join(seed_dir, "model.safetensors")
        run_dir = (
            seed_cfg.resolved_out_dir()
            if seed_cfg is not None
            else os.path.dirname(os.path.abspath(seed_dir))
        )
        complete = os.path.join(run_dir, "COMPLETE.json")
        if seed_cfg is None and not os.path.isfile(complete):
            return file_sha256(weights)  # a seed from elsewhere (imported): nothing recorded
        with open(complete, encoding="utf-8") as f:
            recorded = json.load(f).get("model_sha256")
        return verify_sha256(
            weights,
            recorded,
            "the seed model when it finished training",
            f"restore it, or delete {run_dir} to train it again",
        )

    def _run_key_of(self, run_dir: str, weights: dict[str, float]) -> str | None:
        """The key of a finished run trained outside the registry (its config.yaml and
        lineage), or None when it trained on other units than ``weights``."""
        cfg = TrainConfig.load(os.path.join(run_dir, "config.yaml"))
        _, lineage = read_checkpoint_meta(os.path.join(run_dir, "final"))
        trained = {u: round(w, 9) for u, w in zip(lineage.units, lineage.weights)}
        wanted = {u: round(w / sum(weights.values()), 9) for u, w in weights.items()}
        if trained != wanted:
            return None
        return run_key(cfg, self.manifest, weights, lineage.seed_hash)

    def _job(
        self,
        kind: str,
        name: str,
        ref_field: str,
        config: str,
        overrides: list[str],
        weights: dict[str, float],
        seed_dir: str,
        seed_hash: str | None,
        extra: list[str],
        own_init: bool = False,
    ) -> ModelJob:
        base = list(overrides) + [f"data.manifest={self.study.manifest_dir}"] + extra
        if not own_init:
            base.append(f"init_from={seed_dir}")
        cfg = load_train_config(ref_field, config, base)
        own_dir = cfg.out_dir.replace("{unit}", name) if cfg.out_dir else None
        if own_init:  # a seq model of another size starts from its own config's init_from
            seed_hash = (
                file_sha256(os.path.join(cfg.init_from, "model.safetensors"))
                if cfg.init_from
                and os.path.isfile(os.path.join(cfg.init_from, "model.safetensors"))
                else None
            )
        entry = self.registry.entry(kind, name, run_key(cfg, self.manifest, weights, seed_hash))
        entry = self.registry.adopt(entry, own_dir, lambda d: self._run_key_of(d, weights))
        cfg = cfg.replace([f"out_dir={entry.out_dir}"])
        return ModelJob(kind, name, cfg, weights, entry)

    def _unit_jobs(self, seed_dir: str, seed_hash: str) -> list[ModelJob]:
        spec = self.study.spec
        return [
            self._job(
                "unit",
                u,
                "unit.config",
                spec.unit.config,
                spec.unit.overrides,
                {u: 1.0},
                seed_dir,
                seed_hash,
                ["data.weights={}", "data.mixture=[]", f"data.unit={u}"],
            )
            for u in self.study.used_units
        ]

    def _partition_jobs(self, seed_dir: str, seed_hash: str) -> list[ModelJob]:
        """Partition-level models (``partition_models: true``): the unit config on all of
        a partition's units, each an equal share, for len(units) x the unit budget."""
        spec = self.study.spec
        jobs = []
        for g, units in self.study.partition_jobs.items():
            w = {u: 1.0 / len(units) for u in units}
            jobs.append(
                self._job(
                    "partition",
                    mx.partition_model_name(g, units),
                    "unit.config",
                    spec.unit.config,
                    spec.unit.overrides,
                    w,
                    seed_dir,
                    seed_hash,
                    [
                        "data.unit=null",
                        "data.mixture=[]",
                        f"data.weights={json.dumps(w)}",
                        f"train_tokens={len(units) * self.study.unit_tokens}",
                    ],
                )
            )
        return jobs

    def _seq_jobs(self, seed_dir: str, seed_hash: str, ind_scale: bool = False) -> list[ModelJob]:
        """Seq validation models; ``ind_scale``: the same mixtures at the unit models'
        scale (a cross-scale study's ``ind_seq``), from the study's seed."""
        val = self.study.spec.validation
        cross = bool(val.model) and not ind_scale
        jobs = []
        for m in self.study.validation:
            w = mx.proxy_weights(m, "macro")  # the paper's equal-partition upsampling
            over = list(val.train.overrides) + ([f"model={val.model}"] if cross else [])
            jobs.append(
                self._job(
                    mx.IND_SEQ if ind_scale else "seq",
                    m.id,
                    "validation.train.config",
                    val.train.config,
                    over,
                    w,
                    seed_dir,
                    seed_hash,
                    [
                        "data.unit=null",
                        "data.mixture=[]",
                        f"data.weights={json.dumps(w)}",
                        f"train_tokens={self.study.seq_tokens(m)}",
                    ],
                    own_init=cross,
                )
            )
        return jobs

    def plan(self) -> RunPlan:
        """What exists and what must be trained. Unit and seq keys need the seed's hash,
        so they are known only once the seed exists."""
        seed_dir, seed_cfg = self.seed()
        seed_done = os.path.isfile(os.path.join(seed_dir, "model.safetensors")) and (
            seed_cfg is None or is_complete(seed_cfg.resolved_out_dir())
        )
        if seed_cfg is None and not seed_done:
            raise ConfigError(f"seed.checkpoint: {seed_dir} has no model.safetensors")
        plan = RunPlan(seed_dir, None if seed_done else seed_cfg)
        if seed_done:
            seed_hash = self.seed_sha256(seed_dir, seed_cfg)
            plan.units = self._unit_jobs(seed_dir, seed_hash)
            plan.partitions = self._partition_jobs(seed_dir, seed_hash)
            plan.seqs = self._seq_jobs(seed_dir, seed_hash)
            if self.study.spec.validation.ind_seq:
                plan.ind_seqs = self._seq_jobs(seed_dir, seed_hash, ind_scale=True)
        return plan


def _describe_jobs(study: Study, what: str, jobs: list[ModelJob]) -> list[str]:
    todo = [j for j in jobs if not j.entry.complete]
    lines = [
        f"  {what}: {len(jobs) - len(todo)} exist, {len(todo)} to train "
        f"({sum(j.tokens for j in todo):,} tokens)"
    ]
    labels = {m.id: m.label for m in study.validation}
    for j in jobs:
        state = "exists" if j.entry.complete else "resume" if j.entry.started else "train"
        lines.append(
            f"    {state:<6} {j.name:<20} {j.tokens:>12,} tok  {j.entry.out_dir}"
            + (f"  ({labels[j.name]})" if j.name in labels else "")
        )
    return lines


def _describe_evaluation(
    study: Study, out_dir: str, plan: RunPlan | None = None, pool: PoolPlanning | None = None
) -> list[str]:
    path = store_path(out_dir)
    n_merge = sum(len(study.merge_plan(m)) for m in study.mixtures)
    lines = [
        "evaluation:",
        f"  {len(study.eval_sets)} domains; {n_merge} merged models over "
        f"{len(study.mixtures)} mixtures, {len(study.validation)} seq "
        f"models, {len(study.used_units)} unit models",
    ]
    if os.path.isfile(path):
        with ResultStore(path) as store:
            done = sum(
                1
                for m in study.mixtures
                for _, ps in study.merge_plan(m)
                if all(store.done(m.id, p, list(study.eval_sets)) for p in ps)
            )
        lines.append(f"  store {path}: {done} of {n_merge} merges done")
    else:
        lines.append(f"  store {path}: not created yet")
    # The pool's placement and memory, from a safetensors header (every unit model has
    # the seed's layout, so the seed stands in until a unit model exists).
    if plan is not None:
        from megablocks_ablate.merge.pool_placement import PoolPlanning, describe_pool

        n_rows = len(plan.pool_jobs) or len(study.used_units) + len(study.partition_jobs)
        layout = next(
            (j.entry.model_dir for j in plan.pool_jobs if j.entry.complete), plan.seed_dir
        )
        if os.path.isfile(os.path.join(layout, "model.safetensors")):
            lines += describe_pool(layout, n_rows, pool or PoolPlanning())
        else:
            lines.append("  pool placement: decided once the seed model exists")
    return lines


def describe_run(
    study: Study, plan: RunPlan, out_dir: str, pool: PoolPlanning | None = None
) -> str:
    """The ``--dry-run`` text: the study plan, then training and evaluation status."""
    lines = [describe_plan(study), "training:"]
    if plan.seed_job is not None:
        lines.append(
            f"  seed: to train -> {plan.seed_dir} "
            f"({int(plan.seed_job.train_tokens):,} tokens); unit and seq models "
            "are planned once it exists"
        )
        lines.append(
            f"  then {len(study.used_units)} unit models, {len(study.partition_jobs)} "
            f"partition-level models and {len(study.validation)} seq models"
        )
    else:
        lines.append(f"  seed: {plan.seed_dir} (exists)")
    for what, jobs in (
        ("unit models", plan.units),
        ("partition-level models", plan.partitions),
        ("seq models", plan.seqs),
        ("seq models at the unit scale (ind_seq)", plan.ind_seqs),
    ):
        if jobs:
            lines += _describe_jobs(study, what, jobs)
    return "\n".join(lines + _describe_evaluation(study, out_dir, plan, pool))
