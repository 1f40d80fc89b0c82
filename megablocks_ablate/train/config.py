"""`TrainConfig`: everything one training run (seed, unit or seq model) needs.

Presets live in ``configs/train/<model>_<kind>.yaml`` (``tiny_seed``, ``demo_unit``,
``130m_seq``, ...)::

    cfg = TrainConfig.load("configs/train/demo_unit.yaml", ["data.unit=biology-0000"])

Sizes, stated once here:

* ``global_batch_tokens`` / ``seq_len`` = global batch in samples (must divide).
* ``micro_batch`` samples per rank per forward/backward; gradient accumulation
  steps = global batch / (micro_batch * data-parallel world) (must divide).
* ``train_tokens`` -> samples = ceil(train_tokens / seq_len) -> steps =
  ceil(samples / global batch); the run reads exactly ``steps * global batch`` samples.

``out_dir`` may contain ``{unit}``, replaced by ``data.unit`` (one YAML for a whole
pool of unit models: ``out_dir: pool/{unit}``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

from megablocks_ablate.config import Config, Count, doc, shipped_preset_dir
from megablocks_ablate.errors import ConfigError

PRESET_DIR = shipped_preset_dir("train")  # megablocks_ablate/configs/train/, package data


@dataclass
class DataConfig(Config):
    """What to train on: one base unit, weighted units, or a mixture of partitions/units."""

    manifest: str = doc("preprocessed data directory (or its manifest.json)", "")
    unit: str | None = doc("train on this one base unit (a unit model)", None)
    weights: dict[str, float] = doc(
        "explicit weight per unit (a weighted mixture)", default_factory=dict
    )
    mixture: list[str] = doc(
        "partitions and/or units to mix; '*' = every partition. Each partition gets an "
        "equal share, split equally among its listed units (the paper's upsampling)",
        default_factory=list,
    )
    balance: Literal["partition", "tokens", "uniform"] = doc(
        "mixture weighting: partition (equal per partition), tokens (natural), uniform "
        "(equal per unit)",
        "partition",
    )
    seed: int | None = doc("seed of the packed-sample shuffles (default: the run's seed)", None)
    cache_dir: str | None = doc(
        "where packed-sample indices are cached (default: beside the data)", None
    )

    def validate(self) -> None:
        given = [
            n
            for n, v in (("unit", self.unit), ("weights", self.weights), ("mixture", self.mixture))
            if v
        ]
        if len(given) > 1:
            raise ConfigError(f"give one of unit, weights or mixture, not {' and '.join(given)}")
        for u, w in self.weights.items():
            if not (math.isfinite(w) and w >= 0):
                raise ConfigError(f"weights.{u}: must be a finite non-negative number, got {w}")
        if self.weights and not sum(self.weights.values()) > 0:
            raise ConfigError("weights: at least one weight must be positive")


@dataclass
class OptimizerConfig(Config):
    """AdamW (torch fused on CUDA; apex FusedAdam when asked for and installed)."""

    lr: float = doc("peak learning rate (reached at the end of warmup)", 6e-4)
    betas: tuple[float, ...] = doc(
        "Adam betas: decay rates of the first and second moments", (0.9, 0.95)
    )
    eps: float = doc("Adam epsilon (added to the second-moment root)", 1e-8)
    weight_decay: float = doc("decoupled weight decay (matrices and embeddings only)", 0.1)
    impl: Literal["auto", "torch", "apex"] = doc(
        "auto: torch AdamW, fused on CUDA; apex: apex FusedAdam (must be installed; not "
        "with distributed.parallel: fsdp, whose sharded DTensor parameters it cannot take)",
        "auto",
    )

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas: expected two numbers in [0, 1), got {self.betas}")
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0:
            raise ConfigError("optimizer: lr and eps must be positive, weight_decay non-negative")


@dataclass
class ScheduleConfig(Config):
    """Linear warmup from ``warmup_start_lr`` to the peak, then decay to ``min_lr``.

    Continued pretraining (unit models from the seed) re-warms: a fresh warmup, starting
    at the seed's final LR (``warmup_start_lr``) and climbing back to the peak, with the
    seed's optimizer state (``init_optimizer=seed``) or a fresh one.
    """

    warmup_steps: int | None = doc(
        "warmup length in optimizer steps (default: warmup_fraction of the run)", None
    )
    warmup_fraction: float = doc(
        "warmup as a fraction of the run's steps, if warmup_steps is unset", 0.01
    )
    warmup_start_lr: float = doc("LR at step 0 of the warmup (re-warming starts above 0)", 0.0)
    decay: Literal["cosine", "linear", "constant"] = doc("LR decay shape after warmup", "cosine")
    min_lr: float = doc("LR reached at the last step", 6e-5)

    def validate(self) -> None:
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.warmup_fraction <= 1:
            raise ConfigError(
                f"schedule.warmup_fraction: must be in [0, 1], got {self.warmup_fraction}"
            )
        if self.min_lr < 0 or self.warmup_start_lr < 0:
            raise ConfigError("schedule: min_lr and warmup_start_lr must be >= 0")


@dataclass
class WeightAverageConfig(Config):
    """Average the weights over the end of the run: ``final/`` holds the average
    (:mod:`megablocks_ablate.train.weight_average`); step checkpoints keep the trained
    weights and the average beside them, so a resume is exact."""

    kind: Literal["none", "ema", "tail"] = doc(
        "none: final/ holds the last step's weights; tail: the uniform mean of the weights "
        "after every step from start_fraction on; ema: their exponential moving average",
        "none",
    )
    start_fraction: float = doc(
        "the average takes the weights after each step past this fraction of the run's steps",
        0.5,
    )
    ema_decay: float = doc("ema: weight kept by the running average at each step", 0.9)

    def validate(self) -> None:
        if not 0 <= self.start_fraction < 1:
            raise ConfigError(
                f"weight_average.start_fraction: must be in [0, 1), got {self.start_fraction}"
            )
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"weight_average.ema_decay: must be in (0, 1), got {self.ema_decay}")


@dataclass
class CheckpointConfig(Config):
    every: int = doc(
        "save a resumable checkpoint every this many optimizer steps (0: only at the end)", 1000
    )
    keep_last: int = doc("keep this many resumable checkpoints (older ones are deleted)", 2)
    resume: Literal["auto", "never", "must"] = doc(
        "auto: resume from the latest checkpoint in out_dir if any; never: refuse a "
        "non-empty out_dir; must: fail without one",
        "auto",
    )
    final_optimizer: bool = doc(
        "also keep the optimizer state (AdamW moments and step counts) in final/, beside the "
        "model, so models continued from this one can start from it (init_optimizer=seed); "
        "about twice the model's size again in fp32",
        False,
    )

    def validate(self) -> None:
        if self.every < 0 or self.keep_last < 1:
            raise ConfigError("checkpoint: every must be >= 0 and keep_last >= 1")


@dataclass
class LoggingConfig(Config):
    every: int = doc("write a metrics record every this many optimizer steps", 10)
    progress: bool = doc("show a progress bar with ETA (rank 0)", True)
    tensorboard: bool = doc("also log to TensorBoard under out_dir/tb when installed", True)
    wandb_project: str | None = doc("also log to this W&B project when wandb is installed", None)
    peak_tflops: float | None = doc(
        "peak TFLOP/s of one device for the MFU estimate (default: known GPUs, none on CPU)", None
    )

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError(f"logging.every: must be >= 1, got {self.every}")


@dataclass
class DistributedConfig(Config):
    """Data parallelism over ranks; FSDP2's precision and mesh (see train/parallel.py)."""

    parallel: Literal["ddp", "fsdp"] = doc(
        "data parallelism: DDP, or FSDP2 (fully_shard) for big models", "ddp"
    )
    backend: Literal["auto", "nccl", "gloo"] = doc("auto: NCCL on CUDA, gloo on CPU", "auto")
    timeout_s: int = doc("collective timeout in seconds", 1800)
    fsdp_param_dtype: Literal["auto", "fp32", "bf16"] = doc(
        "fsdp: dtype parameters are all-gathered and computed in (FSDP2 "
        "MixedPrecisionPolicy); the sharded master weights, optimizer state and "
        "checkpoints stay fp32. auto: bf16 when the run computes in bf16 (precision bf16, "
        "or auto on CUDA), else fp32",
        "auto",
    )
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = doc(
        "fsdp: dtype gradients are reduce-scattered (and accumulated over micro batches) in",
        "fp32",
    )
    fsdp_shard_size: int | None = doc(
        "fsdp: ranks each shard group spans; a smaller size is HSDP (ranks = replicate x "
        "shard: parameters sharded within a group, gradients also all-reduced across "
        "groups). null: the ranks of one node when the run spans several nodes, else all "
        "ranks (plain FSDP). Must divide the number of ranks",
        None,
    )
    fsdp_reduce_every_micro_batch: bool = doc(
        "fsdp: reduce-scatter gradients after every micro batch and accumulate the sharded "
        "gradients (fp32), instead of accumulating unsharded gradients over the micro "
        "batches and reduce-scattering once per optimizer step: no unsharded gradient of "
        "the whole model kept per rank (each block's is freed once reduce-scattered), one "
        "reduce-scatter per micro batch more (under HSDP the "
        "all-reduce across shard groups still runs once per step). The same update to fp32 "
        "rounding; nothing to do without gradient accumulation",
        False,
    )

    def validate(self) -> None:
        if self.fsdp_shard_size is not None and self.fsdp_shard_size < 1:
            raise ConfigError(
                f"distributed.fsdp_shard_size: must be >= 1 (or null), got {self.fsdp_shard_size}"
            )
        if self.parallel != "fsdp":
            given = [
                f"{name}={value}"
                for name, value, default in (
                    ("fsdp_param_dtype", self.fsdp_param_dtype, "auto"),
                    ("fsdp_reduce_dtype", self.fsdp_reduce_dtype, "fp32"),
                    ("fsdp_shard_size", self.fsdp_shard_size, None),
                    ("fsdp_reduce_every_micro_batch", self.fsdp_reduce_every_micro_batch, False),
                )
                if value != default
            ]
            if given:
                raise ConfigError(
                    f"distributed.{given[0]}: applies to parallel=fsdp only "
                    f"(parallel is {self.parallel!r})"
                )


