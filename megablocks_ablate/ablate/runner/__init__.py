"""`study run`: train what a study is missing, then score every mixture in memory.

The runner is three parts, each idempotent, so a killed run is simply rerun::

    plan.py      spec + data + train configs ─▶ Study; the seed, unit and seq models
                 it needs, each found in the content-keyed registry (registry.py)
    training.py  seed ─▶ missing unit models ─▶ missing seq models (trainer, resumable)
    scoring.py   unit/seq models evaluated; every mixture merged in memory and
                 evaluated by Scorer.score_mixture, the one routine every proposer
                 (study run, study search in propose.py) goes through

**Resume.** Training resumes exactly (trainer checkpoints, registry directories named
by content); results are keyed (mixture, proxy, domain) and inserted with ``INSERT OR
IGNORE`` one merge per transaction, and work whose rows exist is skipped.

**Ranks** (torchrun / mpiexec / srun, one process group from
:func:`~megablocks_ablate.train.distributed.init_distributed`): *training* is data
parallel, every rank takes part in every model; *evaluation* is sharded: unit i, seq
model i and mixture i go to rank ``i % world``, each rank scoring alone (a one-rank
process group) and writing its own rows into the one SQLite store (WAL, busy timeout).
One CPU process with ``cpu_workers`` > 1 does both in worker processes instead: one
model per worker, and worker i scoring what rank i would (workers.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.runner.fisher import FISHER, fisher_and_score
from megablocks_ablate.ablate.runner.plan import (
    ModelJob,
    Planner,
    RunPlan,
    describe_run,
    load_study,
    resolve,
)
from megablocks_ablate.ablate.runner.propose import search_mixtures
from megablocks_ablate.ablate.runner.registry import Registry
from megablocks_ablate.ablate.runner.scaled import SCALED, fit_and_score
from megablocks_ablate.ablate.runner.scoring import (
    ScoreOptions,
    Scorer,
    check_store_window,
    load_suite,
    merge_eval,
    study_window,
)
from megablocks_ablate.ablate.runner.training import spent_tokens, train_models
from megablocks_ablate.ablate.runner.workers import WorkerPool, score_in_workers, use_workers
from megablocks_ablate.ablate.search import SearchResult
from megablocks_ablate.ablate.spec import Study
from megablocks_ablate.ablate.store import ResultStore, store_path
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.evaluate.windows import validate_window_args
from megablocks_ablate.merge.pool_placement import PoolPlanning, PoolRequest
from megablocks_ablate.train.distributed import DistEnv, barrier, init_distributed
from megablocks_ablate.utils.locks import acquire
from megablocks_ablate.utils.outputs import claim_output_dir

logger = logging.getLogger(__name__)

LOCK_FILE = ".study-run.lock"


@dataclass
class RunOptions:
    registry: str | None = None  # registry root (default: the study's out_dir)
    save_merged: bool = False  # also write each merged model under out_dir/merged/
    device: str = "auto"
    batch_tokens: int = 16384  # evaluation: padded tokens per forward
    stride: int | None = None  # evaluation windows (default: non-overlapping)
    max_len: int | None = None  # window length (default: the models' trained length)
    beyond_trained_context: bool = False  # allow a max_len beyond the trained length
    cache_dir: str | None = None  # tokenized eval sets (default: out_dir/cache/eval)
    lock_timeout_s: float | None = 0.0  # another run of this study: 0 refuse, None wait
    pool_placement: str = "auto"  # unit-model pool rows: auto | resident | host | sharded
    # pool rows: auto (bf16 on CUDA, else fp32) | bf16 (= bf16-delta when the units'
    # seed is found) | bf16-delta | bf16-plain | fp32 (merge/pool_delta.py)
    pool_dtype: str = "auto"
    pool_dir: str | None = None  # node-wide directory of host rows (default /dev/shm)
    # One CPU process: train unit/seq models and score models and mixtures in this many
    # worker processes (runner/workers.py); ignored under torchrun and on CUDA.
    cpu_workers: int = 1

    def __post_init__(self) -> None:
        self.pool_request()  # a bad pool option is refused before any training
        if not isinstance(self.cpu_workers, int) or self.cpu_workers < 1:
            raise ConfigError(f"cpu_workers: expected an integer >= 1, got {self.cpu_workers!r}")

    def pool_request(self) -> PoolRequest:
        return PoolRequest(self.pool_placement, self.pool_dtype, self.pool_dir)


class StudyRunner:
    """Runs one resolved :class:`~megablocks_ablate.ablate.spec.Study` (see the package
    docstring): a thin coordinator of the plan, training and scoring parts."""

    def __init__(self, study: Study, options: RunOptions | None = None):
        self.study, self.opt = study, options or RunOptions()
        # the evaluation window, checked against the trained lengths before any work
        self.window = study_window(study, self.opt.max_len, self.opt.beyond_trained_context)
        validate_window_args(self.window, self.opt.stride)
        self.out_dir = study.spec.out_dir
        self.planner = Planner(study, Registry(self.opt.registry or self.out_dir))
        self._owns_group = not (dist.is_available() and dist.is_initialized())
        self.env: DistEnv = init_distributed(self.opt.device)
        # one CPU process with cpu_workers > 1: worker processes for training and scoring
        use = use_workers(self.opt.cpu_workers, self.env.world_size, self.env.device)
        self.workers = WorkerPool(self.opt.cpu_workers) if use else None
        if self.env.is_main:
            self._claim_dirs()

    def _claim_dirs(self) -> None:
        """The study's out_dir (and a separate registry) are ours to resume; a directory
        holding anything else is refused before any work."""
        seed = self.study.spec.seed.checkpoint
        inputs = [self.study.manifest_dir, seed]
        claim_output_dir(self.out_dir, "study", reuse=True, inputs=inputs, flag="out_dir")
        if self.opt.registry:
            claim_output_dir(
                self.opt.registry, "study", reuse=True, inputs=inputs, flag="--registry"
            )

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One `study run` of this study at a time (rank 0 holds the lock)."""
        if not self.env.is_main:
            yield
            return
        path = os.path.join(self.out_dir, LOCK_FILE)
        with acquire(path, f"study run of {self.study.spec.name!r}", self.opt.lock_timeout_s):
            yield

    def close(self, clean: bool = True) -> None:
        """Tear down the process group if this runner created it (after a barrier when
        every rank finished cleanly: gloo aborts a process that leaves mid-collective),
        and end the worker processes if any were started."""
        if self.workers is not None:
            self.workers.close()
        if self._owns_group and dist.is_available() and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()
        self._owns_group = False

    def plan(self) -> RunPlan:
        return self.planner.plan()

    def describe(self, plan: RunPlan) -> str:
        text = describe_run(self.study, plan, self.out_dir, self._pool_planning())
        how = "the trained length" if self.opt.max_len is None else "--max-len"
        return f"{text}\n  window: {self.window} tokens ({how})"

    def check_store(self) -> None:
        """The study's store holds no rows scored in another window (before any work)."""
        if self.env.is_main:
            check_store_window(store_path(self.out_dir), self.window)

    def _pool_planning(self) -> PoolPlanning:
        """What placing the merge-eval pool depends on: the request, device, ranks, batch."""
        opt = self.opt
        return PoolPlanning(
            opt.pool_request(), self.env.device, self.env.world_size, opt.batch_tokens
        )

    def train(self) -> RunPlan:
        return train_models(self.planner, self.env, self.workers)

    def scorer(
        self, group: object | None = None, pool_group: object | None = None, writes: bool = True
    ) -> Scorer:
        """A scorer on this rank's device with the runner's evaluation options;
        ``pool_group``: the ranks of a sharded pool (see :meth:`_pool_groups`)."""
        return Scorer(
            self.study, self.planner.manifest, self.score_options(pool_group, writes), group
        )

    def score_options(self, pool_group: object | None = None, writes: bool = True) -> ScoreOptions:
        opt = self.opt
        return ScoreOptions(
            device=self.env.device,
            batch_tokens=opt.batch_tokens,
            stride=opt.stride,
            max_len=self.window,
            beyond_trained_context=opt.beyond_trained_context,
            cache_dir=opt.cache_dir,
            save_merged=opt.save_merged,
            pool_placement=opt.pool_placement,
            pool_dtype=opt.pool_dtype,
            pool_dir=opt.pool_dir,
            pool_group=pool_group,
            write_results=writes,
        )

    def _mine(self, items: list) -> list:
        return items[self.env.rank :: self.env.world_size]

    def evaluate(self, plan: RunPlan) -> None:
        """Score this rank's share of the unit models, seq models and mixtures."""
        path = store_path(self.out_dir)
        if self.env.is_main:
            with ResultStore(path) as store:
                store.set_meta("study", self.study.to_meta(store_file=path))
                store.add_mixtures(self.study.mixtures)
        barrier()
        if self.workers is not None:
            options = self.score_options()
            # the tokenizer check and the evaluation cache, once, before the workers start
            load_suite(self.study, self.planner.manifest, options, self.window)
            n = score_in_workers(
                self.study, self.planner.manifest, options, plan, path, self.workers
            )
            logger.info("[eval] %d merged models evaluated", n)
        else:
            self._evaluate_ranks(plan, path)
        barrier()
        if SCALED in self.study.spec.proxies and self.env.is_main:
            # after every rank's seq scores are in: fit lambda on the fit half, score all
            scaled = self.study.spec.scaled
            with ResultStore(path) as store:
                fit_and_score(
                    self.scorer(),
                    store,
                    plan,
                    self.study.mixtures,
                    scaled.lambdas,
                    scaled.split_seed,
                )
        if FISHER in self.study.spec.proxies and self.env.is_main:
            with ResultStore(path) as store:
                fisher_and_score(self.scorer(), store, plan, self.study.mixtures)
        barrier()
        if self.env.is_main:
            with ResultStore(path) as store:
                store.set_meta("spent", spent_tokens(plan))

    def _evaluate_ranks(self, plan: RunPlan, path: str) -> None:
        """This rank's share of the models and mixtures (all of them on one rank)."""
        local = _local_group(self.env)
        pool_group, replica, replicas, leader = self._pool_groups(plan)
        scorer = self.scorer(local, pool_group, writes=leader)
        with ResultStore(path) as store:
            if any(p in mx.IND_PROXIES for p in self.study.spec.proxies):
                for job in self._mine(plan.units + plan.partitions):
                    scorer.score_model(store, job)
            for job in self._mine(plan.seqs + plan.ind_seqs):
                scorer.score_model(store, job)
            mixtures = self.study.mixtures[replica::replicas]
            n = merge_eval(scorer, store, plan, mixtures, self.env.rank)
            logger.info("[eval] %d merged models evaluated on rank %d", n, self.env.rank)

    def _pool_groups(self, plan: RunPlan) -> tuple[object | None, int, int, bool]:
        """``(pool_group, replica, replicas, writes)`` for merge-eval.

        Each rank scores its own share of the mixtures with its own pool, unless the
        pool's placement is sharded: then the world splits into ``replicas`` groups of G
        consecutive ranks; a group's ranks hold one pool between them, merge and evaluate
        the same mixtures in lockstep, and its first rank writes the rows. Rank 0 decides
        G (free memory may differ by a few bytes between ranks) and tells the others.
        ``writes``: whether this rank writes its replica's rows.
        """
        env = self.env
        alone = (None, env.rank, env.world_size, True)
        if env.world_size <= 1 or self.opt.pool_placement not in ("auto", "sharded"):
            return alone
        shards = [1]
        if env.is_main:
            shards = [self._pool_shards(plan)]
        dist.broadcast_object_list(shards, src=0)
        g = int(shards[0])
        if g <= 1:
            return alone
        group, _ = dist.new_subgroups(group_size=g)
        logger.info("[eval] sharded pool: %d groups of %d ranks", env.world_size // g, g)
        return group, env.rank // g, env.world_size // g, env.rank % g == 0

    def _pool_shards(self, plan: RunPlan) -> int:
        """G, the ranks of one sharded pool (1: the pool is not sharded)."""
        from megablocks_ablate.merge.pool_placement import plan_placement

        layout = next((j.entry.model_dir for j in plan.pool_jobs if j.entry.complete), None)
        if layout is None:
            return 1
        try:
            choice = plan_placement(layout, len(plan.pool_jobs), self._pool_planning())
        except ConfigError:
            return 1  # nothing fits: every rank's open_pool refuses it with the figures
        return choice.shards if choice.placement == "sharded" else 1

    def search(
        self, k: int, proxy: str = "macro", domains: list[str] | None = None, beam_width: int = 4
    ) -> tuple[SearchResult, int]:
        """Beam search for the best ``k``-mixture (see :mod:`.propose`); one process."""
        self.check_store()
        return search_mixtures(
            self.scorer(None),
            store_path(self.out_dir),
            self.plan(),
            k,
            proxy=proxy,
            domains=domains,
            beam_width=beam_width,
        )

    def optimize(self, objective, **kwargs):
        """``study optimize``: the best blend by weighted merges (see
        :func:`.propose.optimize_blend`); one process."""
        from megablocks_ablate.ablate.runner.propose import optimize_blend

        self.check_store()
        return optimize_blend(
            self.scorer(None), store_path(self.out_dir), self.plan(), objective, **kwargs
        )

    def run(self) -> RunPlan:
        with self.lock():
            self.check_store()  # scores in another window: refused before any training
            if self.env.is_main:  # the unit data every model reads, against the manifest
                self.planner.manifest.verify(units=self.study.used_units)
            plan = self.train()
            self.evaluate(plan)
        return plan


def _local_group(env: DistEnv) -> object | None:
    """A process group of this rank alone (evaluation is sharded by mixture, not batch)."""
    if env.world_size <= 1:
        return None
    group, _ = dist.new_subgroups(group_size=1)
    return group


def run_study(study: Study, options: RunOptions | None = None) -> StudyRunner:
    """Train what ``study`` is missing and score every mixture."""
    runner = StudyRunner(study, options)
    ok = False
    try:
        runner.run()
        ok = True
    finally:
        runner.close(clean=ok)
    return runner


def dry_run(study: Study, options: RunOptions | None = None) -> str:
    """What exists and what ``study run`` would train and evaluate (nothing is done)."""
    runner = StudyRunner(study, options)
    try:
        return runner.describe(runner.plan())
    finally:
        runner.close()


__all__ = [
    "ModelJob",
    "RunOptions",
    "RunPlan",
    "StudyRunner",
    "dry_run",
    "load_study",
    "resolve",
    "run_study",
    "spent_tokens",
]
