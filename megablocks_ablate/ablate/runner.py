"""`study run`: train what a study is missing, then score every mixture in memory.

Steps, each idempotent, so a killed run is simply rerun:

1. **seed**: train it from ``seed.config`` unless complete (or use ``seed.checkpoint``);
2. **pool**: one unit model per unit some mixture needs, found in the content-keyed
   :class:`~.registry.Registry` or trained (an interrupted one resumes from its last
   checkpoint); then the **seq** models of the validation mixtures, the same way;
3. **unit evaluations** (``unit_results``, the inputs of ``mean_ind`` / ``ind_id``) and
   **seq evaluations** (``results`` with proxy ``seq``);
4. **merge-eval**: every unit model as one row of a :class:`~megablocks_ablate.merge.pool.ModelPool`,
   one live model, one :class:`~megablocks_ablate.evaluate.EvalSuite` resident in memory;
   per mixture, each distinct weight vector (:func:`~.mixtures.merge_plan`) is merged
   into the live model by one kernel call and evaluated; its rows (every proxy sharing
   the vector x every domain) are committed in one transaction. Nothing is written to
   disk but the store, unless ``save_merged``.

**Resume.** Training resumes exactly (trainer checkpoints, registry directories
named by content); results are keyed (mixture, proxy, domain) and inserted with
``INSERT OR IGNORE`` one merge per transaction, and work whose rows exist is skipped:
a kill at any moment loses at most the merge in flight and duplicates nothing.

**Ranks** (torchrun / mpiexec / srun, one process group from
:func:`~megablocks_ablate.train.distributed.init_distributed`): *training* is data
parallel, every rank takes part in every model (DDP), one model after another, so it
gives the same models as one process and uses every GPU on big models; to train a
large pool in parallel on a cluster, use a Slurm array (``tools/launch/``): the runner
adopts those runs. *Evaluation* is sharded: unit i, seq model i and mixture i go to
rank ``i % world``, each rank scoring alone (a one-rank process group) and writing
its own rows into the one SQLite store (WAL, busy timeout).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.mixtures import Score
from megablocks_ablate.ablate.registry import Entry, Registry, run_key
from megablocks_ablate.ablate.spec import Study, describe_plan
from megablocks_ablate.ablate.store import Result, ResultStore, make_provenance, store_path
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.hashing import sha256_json
from megablocks_ablate.utils.progress import progress

# Testing hook: seconds to sleep after each committed merge, so a test can kill a run
# in the middle of merge-eval (the trainer has MBA_TRAIN_STEP_DELAY for training).
MERGE_DELAY_ENV = "MBA_MERGE_EVAL_DELAY"


@dataclass
class RunOptions:
    registry: str | None = None        # registry root (default: the study's out_dir)
    save_merged: bool = False          # also write each merged model under out_dir/merged/
    device: str = "auto"
    batch_tokens: int = 16384          # evaluation: padded tokens per forward
    stride: int | None = None          # evaluation windows (default: non-overlapping)
    max_len: int | None = None
    cache_dir: str | None = None       # tokenized eval sets (default: out_dir/cache/eval)
    log: Callable[[str], None] = print


@dataclass
class ModelJob:
    """One model the study needs: a unit model or a seq model."""

    kind: str                  # "unit" | "seq"
    name: str                  # unit name, or mixture id
    cfg: object                # TrainConfig, out_dir set to the entry's
    weights: dict[str, float]  # training blend over units
    entry: Entry

    @property
    def tokens(self) -> int:
        return int(self.cfg.train_steps * self.cfg.global_batch * self.cfg.seq_len)


@dataclass
class RunPlan:
    seed_dir: str
    seed_job: object | None            # TrainConfig of a seed still to train, or None
    units: list[ModelJob] = field(default_factory=list)
    seqs: list[ModelJob] = field(default_factory=list)

    def missing(self) -> list[ModelJob]:
        return [j for j in self.units + self.seqs if not j.entry.complete]


class StudyRunner:
    """Runs one resolved :class:`~.spec.Study`; see the module docstring."""

    def __init__(self, study: Study, options: RunOptions | None = None):
        from megablocks_ablate.data.manifest import Manifest
        from megablocks_ablate.train.distributed import init_distributed

        self.study, self.opt = study, options or RunOptions()
        self.out_dir = study.spec.out_dir
        self.registry = Registry(self.opt.registry or self.out_dir)
        self.manifest = Manifest.load(study.manifest_dir)
        import torch.distributed as dist

        self._owns_group = not (dist.is_available() and dist.is_initialized())
        self.env = init_distributed(self.opt.device)
        self.log = self.opt.log if self.env.is_main else (lambda *a, **k: None)

    def close(self, clean: bool = True) -> None:
        """Tear down the process group if this runner created it (after a barrier when
        every rank finished cleanly: gloo aborts a process that leaves mid-collective)."""
        import torch.distributed as dist

        if self._owns_group and dist.is_available() and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()
        self._owns_group = False

    # ------------------------------------------------------------------ configs and plan
    def _seed(self):
        """(seed model dir, TrainConfig to train it or None)."""
        from megablocks_ablate.ablate.spec import _load_train_config

        s = self.study.spec.seed
        if s.checkpoint:
            return s.checkpoint, None
        cfg = _load_train_config("seed.config", s.config, s.overrides)
        return os.path.join(cfg.resolved_out_dir(), "final"), cfg

    def _run_key_of(self, run_dir: str, weights: dict[str, float]) -> str | None:
        """The key of a finished run trained outside the registry (its config.yaml and
        lineage), or None when it trained on other units than ``weights``."""
        from megablocks_ablate.train.checkpoint import read_checkpoint_meta
        from megablocks_ablate.train.config import TrainConfig

        cfg = TrainConfig.load(os.path.join(run_dir, "config.yaml"))
        _, lineage = read_checkpoint_meta(os.path.join(run_dir, "final"))
        trained = {u: round(w, 9) for u, w in zip(lineage.units, lineage.weights)}
        wanted = {u: round(w / sum(weights.values()), 9) for u, w in weights.items()}
        if trained != wanted:
            return None
        return run_key(cfg, self.manifest, weights, lineage.seed_hash)

    def _job(self, kind: str, name: str, ref_field: str, config: str, overrides: list[str],
             weights: dict[str, float], seed_dir: str, seed_hash: str | None,
             extra: list[str], own_init: bool = False) -> ModelJob:
        from megablocks_ablate.ablate.spec import _load_train_config
        from megablocks_ablate.train.checkpoint import model_hash

        base = list(overrides) + [f"data.manifest={self.study.manifest_dir}"] + extra
        if not own_init:
            base.append(f"init_from={seed_dir}")
        cfg = _load_train_config(ref_field, config, base)
        own_dir = cfg.out_dir.replace("{unit}", name) if cfg.out_dir else None
        if own_init:  # a seq model of another size starts from its own config's init_from
            seed_hash = (model_hash(cfg.init_from) if cfg.init_from and os.path.isfile(
                os.path.join(cfg.init_from, "model.safetensors")) else None)
        entry = self.registry.entry(kind, name, run_key(cfg, self.manifest, weights, seed_hash))
        entry = self.registry.adopt(entry, own_dir, lambda d: self._run_key_of(d, weights))
        cfg = cfg.replace([f"out_dir={entry.out_dir}"])
        return ModelJob(kind, name, cfg, weights, entry)

    def plan(self) -> RunPlan:
        """What exists and what must be trained. Unit and seq keys need the seed's hash,
        so they are known only once the seed exists."""
        from megablocks_ablate.train.checkpoint import model_hash

        seed_dir, seed_cfg = self._seed()
        seed_done = os.path.isfile(os.path.join(seed_dir, "model.safetensors")) and (
            seed_cfg is None or _complete(seed_cfg.resolved_out_dir()))
        if seed_cfg is None and not seed_done:
            raise ConfigError(f"seed.checkpoint: {seed_dir} has no model.safetensors")
        plan = RunPlan(seed_dir, None if seed_done else seed_cfg)
        if not seed_done:
            return plan
        seed_hash = model_hash(seed_dir)
        spec = self.study.spec
        for u in self.study.used_units:
            plan.units.append(self._job(
                "unit", u, "unit.config", spec.unit.config, spec.unit.overrides, {u: 1.0},
                seed_dir, seed_hash, ["data.weights={}", "data.mixture=[]", f"data.unit={u}"]))
        val = spec.validation
        for m in self.study.validation:
            w = mx.proxy_weights(m, "macro")  # the paper's equal-partition upsampling
            over = list(val.train.overrides) + ([f"model={val.model}"] if val.model else [])
            plan.seqs.append(self._job(
                "seq", m.id, "validation.train.config", val.train.config, over, w, seed_dir,
                seed_hash, ["data.unit=null", "data.mixture=[]", f"data.weights={json.dumps(w)}",
                            f"train_tokens={self.study.seq_tokens(m)}"],
                own_init=bool(val.model)))
        return plan

    def describe(self, plan: RunPlan) -> str:
        """The ``--dry-run`` text: the study plan, then training and evaluation status."""
        lines = [describe_plan(self.study), "training:"]
        if plan.seed_job is not None:
            lines.append(f"  seed: to train -> {plan.seed_dir} "
                         f"({int(plan.seed_job.train_tokens):,} tokens); unit and seq models "
                         "are planned once it exists")
            lines.append(f"  then {len(self.study.used_units)} unit models and "
                         f"{len(self.study.validation)} seq models")
        else:
            lines.append(f"  seed: {plan.seed_dir} (exists)")
        for what, jobs in (("unit models", plan.units), ("seq models", plan.seqs)):
            if not jobs:
                continue
            todo = [j for j in jobs if not j.entry.complete]
            lines.append(f"  {what}: {len(jobs) - len(todo)} exist, {len(todo)} to train "
                         f"({sum(j.tokens for j in todo):,} tokens)")
            labels = {m.id: m.label for m in self.study.validation}
            for j in jobs:
                state = ("exists" if j.entry.complete else
                         "resume" if j.entry.started else "train")
                lines.append(f"    {state:<6} {j.name:<20} {j.tokens:>12,} tok  {j.entry.out_dir}"
                             + (f"  ({labels[j.name]})" if j.name in labels else ""))
        path = store_path(self.out_dir)
        n_merge = sum(len(mx.merge_plan(m, self.study.spec.proxies)) for m in self.study.mixtures)
        lines.append("evaluation:")
        lines.append(f"  {len(self.study.eval_sets)} domains; {n_merge} merged models over "
                     f"{len(self.study.mixtures)} mixtures, {len(self.study.validation)} seq "
                     f"models, {len(self.study.used_units)} unit models")
        if os.path.isfile(path):
            with ResultStore(path) as store:
                done = sum(1 for m in self.study.mixtures
                           for _, ps in mx.merge_plan(m, self.study.spec.proxies)
                           if all(store.done(m.id, p, self.study.eval_sets) for p in ps))
            lines.append(f"  store {path}: {done} of {n_merge} merges done")
        else:
            lines.append(f"  store {path}: not created yet")
        return "\n".join(lines)

    # ------------------------------------------------------------------ training
    def _train(self, cfg, what: str) -> None:
        from megablocks_ablate.train.trainer import Trainer

        self.log(f"[train] {what}: {cfg.resolved_out_dir()}")
        Trainer(cfg, self.env, log=self.log).run()

    def train(self) -> RunPlan:
        plan = self.plan()
        if plan.seed_job is not None:
            self._train(plan.seed_job, "seed")
            plan = self.plan()
        todo = plan.missing()
        self.log(f"[train] {len(plan.units) + len(plan.seqs) - len(todo)} of "
                 f"{len(plan.units) + len(plan.seqs)} unit/seq models exist; training {len(todo)}")
        for i, job in enumerate(todo):
            self._train(job.cfg, f"{job.kind} model {i + 1}/{len(todo)} ({job.name})")
            if self.env.is_main:
                self.registry.record(job.entry, {"kind": job.kind, "name": job.name,
                                                 "weights": job.weights, "seed": plan.seed_dir})
        return plan

    # ------------------------------------------------------------------ evaluation
    def _suite(self):
        from megablocks_ablate.data.tokenizer import load_tokenizer
        from megablocks_ablate.evaluate import EvalSuite

        tok = load_tokenizer(self.manifest.data["tokenizer"]["path"])
        if tok.fingerprint != self.manifest.tokenizer_fingerprint:
            raise ConfigError(f"{self.manifest.root}: the tokenizer file "
                              f"{self.manifest.data['tokenizer']['path']} changed since preprocess")
        cache = self.opt.cache_dir or os.path.join(self.out_dir, "cache", "eval")
        suite = EvalSuite.load([f"{d}={p}" for d, p in self.study.eval_sets.items()], tok,
                               cache_dir=cache)
        fp = sha256_json({"tokenizer": tok.fingerprint, "stride": self.opt.stride,
                        "max_len": self.opt.max_len,
                        "sets": {d: [s.num_documents, s.num_tokens, s.num_bytes]
                                 for d, s in suite.sets.items()}})
        return suite, fp

    def _evaluate(self, model, suite, group) -> dict[str, Score]:
        from megablocks_ablate.evaluate import evaluate

        res = evaluate(model, suite, stride=self.opt.stride, max_len=self.opt.max_len,
                       batch_tokens=self.opt.batch_tokens, group=group)
        return {d: Score(r.nll_sum, r.tokens, r.bytes) for d, r in res.items()}

    def _mine(self, items: list) -> list:
        return items[self.env.rank::self.env.world_size]

    def _eval_models(self, store, suite, fp, group, jobs: list[ModelJob]) -> None:
        from megablocks_ablate.evaluate.checkpoint import load_model

        domains = list(self.study.eval_sets)
        for job in self._mine(jobs):
            done = (store.unit_done(job.name, domains) if job.kind == "unit"
                    else store.done(job.name, mx.SEQ, domains))
            if done:
                continue
            model, lineage = load_model(job.entry.model_dir, self.env.device)
            scores = self._evaluate(model, suite, group)
            prov = make_provenance(eval_fingerprint=fp, model=job.entry.out_dir, key=job.entry.key,
                                   model_sha256=job.entry.completion().get("model_sha256"),
                                   weights=job.weights, tokens_seen=lineage.tokens_seen)
            rows = [Result(job.name, mx.SEQ if job.kind == "seq" else mx.IND, d, s, prov)
                    for d, s in scores.items()]
            (store.add_unit_results if job.kind == "unit" else store.add_results)(rows)
            self.log(f"[eval] {job.kind} {job.name}: " + ", ".join(
                f"{d} {s.perplexity:.2f}" for d, s in scores.items()))

    def merge_eval(self, store, suite, fp, group, plan: RunPlan) -> int:
        """Score this rank's share of the mixtures; returns merges evaluated."""
        from megablocks_ablate.merge.pool import ModelPool
        from megablocks_ablate.model.config import ModelConfig
        from megablocks_ablate.train.checkpoint import Lineage, save_model_checkpoint

        domains, proxies = list(self.study.eval_sets), self.study.spec.proxies
        todo = []
        for m in self._mine(self.study.mixtures):
            for w, ps in mx.merge_plan(m, proxies):
                if not all(store.done(m.id, p, domains) for p in ps):
                    todo.append((m, w, ps))
        if not todo:
            return 0
        jobs = {j.name: j for j in plan.units}
        needed = [u for u in self.study.used_units if any(u in w for _, w, _ in todo)]
        pool = ModelPool.from_checkpoints({u: jobs[u].entry.model_dir for u in needed},
                                          device=self.env.device, show_progress=False)
        model = ModelConfig.from_dict(pool.config).build(device=self.env.device)
        hashes = {u: jobs[u].entry.completion().get("model_sha256") for u in needed}
        delay = float(os.environ.get(MERGE_DELAY_ENV, 0) or 0)
        bar = progress(total=len(todo), desc=f"merge-eval rank {self.env.rank}", unit="merge",
                       disable=None if self.env.is_main else True)
        with bar:
            for m, w, ps in todo:
                pool.merge_into(model, w)
                scores = self._evaluate(model, suite, group)
                prov = make_provenance(unit_hashes={u: hashes[u] for u in w}, weights=w,
                                       eval_fingerprint=fp, proxies=ps)
                store.add_results([Result(m.id, p, d, s, prov) for p in ps
                                   for d, s in scores.items()])
                if self.opt.save_merged:
                    save_model_checkpoint(
                        os.path.join(self.out_dir, "merged", f"{m.id}.{'+'.join(ps)}"),
                        model.state_dict(), pool.config,
                        Lineage(kind="merged", seed_hash=pool.lineages[0].seed_hash,
                                units=list(w), weights=list(w.values()),
                                tokens_seen=sum(pool.lineages[pool.units.index(u)].tokens_seen
                                                for u in w),
                                tokenizer_fingerprint=self.manifest.tokenizer_fingerprint,
                                parents=[jobs[u].entry.model_dir for u in w]))
                bar.update(1)
                bar.set_postfix(mixture=m.label[:40], refresh=False)
                if delay:
                    time.sleep(delay)
        return len(todo)

    def evaluate(self, plan: RunPlan) -> None:
        from megablocks_ablate.train.distributed import barrier

        path = store_path(self.out_dir)
        if self.env.is_main:
            with ResultStore(path) as store:
                store.set_meta("study", self.study.to_meta())
                store.add_mixtures(self.study.mixtures)
        barrier()
        group = _local_group(self.env)
        suite, fp = self._suite()
        with ResultStore(path) as store:
            t = time.perf_counter()
            if any(p in mx.IND_PROXIES for p in self.study.spec.proxies):
                self._eval_models(store, suite, fp, group, plan.units)
            self._eval_models(store, suite, fp, group, plan.seqs)
            n = self.merge_eval(store, suite, fp, group, plan)
            self.log(f"[eval] {n} merged models evaluated on rank {self.env.rank} in "
                     f"{time.perf_counter() - t:.1f} s")
        barrier()
        if self.env.is_main:
            with ResultStore(path) as store:
                store.set_meta("spent", spent_tokens(plan))

    def search(self, k: int, proxy: str = "macro", domains: list[str] | None = None,
               beam_width: int = 4):
        """Beam search for the best ``k``-mixture of the study's partitions by ``proxy``
        (geometric-mean perplexity over ``domains``), merging and evaluating lazily: a
        mixture already in the store is read, any other is merged in memory, evaluated
        and stored. Needs the unit models of every partition (``study run`` first).
        Runs on one process. Returns (:class:`~.search.SearchResult`, number of
        mixtures merged and evaluated now)."""
        import math

        from megablocks_ablate.ablate.mixtures import Mixture
        from megablocks_ablate.ablate.search import beam_search
        from megablocks_ablate.merge.pool import ModelPool
        from megablocks_ablate.model.config import ModelConfig

        if proxy not in ("merged", "macro", "micro"):
            raise ConfigError(f"--proxy: search needs a merged proxy (merged, macro, micro), "
                              f"got {proxy!r}")
        all_domains = list(self.study.eval_sets)
        domains = list(domains or all_domains)
        unknown = [d for d in domains if d not in all_domains]
        if unknown:
            raise ConfigError(f"--domains: unknown evaluation domain {unknown[0]!r} "
                              f"(known: {', '.join(all_domains)})")
        plan = self.plan()
        jobs = {j.name: j for j in plan.units}
        missing = [u for u in self.study.units if u not in jobs or not jobs[u].entry.complete]
        if missing:
            raise ConfigError(f"unit model of {missing[0]!r} is not trained: search merges "
                              "the models of every partition (run `study run` first, with "
                              "mixtures covering every partition)")
        pool = ModelPool.from_checkpoints({u: jobs[u].entry.model_dir for u in self.study.units},
                                          device=self.env.device, show_progress=False)
        model = ModelConfig.from_dict(pool.config).build(device=self.env.device)
        suite, fp = self._suite()
        path = store_path(self.out_dir)
        merged = []

        def score(names: tuple[str, ...]) -> float:
            m = Mixture.of({p: self.study.partitions[p] for p in names})
            with ResultStore(path) as store:
                if not store.done(m.id, proxy, domains):
                    merged.append(m.id)
                    store.add_mixtures([m])
                    (w, ps), = mx.merge_plan(m, [proxy])
                    pool.merge_into(model, w)
                    scores = self._evaluate(model, suite, None)
                    prov = make_provenance(weights=w, eval_fingerprint=fp, proxies=ps,
                                           search=True)
                    store.add_results([Result(m.id, p, d, sc, prov) for p in ps
                                       for d, sc in scores.items()])
                ppl = {d: sc.perplexity for d, sc in store.scores(m.id, proxy).items()}
            self.log(f"[search] {m.label}: " + ", ".join(f"{d} {ppl[d]:.2f}" for d in domains))
            return math.exp(sum(math.log(ppl[d]) for d in domains) / len(domains))

        result = beam_search(list(self.study.partitions), k, score, beam_width=beam_width)
        return result, len(merged)

    def run(self) -> RunPlan:
        plan = self.train()
        self.evaluate(plan)
        return plan


