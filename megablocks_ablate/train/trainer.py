"""The training loop: seed, unit and seq models, single process or data parallel.

::

    from megablocks_ablate.train.config import TrainConfig
    from megablocks_ablate.train.trainer import train

    summary = train(TrainConfig.from_preset("demo_unit", ["data.unit=bio-0000", "out_dir=pool/{unit}"]))

One optimizer step reads one global batch of ``global_batch`` sequences: each of the
``W`` data-parallel ranks takes its contiguous slice in ``accum`` micro batches of
``micro_batch`` sequences. Every micro batch's loss is a mean over its tokens and
every micro batch has the same number of tokens, so scaling each by ``1/accum`` and
letting DDP/FSDP average gradients over ranks gives exactly the gradient of the mean
loss over the global batch, whatever ``W`` and ``accum`` are.

Resumption is exact: the step, the data position (``consumed_samples``), model and
optimizer state and the RNG states are restored, and the LR is a function of the step.
A continued run (``init_from``) starts from that model's weights, and with
``init_optimizer=seed`` from its optimizer state (:mod:`.init_state`); a resumed one
always from its own checkpoint.

Before the first step the inputs are verified (``init_from`` against its recorded
sha256 and for finite weights, the units against the manifest, token ids against the
vocabulary); every step checks its loss and gradient norm before the optimizer steps,
and a non-finite one stops, skips or rolls back by ``nan_policy`` (:mod:`.divergence`).
``final/`` and ``COMPLETE.json`` are written only when the last step trained and every
final weight is finite. With ``weight_average`` (:mod:`.weight_average`) ``final/`` holds
the average of the weights over the end of the run; training itself is unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time

import numpy as np
import torch

from megablocks_ablate import errors
from megablocks_ablate.checkpoint import (
    MODEL_FILE,
    Lineage,
    check_finite_state,
    resolve_checkpoint_dir,
)
from megablocks_ablate.errors import ConfigError, DataFormatError
from megablocks_ablate.train import state as st
from megablocks_ablate.train.config import TrainConfig
from megablocks_ablate.train.data import build_mixture, check_unit_data
from megablocks_ablate.train.distributed import (
    DistEnv,
    barrier,
    broadcast_object,
    distributed_session,
)
from megablocks_ablate.train.divergence import (
    NOT_CERTIFIED,
    DivergenceGuard,
    NanInjector,
    StepCheck,
    check_step,
    clip_grads_with_norm,
    total_grad_norm,
)
from megablocks_ablate.train.init_state import FRESH, SEED, init_record, load_seed_optimizer
from megablocks_ablate.train.init_weights import load_init_weights
from megablocks_ablate.train.metrics import (
    MetricsLogger,
    ThroughputMeter,
    peak_tflops,
    truncate_jsonl,
)
from megablocks_ablate.train.optim import build_optimizer, lr_at, set_lr
from megablocks_ablate.train.parallel import (
    build_model,
    compile_order,
    computes_in_bf16,
    micro_batch_sync,
    wrap_model,
)
from megablocks_ablate.train.weight_average import WeightAverager
from megablocks_ablate.utils.atomic import atomic_write_text
from megablocks_ablate.utils.outputs import claim_output_dir
from megablocks_ablate.utils.progress import progress

logger = logging.getLogger(__name__)

# Testing hook: seconds to sleep after each step, so a test can kill a run mid-way.
STEP_DELAY_ENV = "MBA_TRAIN_STEP_DELAY"


def _full_cpu():
    """State-dict options: full tensors (FSDP2 shards gathered), offloaded to the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume, or skip if complete with the same settings) the training run
    ``cfg``; returns a summary. A finished run with other settings is refused."""
    with distributed_session(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_s) as env:
        return Trainer(cfg, env).run()


def _unwrapped(model):
    """The module whose parameter names are the checkpoint's (DDP wraps in ``module``)."""
    return getattr(model, "module", model)


