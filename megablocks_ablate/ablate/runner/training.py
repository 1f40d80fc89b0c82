"""Train: the seed, then every missing unit and seq model of a plan, one after another
(or, on one CPU process with ``cpu_workers`` > 1, side by side: :mod:`.workers`).

Every rank takes part in every model (data parallel), so the models are the same as
one process would train and big models use every GPU. A large pool is trained in
parallel across a cluster with a Slurm array instead (``tools/launch/``); the planner
adopts those runs. A killed run is simply rerun: the trainer resumes exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

from megablocks_ablate.ablate.runner.plan import ModelJob, Planner, RunPlan
from megablocks_ablate.ablate.runner.workers import WorkerPool, train_in_workers
from megablocks_ablate.errors import MBAError
from megablocks_ablate.train.config import TrainConfig
from megablocks_ablate.train.distributed import DistEnv, barrier
from megablocks_ablate.train.state import is_complete
from megablocks_ablate.train.trainer import Trainer
from megablocks_ablate.utils.locks import acquire

logger = logging.getLogger(__name__)


def train_one(cfg: TrainConfig, env: DistEnv, what: str) -> None:
    """Train (or resume, or skip if complete) one run on every rank of ``env``.

    Rank 0 holds the run's lock (``<run dir>.lock``) meanwhile, so two studies sharing a
    registry train each model once: the second waits, then finds it complete. A run
    that fails (divergence, bad data) stops the study with a message naming the model.
    """
    out = cfg.resolved_out_dir()
    logger.info("[train] %s: %s", what, out)
    held = (
        acquire(out.rstrip(os.sep) + ".lock", f"training of {what}")
        if env.is_main
        else contextlib.nullcontext()
    )
    with held:
        barrier()  # every rank starts once rank 0 holds the lock
        try:
            Trainer(cfg, env).run()
        except MBAError as e:
            raise MBAError(
                f"{what} ({out}) did not train: {e}. The study stopped here; models already "
                "trained are kept. Fix what it names (a diverged run's message says which "
                "settings to change) and rerun `study run`"
            ) from None


def train_models(planner: Planner, env: DistEnv, workers: WorkerPool | None = None) -> RunPlan:
    """Train what the plan is missing; returns the plan of the finished study.

    ``workers`` (one CPU process with ``cpu_workers`` > 1): the unit and seq models,
    independent once the seed exists, train in its worker processes (:mod:`.workers`)."""

    plan = planner.plan()
    if plan.seed_job is not None:
        train_one(plan.seed_job, env, "seed")
        plan = planner.plan()  # unit and seq keys need the seed's hash
    todo = plan.missing()
    total = len(plan.jobs)
    logger.info(
        "[train] %d of %d unit/seq models exist; training %d", total - len(todo), total, len(todo)
    )

    def record(job: ModelJob) -> None:
        planner.registry.record(
            job.entry,
            {"kind": job.kind, "name": job.name, "weights": job.weights, "seed": plan.seed_dir},
        )

    if workers is not None and len(todo) > 1:
        train_in_workers(todo, workers, train_one, record)
        return plan
    for i, job in enumerate(todo):
        train_one(job.cfg, env, f"{job.kind} model {i + 1}/{len(todo)} ({job.name})")
        if env.is_main:
            record(job)
    return plan


def spent_tokens(plan: RunPlan) -> dict[str, int]:
    """Tokens the study's models were actually trained on (from their COMPLETE.json)."""

    def tokens(out_dir: str) -> int:
        with open(os.path.join(out_dir, "COMPLETE.json"), encoding="utf-8") as f:
            return int(json.load(f).get("tokens_seen", 0))

    spent = {}
    seed_run = os.path.dirname(os.path.abspath(plan.seed_dir))
    if is_complete(seed_run):
        spent["seed tokens"] = tokens(seed_run)
    spent["unit-model tokens"] = sum(tokens(j.entry.out_dir) for j in plan.units)
    if plan.partitions:
        spent["partition-model tokens"] = sum(tokens(j.entry.out_dir) for j in plan.partitions)
    spent["seq-model tokens"] = sum(tokens(j.entry.out_dir) for j in plan.seqs)
    if plan.ind_seqs:
        spent["ind_seq-model tokens"] = sum(tokens(j.entry.out_dir) for j in plan.ind_seqs)
    return spent