def spent_tokens(plan: RunPlan) -> dict[str, int]:
    """Tokens the study's models were actually trained on (from their COMPLETE.json)."""
    def tokens(out_dir: str) -> int:
        with open(os.path.join(out_dir, "COMPLETE.json"), encoding="utf-8") as f:
            return int(json.load(f).get("tokens_seen", 0))

    spent = {}
    seed_run = os.path.dirname(os.path.abspath(plan.seed_dir))
    if _complete(seed_run):
        spent["seed tokens"] = tokens(seed_run)
    spent["unit-model tokens"] = sum(tokens(j.entry.out_dir) for j in plan.units)
    spent["seq-model tokens"] = sum(tokens(j.entry.out_dir) for j in plan.seqs)
    return spent


def _complete(out_dir: str) -> bool:
    from megablocks_ablate.train.state import is_complete

    return is_complete(out_dir)


def _local_group(env):
    """A process group of this rank alone (evaluation is sharded by mixture, not batch)."""
    if env.world_size <= 1:
        return None
    import torch.distributed as dist

    group, _ = dist.new_subgroups(group_size=1)
    return group


def run_study(study: Study, options: RunOptions | None = None, dry_run: bool = False) -> StudyRunner:
    """Plan (and unless ``dry_run``, train and evaluate) ``study``."""
    runner = StudyRunner(study, options)
    ok = False
    try:
        if dry_run:
            runner.log(runner.describe(runner.plan()))
        else:
            runner.run()
        ok = True
    finally:
        runner.close(clean=ok)
    return runner


__all__ = ["RunOptions", "RunPlan", "ModelJob", "StudyRunner", "run_study", "spent_tokens"]
