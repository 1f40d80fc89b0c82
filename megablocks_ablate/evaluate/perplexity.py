"""Perplexity and bits per byte of a model on every domain of an :class:`EvalSuite`.

    suite = EvalSuite.load("paloma/", "tok.model")       # once: tokenized, cached, resident
    for ckpt in merged_models:                           # the study loop
        results = evaluate(model_of(ckpt), suite)        # {domain: DomainResult}
        results["c4_en"].perplexity, results["c4_en"].bits_per_byte

Per domain, over the predicted tokens ``T`` (every text token; see :mod:`.windows`)::

    perplexity    = exp( sum_T nll / |T| )
    bits_per_byte = sum_T nll / ln 2 / (UTF-8 bytes of the scored documents' text)

The loop is inference only: ``torch.inference_mode``, bf16 autocast on CUDA, and the
model's fused output projection + cross-entropy (``model.per_token_nll``), so the
``[tokens, vocab]`` logits are never built.

**Distributed.** The batch plan is the same on every rank; rank ``r`` of ``W`` computes
batches ``r, r + W, ...``. Each batch's NLL is summed in fp64 and written into row ``i``
of a ``[batches, 2]`` fp64 table (NLL sum, predicted tokens), zero elsewhere; one
``all_reduce(SUM)`` then fills the table exactly (each row has a single non-zero
contributor, and ``x + 0 == x``), and each domain's total is ``math.fsum`` over its rows.
So any number of ranks gives bit-for-bit the single-process result. Bytes and document
counts are properties of the data, which every rank holds, so they need no reduction;
the reduced token counts are checked against the plan to catch ranks that disagree.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megablocks_ablate.errors import ConfigError, NonFiniteError, TokenizerError
from megablocks_ablate.evaluate.dist import comm_device, rank_and_world
from megablocks_ablate.evaluate.sets import EvalSuite
from megablocks_ablate.evaluate.windows import (
    IGNORE_INDEX,
    Batch,
    Plan,
    make_batch,
    make_plan,
    resolve_window,
    validate_window_args,
)
from megablocks_ablate.utils.progress import progress

DEFAULT_BATCH_TOKENS = 16384
LN2 = math.log(2.0)


@dataclass(frozen=True)
class DomainResult:
    """Evaluation of one model on one domain (NLL in nats)."""

    domain: str
    nll_sum: float
    tokens: int  # predicted tokens
    documents: int
    bytes: int  # UTF-8 bytes of the scored documents

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        """``exp(mean_nll)``; ``inf`` where that overflows float64 (mean NLL > ~709)."""
        if not self.tokens:
            return math.nan
        try:
            return math.exp(self.mean_nll)
        except OverflowError:
            return math.inf

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / LN2 / self.bytes if self.bytes else math.nan

    def to_dict(self) -> dict:
        return {
            "domain": self.domain,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "mean_nll": self.mean_nll,
            "nll_sum": self.nll_sum,
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": self.bytes,
        }


@dataclass
class RankPlan:
    """The global batch plan and this rank's batches of it (materialised once, CPU int32)."""

    plan: Plan
    batch_ids: list[int]
    batches: list[Batch]


def rank_plan(
    suite: EvalSuite, max_len: int, stride: int, batch_tokens: int, rank: int = 0, world: int = 1
) -> RankPlan:
    """The batches rank ``rank`` of ``world`` scores (cached in the suite)."""
    key = (max_len, stride, batch_tokens, rank, world)
    cached = suite._plans.get(key)
    if cached is None:
        plan = make_plan(suite.sets, max_len, stride, batch_tokens)
        ids = list(plan.owned(rank, world))
        batches = []
        for i in ids:
            domain = plan.domains[int(plan.batch_domain[i])]
            s = suite.sets[domain]
            batches.append(
                make_batch(
                    domain,
                    s.tokens,
                    s.offsets,
                    suite.eod_id,
                    plan.windows[domain],
                    plan.batch_rows[i],
                )
            )
        cached = suite._plans[key] = RankPlan(plan, ids, batches)
    return cached


