"""CPU worker processes: independent models trained, and scores computed, side by side.

A small model does not keep a CPU's cores busy: the paper-like preset trains at about
33 steps/s in one process with 2 threads, and at about 25 steps/s in *each* of two
processes with one thread (measured on the 2-core CI machine). Once the seed exists,
the unit and seq models of a study are independent, and so are the scores of models
and merged mixtures. With ``cpu_workers = N`` (``study run --cpu-workers``, the demo's
``--workers``) a single-process CPU run hands them to N spawned processes, each with
``threads // N`` intra-op threads (at least one):

* training: one model per worker at a time, by the same :func:`.training.train_one`
  (the run's lock, resume, the same config); the parent records each model in the
  registry as it completes, so a killed run resumes as a serial one does;
* scoring: worker i scores the i-th share of the unit/seq models and of the mixtures
  (as rank i of N ranks would), writing rows into the one results store (SQLite
  serialises the writers; every merge is one transaction).

A model trained with one thread equals the serial run's up to float rounding that
depends on the thread count (as between two machines); nothing else differs. Under
``torchrun`` or on CUDA the ranks already share the work and ``cpu_workers`` is ignored.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from typing import TYPE_CHECKING

import torch

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.runner.plan import ModelJob, RunPlan
from megablocks_ablate.ablate.spec import Study
from megablocks_ablate.ablate.store import ResultStore
from megablocks_ablate.data.manifest import Manifest
from megablocks_ablate.train.config import TrainConfig
from megablocks_ablate.train.distributed import DistEnv

if TYPE_CHECKING:
    from megablocks_ablate.ablate.runner.scoring import ScoreOptions

TrainOne = Callable[[TrainConfig, DistEnv, str], None]
logger = logging.getLogger(__name__)


def threads_per_worker(workers: int) -> int:
    """Intra-op threads each of ``workers`` processes gets: this process's share."""
    return max(1, torch.get_num_threads() // max(1, workers))


def use_workers(workers: int, world_size: int, device: torch.device) -> bool:
    """Whether work goes to worker processes: more than one asked for, one rank, CPU."""
    return workers > 1 and world_size == 1 and device.type == "cpu"


PARENT_POLL_S = 1.0  # how often a worker checks that the run that started it is alive


def _exit_with_parent(parent: int) -> None:
    """A worker outlives a killed parent otherwise (SIGKILL, or SIGTERM to the parent
    alone), training on for nobody; once reparented it exits at once, as if killed (the
    model it was training resumes from its last checkpoint on the next run)."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(threads: int, log_level: int, parent: int) -> None:
    """Runs first in every worker: its thread count, quiet progress, the parent's log level
    (a worker's INFO lines would interleave; the parent reports each model instead), and
    a watch on the parent."""
    import threading

    from megablocks_ablate.utils.log import setup_logging

    os.environ["MBA_NO_PROGRESS"] = "1"
    torch.set_num_threads(threads)
    setup_logging(logging.getLevelName(max(log_level, logging.WARNING)))
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


class WorkerPool:
    """``workers`` spawned processes, started on first use and kept for both training
    and scoring (a worker's start, importing torch, is paid once); :meth:`close` ends them."""

    def __init__(self, workers: int):
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def executor(self) -> ProcessPoolExecutor:
        if self._executor is None:
            level = logging.getLogger("megablocks_ablate").getEffectiveLevel()
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=mp.get_context("spawn"),  # never fork a process holding threads
                initializer=_init_worker,
                initargs=(threads_per_worker(self.workers), level, os.getpid()),
            )
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def _collect(futures: dict[Future, object], on_done: Callable[[object, object], None]) -> None:
    """Wait for every future, calling ``on_done(item, result)`` as each completes; the
    first failure cancels what has not started and is raised once the running ones end."""
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_EXCEPTION)
        failed = next((f for f in done if f.exception() is not None), None)
        for f in done:
            if f.exception() is None:
                on_done(futures[f], f.result())
        if failed is not None:
            for f in pending:
                f.cancel()
            wait(pending)  # models in flight finish (a rerun finds them complete)
            exc = failed.exception()
            assert exc is not None
            raise exc


# ------------------------------------------------------------------------- training
def _timed(train: TrainOne, cfg: TrainConfig, what: str) -> float:
    t0 = time.time()
    train(cfg, DistEnv(), what)  # one process, this worker's threads
    return time.time() - t0


def train_in_workers(
    jobs: Sequence[ModelJob],
    pool: WorkerPool,
    train: TrainOne,
    on_trained: Callable[[ModelJob], None],
) -> None:
    """Train ``jobs`` (independent models) in ``pool``'s processes with ``train``
    (:func:`.training.train_one`, a module-level function, so it pickles by name);
    ``on_trained(job)`` runs in this process as each completes."""
    logger.info(
        "[train] %d models in %d worker processes, %d thread(s) each",
        len(jobs),
        pool.workers,
        threads_per_worker(pool.workers),
    )
    finished = 0

    def done(item: object, seconds: object) -> None:
        nonlocal finished
        assert isinstance(item, tuple)
        job, what = item
        finished += 1
        on_trained(job)
        logger.info("[train] %d/%d done: %s (%.0f s)", finished, len(jobs), what, seconds)

    ex = pool.executor()
    futures: dict[Future, object] = {}
    for i, job in enumerate(jobs):
        what = f"{job.kind} model {i + 1}/{len(jobs)} ({job.name})"
        futures[ex.submit(_timed, train, job.cfg, what)] = (job, what)
    _collect(futures, done)


# -------------------------------------------------------------------------- scoring
def _score_share(
    study: Study,
    manifest: Manifest,
    options: ScoreOptions,
    plan: RunPlan,
    store: str,
    share: int,
    shares: int,
) -> int:
    """Worker ``share`` of ``shares``: its share of the models and mixtures, as rank
    ``share`` of a ``shares``-rank run would score them; returns merges evaluated."""
    from megablocks_ablate.ablate.runner.scoring import Scorer, merge_eval

    scorer = Scorer(study, manifest, options)
    with ResultStore(store) as st:
        if any(p in mx.IND_PROXIES for p in study.spec.proxies):
            for job in (plan.units + plan.partitions)[share::shares]:
                scorer.score_model(st, job)
        for job in (plan.seqs + plan.ind_seqs)[share::shares]:
            scorer.score_model(st, job)
        return merge_eval(scorer, st, plan, study.mixtures[share::shares], share)


def score_in_workers(
    study: Study,
    manifest: Manifest,
    options: ScoreOptions,
    plan: RunPlan,
    store: str,
    pool: WorkerPool,
) -> int:
    """Score every model and mixture of ``plan`` in ``pool``'s processes, one share each
    (the store's meta and the evaluation cache are the caller's to prepare); returns
    merges evaluated."""
    workers = pool.workers
    logger.info(
        "[eval] scoring in %d worker processes, %d thread(s) each",
        workers,
        threads_per_worker(workers),
    )
    merged = 0

    def done(item: object, n: object) -> None:
        nonlocal merged
        assert isinstance(n, int)
        merged += n

    ex = pool.executor()
    futures: dict[Future, object] = {
        ex.submit(_score_share, study, manifest, options, plan, store, i, workers): i
        for i in range(workers)
    }
    _collect(futures, done)
    return merged