class Trainer:
    """One run on one rank; :meth:`run` does everything."""

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        if cfg.init_from:  # a training run directory means its final/ (checkpoint/run_dir.py)
            cfg = dataclasses.replace(cfg, init_from=resolve_checkpoint_dir(cfg.init_from))
        self.cfg, self.env = cfg, env
        self.out_dir = cfg.resolved_out_dir()
        self.guard = DivergenceGuard(cfg.nan_policy, cfg.nan_max_skips, self.out_dir)
        self._rollback_to: tuple[int, str] | None = None  # (step, checkpoint) to restore
        self.optimizer_init = init_record(FRESH, None)  # set by run(): where step 0's came from

    def _on_main(self, fn):
        """``fn()`` on rank 0 only; every rank returns its result, or raises its error.
        For checks whose cost should be paid once (hashing, scanning data)."""
        if not self.env.distributed:
            return fn()
        if self.env.is_main:
            try:
                result = fn()
            except Exception as e:
                broadcast_object((None, type(e).__name__, str(e)))
                raise
            return broadcast_object((result, None, None))[0]
        result, kind, message = broadcast_object((None, None, None))
        if kind is None:
            return result
        cls = getattr(errors, kind, None)
        if isinstance(cls, type) and issubclass(cls, errors.MBAError):
            raise cls(message)
        raise RuntimeError(f"rank 0 failed: {kind}: {message}")

    # ---- set-up -------------------------------------------------------------------------
    def _build_model(self):
        cfg = self.cfg
        mcfg = cfg.model_config()  # seq_len within the model's max_seq_len, checked
        vocab = int(self.manifest.data["tokenizer"]["vocab_size"])
        if vocab > mcfg.vocab_size:
            raise ConfigError(
                f"model: the data's tokenizer has {vocab} tokens but model "
                f"{cfg.model!r} has vocab_size={mcfg.vocab_size} "
                f"(add model_overrides: [vocab_size={vocab}])"
            )
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        self.model_config = mcfg
        return build_model(mcfg, self.env.device)  # blocks compiled by _wrap (compile_order)

    def _wrap(self, model):
        """Checkpointing policy, compile, FSDP2 / DDP / nothing: :func:`.parallel.wrap_model`."""
        return wrap_model(model, self.cfg, self.env)

    def _check_data(self) -> None:
        """The run's units against the manifest (size and sha256, cached) and their token
        ids against the tokenizer's vocabulary (no larger than the model's, as
        :meth:`_build_model` checked), once, before any step reads them."""
        units = [u for u, w in self.weights.items() if w > 0]
        vocab = int(self.manifest.data["tokenizer"]["vocab_size"])
        self._on_main(lambda: check_unit_data(self.manifest, units, vocab))

    def _latest_checkpoint(self) -> str | None:
        found = st.list_checkpoints(self.out_dir)
        policy = self.cfg.checkpoint.resume
        if policy == "must" and not found:
            raise ConfigError(f"checkpoint.resume=must but {self.out_dir} has no checkpoint")
        if policy == "never" and found:
            raise ConfigError(
                f"checkpoint.resume=never but {self.out_dir} already has checkpoints "
                f"(use another out_dir)"
            )
        return found[-1][1] if found else None

    # ---- state --------------------------------------------------------------------------
    def _full_states(self, model, optimizer):
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        return (
            get_model_state_dict(model, options=_full_cpu()),
            get_optimizer_state_dict(model, optimizer, options=_full_cpu()),
        )

    def _restore(self, model, optimizer, ckpt: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        where, fix = os.path.join(self.resume_dir, MODEL_FILE), "delete its step directory"
        check_finite_state(ckpt["model"], where, f"{fix} to resume from an earlier one")
        opts = StateDictOptions(full_state_dict=True)
        try:
            set_model_state_dict(model, ckpt["model"], options=opts)
            set_optimizer_state_dict(model, optimizer, ckpt["optim"], options=opts)
        except (RuntimeError, KeyError, ValueError) as e:
            raise DataFormatError(
                f"{self.resume_dir}: checkpoint does not fit this model/optimizer ({e})"
            ) from None
        rng = ckpt["rng"]
        if len(rng) == self.env.world_size:
            st.set_rng_state(rng[self.env.rank])
        average = ckpt["average"]
        count = self.averager.saved_count(ckpt["trainer"], average is not None, self.resume_dir)
        if count:
            where = os.path.join(self.resume_dir, st.AVERAGE_FILE)
            check_finite_state(average, where, f"{fix} to resume from an earlier one")
            self.averager.restore(count, lambda: set_model_state_dict(model, average, options=opts))

    def _save(self, model, optimizer, step: int) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        model_sd, optim_sd = self._full_states(model, optimizer)
        average_sd = None
        if self.averager.count:  # 0 without averaging, or before its first step
            average_sd = self.averager.read(
                lambda: get_model_state_dict(model, options=_full_cpu())
            )
        rng = [st.rng_state()]
        if self.env.distributed:
            gathered = [None] * self.env.world_size
            dist.all_gather_object(gathered, rng[0])  # in-process only; files hold no pickle
            rng = gathered
        if self.env.is_main:
            st.save_train_checkpoint(
                st.step_dir(self.out_dir, step),
                model_state=model_sd,
                model_config=self.model_config.to_dict(),
                lineage=self._lineage(step),
                optim_state=optim_sd,
                rng_states=rng,
                average_state=average_sd,
                trainer_state={
                    "step": step,
                    "consumed_samples": self.mix.consumed_samples,
                    "tokens_seen": self._tokens(step),
                    "data": self.mix.state_dict(),
                    "world_size": self.env.world_size,
                    "config": self.cfg.to_dict(),
                    "nonfinite": self.guard.state_dict(),
                    **self.optimizer_init,
                    **self.averager.trainer_state(),
                },
            )
            st.prune_checkpoints(self.out_dir, self.cfg.checkpoint.keep_last)
        barrier()

    def _tokens(self, step: int) -> int:
        return step * self.cfg.global_batch * self.cfg.seq_len

    def _lineage(self, step: int) -> Lineage:
        return Lineage(
            kind=self.cfg.kind,
            seed_hash=self.seed_hash,
            units=list(self.weights),
            weights=[float(w) for w in self.weights.values()],
            tokens_seen=self._tokens(step),
            tokenizer_fingerprint=self.manifest.tokenizer_fingerprint,
            parents=[self.cfg.init_from] if self.cfg.init_from else [],
            trained_seq_len=self.cfg.seq_len,
            extra={
                "steps": step,
                **self.optimizer_init,
                "seq_len": self.cfg.seq_len,
                "global_batch": self.cfg.global_batch,
                # the tokenizer travels with the weights (eval and export-hf find it);
                # lineage.json records it relative to the checkpoint when the manifest
                # records it relative
                "tokenizer": self.manifest.tokenizer_record(),
            },
        )

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> dict:
        cfg, env = self.cfg, self.env
        if st.is_complete(self.out_dir):  # reused only if trained with these settings
            st.check_complete(self.out_dir, cfg.to_dict())
            logger.info(f"{self.out_dir}: training already complete, nothing to do")
            return {"out_dir": self.out_dir, "skipped": True}
        cfg.model_config()  # a seq_len the model cannot take is refused before any write
        compile_order()  # and so is a bad MBA_COMPILE_ORDER
        if env.is_main:  # a run directory is ours to resume; anything else is refused
            claim_output_dir(
                self.out_dir,
                "train-run",
                reuse=True,
                flag="out_dir",
                inputs=[cfg.data.manifest, cfg.init_from],
            )
            st.remove_stale_staging(self.out_dir)
        barrier()
        logger.info(
            f"launcher {env.launcher}: {env.world_size} rank(s), {env.device}, "
            f"{cfg.distributed.parallel if env.distributed else 'single process'}"
        )

        self.mix, self.weights, self.manifest = build_mixture(cfg)
        model = self._build_model()
        self._check_data()
        self.resume_dir = self._latest_checkpoint()
        ckpt = None
        if self.resume_dir:
            ckpt = st.load_train_checkpoint(self.resume_dir)
            st.check_compatible(ckpt["trainer"]["config"], cfg.to_dict(), self.resume_dir)
            self.seed_hash = ckpt["lineage"].seed_hash
        elif cfg.init_from:
            self.seed_hash = load_init_weights(
                model,
                cfg.init_from,
                self.model_config.to_dict(),
                self.manifest,
                cfg.data.manifest,
                env.device,
                self._on_main,
            )
        else:
            self.seed_hash = None

        model = self._wrap(model)
        optimizer = build_optimizer(model, cfg.optimizer, env.device)
        self.averager = WeightAverager(cfg.weight_average, cfg.train_steps, _unwrapped(model))
        start = 0
        if ckpt is not None:  # its own optimizer state, never init_from's again
            saved = ckpt["trainer"]  # (one from before init_optimizer existed started fresh)
            self.optimizer_init = init_record(
                saved.get("optimizer_init", FRESH), saved.get("optimizer_init_from")
            )
            self._restore(model, optimizer, ckpt)
            self.mix.load_state_dict(ckpt["trainer"]["data"])
            self.guard.load_state_dict(ckpt["trainer"].get("nonfinite"))
            start = int(ckpt["trainer"]["step"])
            logger.info(f"resuming {self.out_dir} from step {start} ({self.resume_dir})")
            del ckpt
        elif cfg.init_from and cfg.init_optimizer == SEED:
            self.optimizer_init = load_seed_optimizer(
                model, _unwrapped(model), optimizer, cfg.init_from, self._on_main, env.is_main
            )
        if env.is_main:
            truncate_jsonl(os.path.join(self.out_dir, "metrics.jsonl"), start)
            atomic_write_text(os.path.join(self.out_dir, st.CONFIG_FILE), cfg.to_yaml())
        return self._loop(model, optimizer, start)

    def _step_runner(self, model):
        """A function running optimizer step ``step`` (1-based): forward/backward passes
        over ``grad_accum`` micro-batches (gradient sync only on the last, or under FSDP2
        on each with ``distributed.fsdp_reduce_every_micro_batch``), the
        non-finite check (:mod:`.divergence`), then clipping and the optimizer step, or
        for a non-finite step only dropping the gradients; returns the step's check (the
        mean loss over ranks and the pre-clip gradient norm)."""
        cfg, env = self.cfg, self.env
        accum = cfg.grad_accum_steps(env.world_size)
        use_bf16 = computes_in_bf16(cfg.precision, env.device.type)
        every_micro = cfg.distributed.fsdp_reduce_every_micro_batch
        named = [(n, p) for n, p in _unwrapped(model).named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        inject = NanInjector(rank=env.rank)

        def run(batches, optimizer, step: int) -> StepCheck:
            loss_sum = torch.zeros((), device=env.device)
            for micro in range(accum):
                batch = torch.from_numpy(next(batches)).to(env.device, non_blocking=True)
                sync = micro_batch_sync(model, micro == accum - 1, every_micro)
                # Autocast stays on under FSDP2's bf16 policy: it casts the fp32
                # residual stream meeting bf16 weights (train/parallel.py).
                with sync, torch.autocast(env.device.type, torch.bfloat16, enabled=use_bf16):
                    loss = model(batch[:, :-1], batch[:, 1:])
                    (loss / accum).backward()
                loss_sum += loss.detach().float()
            inject(step, loss_sum, named)
            norm = total_grad_norm(params)
            check = check_step(step, loss_sum / accum, norm, named)
            if check.finite:
                clip_grads_with_norm(params, clip, norm)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return check

        return run

    def _open_metrics(self, start: int):
        cfg, env = self.cfg, self.env
        metrics = MetricsLogger(
            self.out_dir,
            env.is_main,
            cfg.logging.tensorboard,
            cfg.logging.wandb_project,
            os.path.basename(self.out_dir),
            cfg.to_dict(),
            start_step=start,
        )
        meter = ThroughputMeter(
            self.model_config.flops_per_token(cfg.seq_len),
            peak_tflops(env.device, cfg.logging.peak_tflops),
            env.world_size,
            self._tokens(start),
        )
        show = env.is_main and cfg.logging.progress
        bar = progress(
            total=cfg.train_steps,
            initial=start,
            desc=os.path.basename(self.out_dir) or "train",
            unit="step",
            disable=None if show else True,
        )  # None: MBA_NO_PROGRESS decides
        return metrics, meter, bar

    def _batches(self):
        cfg, env = self.cfg, self.env
        return self.mix.batches(
            cfg.global_batch,
            env.rank,
            env.world_size,
            consumed_samples=self.mix.consumed_samples,
            micro_batch=cfg.micro_batch,
        )

    def _loop(self, model, optimizer, start: int) -> dict:
        cfg = self.cfg
        total = cfg.train_steps
        delay = float(os.environ.get(STEP_DELAY_ENV, 0) or 0)
        step_fn = self._step_runner(model)
        metrics, meter, bar = self._open_metrics(start)
        model.train()
        loss_value, step = None, start
        try:
            batches = self._batches()
            while step < total:
                set_lr(optimizer, lr_at(step, cfg))
                check = step_fn(batches, optimizer, step + 1)
                action = None if check.finite else self._on_nonfinite(check)
                if action == "rollback":
                    step = self._rollback(model, optimizer, metrics, meter, bar)
                    batches = self._batches()
                    continue
                if action is None:
                    self.guard.finite_step()
                    self.averager.update(step + 1)
                step += 1
                bar.update(1)
                if action == "skip" or step % cfg.logging.every == 0 or step == total:
                    loss_value = self._log_step(check, optimizer, metrics, meter, bar)
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total:
                    self._save(model, optimizer, step)
                if delay:
                    time.sleep(delay)
            self._finish(model, optimizer, total, loss_value)
        finally:
            bar.close()
            metrics.close()
        return {
            "out_dir": self.out_dir,
            "steps": total,
            "start_step": start,
            "tokens_seen": self._tokens(total),
            "final_loss": loss_value,
            "elapsed_s": round(time.perf_counter() - meter.t0, 3),
            **self.guard.state_dict(),
            **self.optimizer_init,
        }

    def _log_step(self, check: StepCheck, optimizer, metrics, meter, bar) -> float | None:
        """The metrics record of a step; a value that is not finite is recorded as null.
        Returns the loss (None if not finite)."""
        loss = check.loss if math.isfinite(check.loss) else None
        norm = check.grad_norm if math.isfinite(check.grad_norm) else None
        lr = optimizer.param_groups[0]["lr"]
        record = meter.record(check.step, self._tokens(check.step), loss, lr, norm)
        if not check.finite:
            record.update(
                skipped=True, nonfinite=check.tensor, skipped_steps=len(self.guard.skipped)
            )
        metrics.log(record)
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        return loss

    def _on_nonfinite(self, check: StepCheck) -> str:
        """``"skip"`` or ``"rollback"`` for a non-finite step, with a warning; raises
        :class:`NonFiniteError` when the run stops (before any final/ or COMPLETE.json)."""
        target = None
        if self.cfg.nan_policy == "rollback":
            found = st.list_checkpoints(self.out_dir) if self.env.is_main else []
            target = broadcast_object(found[-1] if found else None)
        action = self.guard.decide(check, target[0] if target else None)
        self._rollback_to = target
        if self.env.is_main:
            what = (
                f"{self.out_dir}: step {check.step}: {check.describe()} is non-finite "
                f"(loss {check.loss:.6g}, grad norm {check.grad_norm:.6g})"
            )
            if action == "skip":
                logger.warning(
                    f"{what}; skipped its update (nan_policy=skip: "
                    f"{len(self.guard.skipped)} skipped so far, at most "
                    f"{self.cfg.nan_max_skips} in a row)"
                )
            else:
                logger.warning(
                    f"{what}; rolling back to the step-{target[0]} checkpoint {target[1]} "
                    f"(nan_policy=rollback)"
                )
        return action

    def _rollback(self, model, optimizer, metrics, meter, bar) -> int:
        """Restore model, optimizer, RNG and data position of the checkpoint chosen by
        :meth:`_on_nonfinite`, as a resume would; returns its step."""
        step, path = self._rollback_to
        ckpt = st.load_train_checkpoint(path)
        self.resume_dir = path
        self._restore(model, optimizer, ckpt)
        self.mix.load_state_dict(ckpt["trainer"]["data"])
        del ckpt
        self.guard.rewind(step)
        metrics.rewind(step)
        meter.rewind(self._tokens(step))
        bar.n = step
        bar.refresh()
        return step

    def _finish(self, model, optimizer, total: int, loss: float | None) -> None:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        self.guard.check_end(total, loss)  # the last step trained, its loss is defined
        # collectives (every rank takes part); weight_average: final/ holds the average
        model_sd = self.averager.read(lambda: get_model_state_dict(model, options=_full_cpu()))
        optim_sd = None
        if self.cfg.checkpoint.final_optimizer:
            optim_sd = get_optimizer_state_dict(model, optimizer, options=_full_cpu())
        what = "the averaged weights" if self.averager.enabled else "the trained model"
        where = f"{self.out_dir}: {what} after step {total}"  # before any write
        self._on_main(lambda: check_finite_state(model_sd, where, NOT_CERTIFIED))
        if self.env.is_main:
            lineage = self._lineage(total)
            lineage.extra.update(self.averager.record())
            st.save_final(
                self.out_dir,
                model_sd,
                self.model_config.to_dict(),
                lineage,
                {
                    "step": total,
                    "tokens_seen": self._tokens(total),
                    "final_loss": loss,
                    "kind": self.cfg.kind,
                    "units": list(self.weights),
                    **self.guard.state_dict(),
                    **self.optimizer_init,
                    **self.averager.record(),
                },
                optim_state=optim_sd,
            )
            if self.guard.skipped:
                logger.warning(
                    f"{self.out_dir}: {len(self.guard.skipped)} step(s) had non-finite "
                    f"values and were skipped: {self.guard.skipped}"
                )
            logger.info(
                f"{self.out_dir}: done, {total} steps, {self._tokens(total)} tokens, loss {loss}"
            )
        barrier()