def _model_max_len(model) -> int:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "max_seq_len"):
        raise ConfigError("evaluate: the model has no cfg.max_seq_len; pass max_len=")
    return int(cfg.max_seq_len)


def _resolve_suite(
    eval_sets: EvalSuite | str | Sequence[str], tokenizer, tokenizer_fingerprint: str | None, group
) -> EvalSuite:
    """The suite to score (loaded if given files), checked against the model's tokenizer."""
    if not isinstance(eval_sets, EvalSuite):
        if tokenizer is None:
            raise ConfigError("evaluate: pass tokenizer= to evaluate files (or an EvalSuite)")
        eval_sets = EvalSuite.load(eval_sets, tokenizer, group=group)
    suite = eval_sets
    if tokenizer_fingerprint is not None and tokenizer_fingerprint != suite.tokenizer_fingerprint:
        raise TokenizerError(
            f"eval sets were tokenized with tokenizer {suite.tokenizer_fingerprint[:16]}..., but the "
            f"model was trained with {tokenizer_fingerprint[:16]}...: evaluate with the model's tokenizer"
        )
    return suite


def _window_args(
    model,
    max_len: int | None,
    stride: int | None,
    trained_len: int | None = None,
    beyond: bool = False,
    name: str | None = None,
) -> tuple[int, int]:
    """(max_len, stride) with defaults filled in (the trained length), checked."""
    max_len = resolve_window(
        max_len, trained_len, _model_max_len(model), name or "the model", beyond=beyond
    )
    return max_len, validate_window_args(max_len, stride)


def _score_batches(
    model: torch.nn.Module,
    rp: RankPlan,
    rank: int,
    autocast_dtype: torch.dtype | None,
    show_progress: bool,
) -> torch.Tensor:
    """This rank's rows of the ``[batches, 2]`` fp64 (NLL sum, predicted tokens) table."""
    device = next(model.parameters()).device
    autocast = (
        torch.autocast("cuda", dtype=autocast_dtype)
        if device.type == "cuda" and autocast_dtype is not None
        else contextlib.nullcontext()
    )
    table = torch.zeros(rp.plan.num_batches, 2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            autocast,
            progress(
                total=sum(b.scored_tokens for b in rp.batches),
                desc=f"eval rank {rank}",
                unit="tok",
                disable=None if show_progress else True,
            ) as bar,
        ):
            for i, batch in zip(rp.batch_ids, rp.batches):
                inputs, labels = batch.inputs_and_labels(device)
                nll = model.per_token_nll(inputs, labels)
                valid = labels != IGNORE_INDEX
                table[i, 0] = torch.where(valid, nll.float(), 0.0).sum(dtype=torch.float64)
                table[i, 1] = valid.sum()
                bar.update(batch.scored_tokens)
    finally:
        model.train(was_training)
    return table


def _reduce_table(table: torch.Tensor, plan: Plan, world: int, group) -> torch.Tensor:
    """Sum the ranks' tables (CPU result), checking the token counts against the plan."""
    if world > 1:
        table = table.to(comm_device(group))
        dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)
    table = table.cpu()
    counted = table[:, 1].to(torch.int64)
    if not torch.equal(counted, torch.from_numpy(plan.scored_tokens)):
        raise RuntimeError(
            "evaluate: predicted-token counts differ from the batch plan "
            "(did every rank pass the same eval sets and settings?)"
        )
    return table


def _domain_results(table: torch.Tensor, plan: Plan, suite: EvalSuite) -> dict[str, DomainResult]:
    """Per domain: the ``math.fsum`` of its batches' NLL, with tokens, documents and bytes."""
    nll = table[:, 0].tolist()
    results = {}
    for d_index, domain in enumerate(plan.domains):
        rows = (plan.batch_domain == d_index).nonzero()[0]
        s = suite.sets[domain]
        results[domain] = DomainResult(
            domain=domain,
            nll_sum=math.fsum(nll[r] for r in rows),
            tokens=int(plan.scored_tokens[rows].sum()),
            documents=s.num_documents,
            bytes=s.num_bytes,
        )
    return results


