"""Score: evaluate unit and seq models, and merged mixtures, into the results store.

::

    unit models ──▶ ModelPool [N, P] ──merge_into(weights)──▶ live model ──▶ EvalSuite
                    (one row per unit,    one kernel call        (one module,   (resident,
                     loaded once)          per weight vector)     reused)        tokenized once)
                                                                     │
                                          results.sqlite ◀── rows (mixture, proxy, domain)

:meth:`Scorer.score_mixture` is the one routine that scores a mixture: ``study run``
(:func:`merge_eval`), ``study search`` and any future proposer call it, so a row's
provenance (unit hashes, weights, evaluation fingerprint, window, proxies) is the
same wherever its score came from.

**Window.** Every model of a study is scored in one window length (:func:`study_window`):
by default the shortest sequence length its scored models were trained at, so no score
reads a position no model trained on; ``--max-len`` beyond it needs
``--beyond-trained-context``. The window is part of the evaluation fingerprint and of
every row's provenance (``max_len``, ``stride``, ``trained_seq_len``), and a store whose
rows were scored in another window is refused (:func:`check_store_window`).

Rows of one merge are committed in one transaction with ``INSERT OR IGNORE``: a kill
loses at most the merge in flight and duplicates nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.mixtures import Mixture, Score
from megablocks_ablate.ablate.runner.plan import ModelJob, RunPlan, scored_train_configs
from megablocks_ablate.ablate.spec import Study
from megablocks_ablate.ablate.store import Result, ResultStore, make_provenance
from megablocks_ablate.checkpoint import (
    Lineage,
    merged_seq_len,
    save_model_checkpoint,
    trained_seq_len,
)
from megablocks_ablate.data.manifest import Manifest
from megablocks_ablate.data.tokenizer import load_tokenizer
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.evaluate import EvalSuite, evaluate
from megablocks_ablate.evaluate.windows import BEYOND_FLAG, resolve_window
from megablocks_ablate.merge.pool import RowPool
from megablocks_ablate.merge.pool_placement import PlacementChoice, PoolRequest, open_pool
from megablocks_ablate.model.config import ModelConfig
from megablocks_ablate.model.loading import load_model
from megablocks_ablate.utils.hashing import sha256_json
from megablocks_ablate.utils.progress import progress

if TYPE_CHECKING:
    from megablocks_ablate.model.transformer import Transformer

logger = logging.getLogger(__name__)

# Testing hook: seconds to sleep after each committed merge, so a test can kill a run
# in the middle of merge-eval (the trainer has MBA_TRAIN_STEP_DELAY for training).
MERGE_DELAY_ENV = "MBA_MERGE_EVAL_DELAY"


@dataclass
class ScoreOptions:
    """How models are evaluated (the evaluation part of the runner's options)."""

    device: str | torch.device = "cpu"
    batch_tokens: int = 16384  # padded tokens per forward
    stride: int | None = None  # evaluation windows (default: non-overlapping)
    # window length (default: the length the study's models were trained at, see
    # study_window); a longer one needs beyond_trained_context
    max_len: int | None = None
    beyond_trained_context: bool = False
    cache_dir: str | None = None  # tokenized eval sets (default: out_dir/cache/eval)
    save_merged: bool = False  # also write each merged model under out_dir/merged/
    # Where the unit-model pool's rows live (merge/pool_placement.py): auto | resident |
    # host | sharded; rows auto (bf16 on CUDA, fp32 elsewhere) | bf16 | fp32; merges
    # accumulate in fp32 either way.
    pool_placement: str = "auto"
    pool_dtype: str = "auto"
    pool_dir: str | None = None  # node-wide directory of host rows (default /dev/shm)
    # The G ranks of a sharded pool, which must score the same mixtures in lockstep
    # (None: no sharding; a pool that would need it is refused with its figures).
    pool_group: object | None = None
    # False on the G-1 ranks of a pool group that follow its first: they merge and
    # evaluate in lockstep with it but leave the rows (and merged models) to it.
    write_results: bool = True


def study_window(study: Study, max_len: int | None = None, beyond: bool = False) -> int:
    """The window a study scores every model in: ``max_len``, by default the shortest
    ``seq_len`` of the train configs of the models it scores (unit, partition-level and
    seq models; :func:`.plan.scored_train_configs`), so merged and seq models are scored
    alike and only at trained positions. A longer ``max_len`` is a ConfigError naming
    both numbers unless ``beyond`` (``--beyond-trained-context``)."""
    cfgs = scored_train_configs(study.spec)
    ref_field, cfg = min(cfgs.items(), key=lambda item: item[1].seq_len)
    what = {"unit.config": "each unit model", "validation.train.config": "each seq model"}
    return resolve_window(
        max_len,
        cfg.seq_len,
        min(c.model_config().max_seq_len for c in cfgs.values()),
        f"{what[ref_field]} ({ref_field})",
        beyond=beyond,
        flag="--max-len",
        beyond_flag=BEYOND_FLAG,
    )


def check_store_window(path: str, window: int) -> None:
    """Refuse to add rows scored in ``window``-token windows to a results store holding
    rows scored in another (a study's scores must be comparable): ConfigError naming both
    lengths. A store that does not exist yet holds none."""
    if not os.path.isfile(path):
        return
    with ResultStore(path) as store:
        other = sorted(w for w in store.windows() if w != window)
    if other:
        raise ConfigError(
            f"{path}: holds scores evaluated in {other[0]}-token windows, but this run "
            f"scores in {window}-token windows; pass --max-len {other[0]} (with "
            f"{BEYOND_FLAG} if that is beyond the trained length), or use a new out_dir"
        )


def load_suite(
    study: Study, manifest: Manifest, opt: ScoreOptions, window: int | None = None
) -> tuple[EvalSuite, str]:
    """The study's evaluation sets, tokenized (cached), and their fingerprint (which
    covers the tokenizer, the window length ``window`` and stride, and the sets)."""
    tok = load_tokenizer(manifest.tokenizer_file)  # recorded relative to the manifest
    if tok.fingerprint != manifest.tokenizer_fingerprint:
        raise ConfigError(
            f"{manifest.root}: the tokenizer file {manifest.tokenizer_file} changed since "
            "preprocess"
        )
    cache = opt.cache_dir or os.path.join(study.spec.out_dir, "cache", "eval")
    # A Paloma domain is several shards (maybe filtered on a field): its eval_sets value
    # is a `paloma:` reference, turned back into a source with the shards as they are now.
    from megablocks_ablate.errors import MBAError
    from megablocks_ablate.evaluate import paloma

    refs = {d: p for d, p in study.eval_sets.items() if paloma.is_ref(p)}
    try:
        resolved = paloma.sources_from_refs(refs)
    except MBAError as e:
        raise ConfigError(f"eval.paloma: {e}") from None
    items = [resolved.get(d, f"{d}={p}") for d, p in study.eval_sets.items()]
    suite = EvalSuite.load(items, tok, cache_dir=cache)
    fp = sha256_json(
        {
            "tokenizer": tok.fingerprint,
            "stride": opt.stride,
            "max_len": window if window is not None else opt.max_len,
            "sets": {
                d: [s.num_documents, s.num_tokens, s.num_bytes] for d, s in suite.sets.items()
            },
        }
    )
    return suite, fp


class Scorer:
    """Evaluates models on one resident suite; merges mixtures from one in-memory pool."""

    def __init__(
        self, study: Study, manifest: Manifest, opt: ScoreOptions, group: object | None = None
    ):
        self.study, self.manifest, self.opt, self.group = study, manifest, opt, group
        self.window = study_window(study, opt.max_len, opt.beyond_trained_context)
        self.suite, self.fingerprint = load_suite(study, manifest, opt, self.window)
        self.domains = list(study.eval_sets)
        self._pool: RowPool | None = None
        self.pool_choice: PlacementChoice | None = None
        self._live: torch.nn.Module | None = None
        self._units: dict[str, ModelJob] = {}
        self._unit_hashes: dict[str, str | None] = {}  # None: not recorded at training
        self._unit_trained: dict[str, int] = {}  # trained length of each pool row

    def window_provenance(self, trained: int) -> dict:
        """What a stored row records of its window (besides the evaluation fingerprint)."""
        return {"max_len": self.window, "stride": self.opt.stride, "trained_seq_len": trained}

    def evaluate(
        self, model: torch.nn.Module, name: str | None = None, trained: int | None = None
    ) -> dict[str, Score]:
        """Scores per domain; a non-finite one is an error naming ``name`` and the domain.
        ``trained``: the length the model was trained at (the window must not exceed it
        unless the options say beyond_trained_context)."""
        res = evaluate(
            model,
            self.suite,
            stride=self.opt.stride,
            max_len=self.window,
            trained_len=trained,
            beyond_trained_context=self.opt.beyond_trained_context,
            batch_tokens=self.opt.batch_tokens,
            group=self.group,
            name=name,
        )
        return {d: Score(r.nll_sum, r.tokens, r.bytes) for d, r in res.items()}

    # ---------------------------------------------------------------- trained models
    def score_model(self, store: ResultStore, job: ModelJob) -> None:
        """Evaluate a unit or partition-level model (``unit_results``, under its name) or a
        seq model (proxy ``seq``, or ``ind_seq`` for one at the unit models' scale)."""
        single = job.kind in ("unit", "partition")
        proxy = mx.IND if single else (mx.IND_SEQ if job.kind == mx.IND_SEQ else mx.SEQ)
        done = (
            store.unit_done(job.name, self.domains)
            if single
            else store.done(job.name, proxy, self.domains)
        )
        if done:
            return
        sha = job.verified_sha256()  # the bytes about to be evaluated are the trained ones
        model, lineage = load_model(job.entry.model_dir, self.opt.device)
        max_seq_len = cast("Transformer", model).cfg.max_seq_len
        trained = trained_seq_len(lineage, max_seq_len, job.entry.model_dir)
        scores = self.evaluate(
            model, f"the {job.kind} model {job.name!r} ({job.entry.out_dir})", trained
        )
        prov = make_provenance(
            eval_fingerprint=self.fingerprint,
            model=store.record_path(job.entry.out_dir),  # relative to the store
            key=job.entry.key,
            model_sha256=sha,
            weights=job.weights,
            tokens_seen=lineage.tokens_seen,
            **self.window_provenance(trained),
        )
        rows = [Result(job.name, proxy, d, s, prov) for d, s in scores.items()]
        (store.add_unit_results if single else store.add_results)(rows)
        logger.info(
            "[eval] %s %s: %s",
            job.kind,
            job.name,
            ", ".join(f"{d} {s.perplexity:.2f}" for d, s in scores.items()),
        )

    # ---------------------------------------------------------------- mixtures
    def open_pool(self, units: Sequence[ModelJob]) -> None:
        """Load these unit models as the rows of the in-memory pool (once)."""
        self._units = {j.name: j for j in units}
        self._unit_hashes = {j.name: j.verified_sha256() for j in units}
        if self._pool is not None:
            self._pool.close()  # host rows: let go of this node's shared copy
        request = PoolRequest(self.opt.pool_placement, self.opt.pool_dtype, self.opt.pool_dir)
        self._pool, self.pool_choice = open_pool(
            {j.name: j.entry.model_dir for j in units},
            request,
            device=self.opt.device,
            group=cast("dist.ProcessGroup | None", self.opt.pool_group),
            keys=self._unit_hashes,  # the verified hashes name the shared host rows
            batch_tokens=self.opt.batch_tokens,
            show_progress=False,
        )
        self._live = ModelConfig.from_dict(self._pool.config).build(device=self.opt.device)
        max_seq_len = self._live.cfg.max_seq_len
        self._unit_trained = {
            u: trained_seq_len(lin, max_seq_len, self._units[u].entry.model_dir)
            for u, lin in zip(self._pool.units, self._pool.lineages)
        }

    def score_mixture(
        self,
        store: ResultStore,
        mixture: Mixture,
        weights: dict[str, float],
        proxies: Sequence[str],
        extra: dict | None = None,
    ) -> dict[str, Score]:
        """Merge ``weights`` into the live model, evaluate it, and store one row per proxy
        sharing that weight vector and per domain (``extra``: more provenance, e.g. the
        scaled merge's lambda); returns the scores."""
        scores, trained = self._merge_and_evaluate(mixture, weights, "+".join(proxies))
        if not self.opt.write_results:
            return scores
        choice = self.pool_choice
        prov = make_provenance(
            unit_hashes={u: self._unit_hashes[u] for u in weights},
            weights=weights,
            eval_fingerprint=self.fingerprint,
            proxies=list(proxies),
            # rows stored in bf16 differ from an fp32 file merge in the last bits
            pool={
                "placement": choice.placement,
                "itemsize": choice.size.itemsize,
                "format": choice.size.row_format,  # fp32 | bf16-plain | bf16-delta
            }
            if choice is not None
            else None,
            **self.window_provenance(trained),
            **(extra or {}),
        )
        store.add_results(
            [Result(mixture.id, p, d, s, prov) for p in proxies for d, s in scores.items()]
        )
        if self.opt.save_merged:
            self._save_merged(mixture, weights, proxies)
        return scores

    def score_weights(
        self, mixture: Mixture, weights: dict[str, float], what: str
    ) -> dict[str, Score]:
        """Merge and evaluate ``weights`` without storing anything (e.g. the scaled
        merge's lambda grid); ``what`` names the merge in errors."""
        return self._merge_and_evaluate(mixture, weights, what)[0]

    def _merge_and_evaluate(
        self, mixture: Mixture, weights: dict[str, float], what: str
    ) -> tuple[dict[str, Score], int]:
        if self._pool is None or self._live is None:
            raise RuntimeError("Scorer.open_pool must be called before scoring a merge")
        self._pool.merge_into(self._live, weights)
        trained = min(self._unit_trained[u] for u in weights)  # what the merge inherits
        scores = self.evaluate(self._live, f"the merged model of {mixture.label} ({what})", trained)
        return scores, trained

    def _save_merged(
        self, mixture: Mixture, weights: dict[str, float], proxies: Sequence[str]
    ) -> None:
        from megablocks_ablate.data.tokenizer import inherited_tokenizer_record

        assert self._pool is not None and self._live is not None
        lineages = {u: self._pool.lineages[self._pool.units.index(u)] for u in weights}
        # the merge carries its inputs' tokenizer record (else the manifest's tokenizer)
        fingerprint = self.manifest.tokenizer_fingerprint
        tokenizer = (
            inherited_tokenizer_record((lin.extra for lin in lineages.values()), fingerprint)
            or self.manifest.tokenizer_record()
        )
        save_model_checkpoint(
            os.path.join(self.study.spec.out_dir, "merged", f"{mixture.id}.{'+'.join(proxies)}"),
            self._live.state_dict(),
            self._pool.config,
            Lineage(
                kind="merged",
                seed_hash=self._pool.lineages[0].seed_hash,
                units=list(weights),
                weights=list(weights.values()),
                tokens_seen=sum(lin.tokens_seen for lin in lineages.values()),
                tokenizer_fingerprint=fingerprint,
                parents=[self._units[u].entry.model_dir for u in weights],
                extra={"tokenizer": tokenizer},
                trained_seq_len=merged_seq_len(lineages, f"merged model of {mixture.label}"),
            ),
        )


def merge_eval(
    scorer: Scorer, store: ResultStore, plan: RunPlan, mixtures: Sequence[Mixture], rank: int = 0
) -> int:
    """Score every merge of ``mixtures`` (this rank's share) not yet in the store;
    returns the number of merges evaluated."""
    study = scorer.study
    todo = [
        (m, w, ps)
        for m in mixtures
        for w, ps in study.merge_plan(m)
        if not all(store.done(m.id, p, scorer.domains) for p in ps)
    ]
    group = scorer.opt.pool_group
    if group is not None:
        # A sharded pool's ranks must agree on the work: each has read the store, and
        # only the group's first rank writes this group's mixtures, after this barrier.
        dist.barrier(group=cast("dist.ProcessGroup", group))
    if not todo:
        return 0
    needed = {u for _, w, _ in todo for u in w}
    scorer.open_pool([j for j in plan.pool_jobs if j.name in needed])
    delay = float(os.environ.get(MERGE_DELAY_ENV, 0) or 0)
    with progress(
        total=len(todo),
        desc=f"merge-eval rank {rank}",
        unit="merge",
        disable=None if rank == 0 else True,
    ) as bar:
        for m, w, ps in todo:
            scorer.score_mixture(store, m, w, ps)
            bar.update(1)
            bar.set_postfix(mixture=m.label[:40], refresh=False)
            if delay:
                time.sleep(delay)
    return len(todo)