@dataclass
class TrainConfig(Config):
    """One training run; see the module docstring for how sizes relate."""

    preset_dir = PRESET_DIR  # not a field: where `base: <name>` finds train presets

    kind: Literal["seed", "unit", "seq"] = doc(
        "what this run trains (recorded in the lineage)", "unit"
    )
    out_dir: str = doc("run directory: checkpoints/, final/, metrics.jsonl ('{unit}' allowed)", "")
    model: str = doc("model preset (configs/model/<name>.yaml) or a YAML path", "tiny")
    model_overrides: list[str] = doc(
        "key=value overrides of the model preset", default_factory=list
    )
    data: DataConfig = doc(
        "what to train on: one base unit, weighted units, or a mixture", default_factory=DataConfig
    )
    train_tokens: Count = doc("token budget of the run, in tokens (e.g. 50M)", 1_000_000)
    seq_len: int = doc("tokens per training sequence", 2048)
    global_batch_tokens: Count = doc(
        "tokens per optimizer step over all ranks (a multiple of seq_len)", 524288
    )
    micro_batch: int = doc("sequences per rank per forward/backward", 8)
    optimizer: OptimizerConfig = doc("AdamW settings", default_factory=OptimizerConfig)
    schedule: ScheduleConfig = doc(
        "learning-rate schedule: warmup, then decay", default_factory=ScheduleConfig
    )
    weight_average: WeightAverageConfig = doc(
        "average the weights over the end of the run (final/ holds the average)",
        default_factory=WeightAverageConfig,
    )
    grad_clip: float = doc("clip the global gradient L2 norm to this (0: off)", 1.0)
    nan_policy: Literal["stop", "skip", "rollback"] = doc(
        "a step whose loss or gradients are NaN/inf: stop (fail, naming the step and the "
        "first non-finite tensor; no final model), skip (drop that step's update with a "
        "warning; stop after nan_max_skips in a row, and without a final model when the "
        "last step was skipped), rollback (restore the newest step checkpoint and continue; "
        "stop if there is none or the same step diverges again). Under every policy a "
        "final model with a NaN/inf weight is never written",
        "stop",
    )
    nan_max_skips: int = doc(
        "nan_policy=skip: stop at a non-finite step once this many steps in a row were skipped",
        10,
    )
    precision: Literal["auto", "fp32", "bf16"] = doc(
        "auto: bf16 autocast on CUDA, fp32 on CPU; bf16: autocast everywhere", "auto"
    )
    init_from: str | None = doc(
        "start from this model checkpoint's weights (its optimizer state too with "
        "init_optimizer=seed)",
        None,
    )
    init_optimizer: Literal["seed", "fresh"] = doc(
        "optimizer state at step 0: fresh (new AdamW) or seed (init_from's AdamW moments and "
        "step counts, as the paper's A.3 does; this run's optimizer settings and LR schedule "
        "still apply). A seed without optimizer state gives a warning and a fresh one",
        "fresh",
    )
    activation_checkpointing: Literal["none", "selective", "full"] = doc(
        "recompute block activations in backward to save memory: none, selective (every "
        "other block: 0, 2, 4, ...) or full (every block). A run-time setting: it changes "
        "neither the trained model nor the run's key. The model field of that name "
        "(model_overrides: [activation_checkpointing=true]) is deprecated and means full",
        "none",
    )
    seed: int = doc("random seed (model init, data shuffles unless data.seed)", 1234)
    device: Literal["auto", "cpu", "cuda"] = doc("auto: CUDA when available", "auto")
    checkpoint: CheckpointConfig = doc(
        "resumable checkpoints in out_dir/checkpoints/", default_factory=CheckpointConfig
    )
    logging: LoggingConfig = doc(
        "metrics, progress bar, TensorBoard and W&B", default_factory=LoggingConfig
    )
    distributed: DistributedConfig = doc(
        "data parallelism over ranks (torchrun)", default_factory=DistributedConfig
    )

    def validate(self) -> None:
        if self.seq_len <= 0 or self.micro_batch <= 0 or self.train_tokens <= 0:
            raise ConfigError("seq_len, micro_batch and train_tokens must be positive")
        if self.global_batch_tokens % self.seq_len:
            raise ConfigError(
                f"global_batch_tokens: {self.global_batch_tokens} is not a multiple "
                f"of seq_len={self.seq_len}"
            )
        if self.global_batch % self.micro_batch:
            raise ConfigError(
                f"micro_batch: {self.micro_batch} does not divide the global batch "
                f"of {self.global_batch} sequences"
            )
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip: must be >= 0, got {self.grad_clip}")
        if self.nan_max_skips < 0:
            raise ConfigError(f"nan_max_skips: must be >= 0, got {self.nan_max_skips}")
        if self.init_optimizer == "seed" and not self.init_from:
            raise ConfigError(
                "init_optimizer: 'seed' loads init_from's optimizer state, but init_from is "
                "not set (set init_from, or init_optimizer=fresh to train from scratch)"
            )
        if self.kind == "unit" and self.data.mixture:
            raise ConfigError("kind: a unit model trains on one unit (data.unit), not a mixture")
        if self.optimizer.impl == "apex" and self.distributed.parallel == "fsdp":
            raise ConfigError(
                "optimizer.impl: apex cannot be combined with distributed.parallel: fsdp: "
                "FSDP2 hands the optimizer DTensor parameters (each rank's shard), which "
                "apex's fused optimizers cannot take; use optimizer.impl: auto (torch AdamW, "
                "fused on CUDA) or torch"
            )

    # ---- derived sizes -------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.global_batch_tokens // self.seq_len

    @property
    def train_samples(self) -> int:
        return self.train_steps * self.global_batch

    @property
    def train_steps(self) -> int:
        samples = -(-self.train_tokens // self.seq_len)
        return -(-samples // self.global_batch)

    def grad_accum_steps(self, dp_world: int) -> int:
        per_rank = self.micro_batch * dp_world
        if self.global_batch % per_rank:
            raise ConfigError(
                f"global batch of {self.global_batch} sequences is not divisible by "
                f"micro_batch={self.micro_batch} x {dp_world} ranks"
            )
        return self.global_batch // per_rank

    def warmup_steps(self) -> int:
        s = self.schedule
        n = (
            s.warmup_steps
            if s.warmup_steps is not None
            else round(s.warmup_fraction * self.train_steps)
        )
        return min(n, self.train_steps)

    def resolved_out_dir(self) -> str:
        if not self.out_dir:
            raise ConfigError("out_dir: required (the run directory)")
        if "{unit}" in self.out_dir:
            if not self.data.unit:
                raise ConfigError(
                    f"out_dir {self.out_dir!r} uses {{unit}} but data.unit is not set"
                )
            return self.out_dir.replace("{unit}", self.data.unit)
        return self.out_dir

    @classmethod
    def from_preset(
        cls, name: str | os.PathLike, overrides=(), *, report_no_ops: bool = False
    ) -> TrainConfig:
        """``configs/train/<name>.yaml`` (or a YAML path) plus ``key=value`` overrides;
        presets derive from one another by ``base:`` (see :meth:`Config.load_preset`).
        ``report_no_ops``: warn of a (user's) override that changes nothing."""
        return cls.load_preset(
            PRESET_DIR, name, overrides, what="train preset", report_no_ops=report_no_ops
        )

    def model_config(self):
        """The model preset with ``model_overrides``, resolved; ConfigError when the run's
        ``seq_len`` exceeds its ``max_seq_len`` (positions the model has no room for).

        Not part of :meth:`validate`: the field defaults (``seq_len`` 2048, model
        ``tiny``) do not fit together, and ``--print-config`` shows a config whose model
        does not resolve. The trainer, ``train`` and ``study`` call it before any work."""
        from megablocks_ablate.model.config import ModelConfig

        model = ModelConfig.from_preset(self.model, self.model_overrides)
        if self.seq_len > model.max_seq_len:
            raise ConfigError(
                f"seq_len: {self.seq_len} exceeds the max_seq_len={model.max_seq_len} of "
                f"model {self.model!r}; lower seq_len, or raise max_seq_len "
                f"(model_overrides: [max_seq_len={self.seq_len}])"
            )
        return model

    def references(self) -> dict[str, tuple[str, Config]]:
        """The model preset, resolved, shown after ``model_overrides`` by ``--print-config``."""
        from megablocks_ablate.model.config import ModelConfig

        model = ModelConfig.from_preset(self.model, self.model_overrides)
        title = f"model: {self.model!r} + model_overrides, resolved (shown here, not read back):"
        return {"model_overrides": (title, model)}