def check_finite(results: dict[str, DomainResult], name: str | None = None) -> None:
    """Refuse results with a NaN/inf loss or an overflowing perplexity (NonFiniteError
    naming the model and every such domain): numbers must be right or absent."""
    bad = [
        f"{r.domain!r} (NLL sum {r.nll_sum:.6g} over {r.tokens} tokens"
        + (", perplexity overflows float64)" if math.isfinite(r.nll_sum) else ")")
        for r in results.values()
        if not (math.isfinite(r.nll_sum) and math.isfinite(r.perplexity))
    ]
    if bad:
        raise NonFiniteError(
            f"{name or 'the model'}: non-finite evaluation result on "
            f"{'domain' if len(bad) == 1 else 'domains'} {', '.join(bad)}: its weights "
            "hold NaN/inf or its training diverged (or an fp16/bf16 overflow)"
        )


def evaluate(
    model: torch.nn.Module,
    eval_sets: EvalSuite | str | Sequence[str],
    *,
    stride: int | None = None,
    max_len: int | None = None,
    trained_len: int | None = None,
    beyond_trained_context: bool = False,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    tokenizer=None,
    tokenizer_fingerprint: str | None = None,
    group=None,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    show_progress: bool = False,
    name: str | None = None,
) -> dict[str, DomainResult]:
    """Score ``model`` on every domain: ``{domain: DomainResult}`` (same on every rank).

    eval_sets: an :class:`EvalSuite` (keep it across calls: data and batch plans stay in
        memory), or what :meth:`EvalSuite.load` takes, together with ``tokenizer``.
    stride: labels scored per window after the first; default (None) = ``max_len``,
        non-overlapping windows. Smaller = sliding windows with more context.
    max_len: window length; default ``trained_len``, at most ``model.cfg.max_seq_len``.
    trained_len: the sequence length the model was trained at (its lineage's
        ``trained_seq_len``, :func:`megablocks_ablate.checkpoint.trained_seq_len`); None:
        ``model.cfg.max_seq_len``. A longer ``max_len`` is a ConfigError naming both
        numbers, unless ``beyond_trained_context`` (scoring untrained positions on purpose).
    batch_tokens: padded tokens per forward (windows are length-bucketed).
    tokenizer_fingerprint: the tokenizer the model was trained with (its lineage); a
        suite tokenized differently is refused.
    group: the ``torch.distributed`` group to shard over (default: the world, if
        initialised); every rank of it must call this with the same arguments.
    autocast_dtype: autocast dtype on CUDA (None: run in the weights' dtype).
    name: what to call the model in errors (e.g. its checkpoint directory). A NaN/inf
        loss, or a perplexity that overflows, on any domain raises NonFiniteError naming
        it and the domain (on every rank alike: the check is on the reduced totals).
    """
    suite = _resolve_suite(eval_sets, tokenizer, tokenizer_fingerprint, group)
    max_len, stride = _window_args(
        model, max_len, stride, trained_len, beyond_trained_context, name
    )
    rank, world = rank_and_world(group)
    rp = rank_plan(suite, max_len, stride, batch_tokens, rank, world)
    table = _score_batches(model, rp, rank, autocast_dtype, show_progress)
    table = _reduce_table(table, rp.plan, world, group)
    results = _domain_results(table, rp.plan, suite)
    check_finite(results, name)
    return results


def results_table(results: dict[str, DomainResult]) -> str:
    """A plain-text table of results, one domain per line."""
    lines = [f"{'domain':<24} {'ppl':>10} {'bpb':>8} {'tokens':>12} {'docs':>8}"]
    for r in results.values():
        lines.append(
            f"{r.domain:<24} {r.perplexity:>10.4f} {r.bits_per_byte:>8.4f} "
            f"{r.tokens:>12,d} {r.documents:>8,d}"
        )
    return os.linesep.join(lines)
