"""Training metrics: JSONL always; TensorBoard and W&B when installed, never required.

One record per logged step::

    {"step": 40, "loss": 5.12, "lr": 0.0006, "grad_norm": 0.83, "tokens": 163840,
     "tokens_per_s": 51234.0, "tflops_per_device": 12.3, "mfu": 0.41, "elapsed_s": 3.2}

``mfu`` is model FLOPs utilisation: ``flops_per_token(seq_len) * tokens/s`` over the
peak of all devices; it is null when the peak is unknown (CPU, unlisted GPU) unless
``logging.peak_tflops`` or ``MBA_PEAK_TFLOPS`` gives it. Each logged interval is timed
between two clock reads taken after the device has finished its queued work, so the
rate is that of work done, not of work launched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

from megablocks_ablate.errors import ConfigError

logger = logging.getLogger(__name__)

PEAK_ENV = "MBA_PEAK_TFLOPS"  # peak TFLOP/s of one device, when logging.peak_tflops is unset

# Dense BF16 tensor-core peak TFLOP/s of one GPU (FP32 accumulate). NVIDIA's datasheets
# print the 2:4-sparse figure (starred); the dense peak, used here, is half of it:
#   H100 SXM 1,979* -> 989; H100 PCIe 1,513* -> 756; H100 NVL 1,671* -> 835 per GPU
#     (NVIDIA H100 Tensor Core GPU datasheet; early editions gave the NVL for the pair)
#   H200 SXM 1,979* -> 989; H200 NVL 1,671* -> 835 (NVIDIA H200 datasheet)
#   GH200 1,979* -> 989 (GH200 Grace Hopper Superchip datasheet)
#   H800 SXM / PCIe: the H100 SXM / PCIe compute (the export parts differ in NVLink)
#   B200: 4.5 PF* -> 2250 (HGX B200 datasheet: 36 PF* over 8 GPUs)
#   A100 SXM4 and PCIe, 40 and 80 GB: 624* -> 312 (NVIDIA A100 datasheet); A800 the same
#   A30 330* -> 165; A40 299.4* -> 149.7; A10 250* -> 125 (their datasheets)
#   L40S 733* -> 362; L40 362.1* -> 181; L4 242* -> 121 (their datasheets)
#   RTX A6000 tensor 309.7* -> 154.8 (NVIDIA RTX A6000 datasheet)
#   GeForce RTX 4090 165.2 and RTX 3090 71, BF16 with FP32 accumulate, dense (Ada and
#     GA102 architecture whitepapers: GeForce runs FP32 accumulate at half rate)
# Not listed, so no MFU unless given: V100 (no BF16 tensor cores), A10G and other
# cloud-only parts without an NVIDIA datasheet, MIG slices (a fraction of the GPU).
#
# Matched against the tokens of torch.cuda.get_device_name() as NVIDIA reports it, e.g.
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA L40S", "NVIDIA RTX A6000":
# the first row whose tokens all occur wins, so form factors come before the bare model,
# and whole tokens keep "L4" from matching "L40S" or "H20" from matching "H200".
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("GH200",), 989.0),
    (("H200", "NVL"), 835.0),
    (("H200",), 989.0),
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),
    (("H800", "PCIE"), 756.0),
    (("H800",), 989.0),
    (("B200",), 2250.0),
    (("A100",), 312.0),
    (("A800",), 312.0),
    (("A30",), 165.0),
    (("A40",), 149.7),
    (("A10",), 125.0),
    (("L40S",), 362.0),
    (("L40",), 181.0),
    (("L4",), 121.0),
    (("A6000",), 154.8),
    (("RTX", "4090"), 165.2),
    (("RTX", "3090"), 71.0),
)

_reported_unknown: set[str] = set()  # GPU names already logged as having no peak


def gpu_peak_tflops(name: str) -> float | None:
    """Dense BF16 peak TFLOP/s of the GPU named ``name`` (as ``get_device_name`` gives
    it), or None when it is not in :data:`PEAK_BF16_TFLOPS`."""
    tokens = set(re.split(r"[^A-Z0-9]+", name.upper()))
    for required, value in PEAK_BF16_TFLOPS:
        if tokens.issuperset(required):
            return value
    return None


def _positive(value, source: str) -> float:
    try:
        peak = float(value)
    except (TypeError, ValueError):
        peak = float("nan")
    if not peak > 0 or peak == float("inf"):
        raise ConfigError(f"{source}: expected a positive number of TFLOP/s, got {value!r}")
    return peak


def peak_tflops(device, configured: float | None) -> float | None:
    """Peak TFLOP/s of one device for MFU: ``configured`` (``logging.peak_tflops``) if
    set, else ``$MBA_PEAK_TFLOPS`` if set, else a listed GPU's, else None (CPU, or an
    unlisted GPU: logged once per name)."""
    if configured is not None:
        return _positive(configured, "logging.peak_tflops")
    env = os.environ.get(PEAK_ENV, "").strip()
    if env:
        return _positive(env, PEAK_ENV)
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    peak = gpu_peak_tflops(name)
    if peak is None and name not in _reported_unknown:
        _reported_unknown.add(name)
        logger.info(
            f"no peak TFLOP/s known for GPU {name!r}: MFU is not reported "
            f"(set logging.peak_tflops or {PEAK_ENV})"
        )
    return peak


def synchronize(device=None) -> None:
    """Wait until ``device`` has run its queued work (CUDA); nothing on CPU.

    ``device=None``: the current CUDA device if this process has initialised CUDA, so a
    caller that does not pass its device is still timed correctly."""
    import torch

    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


class ThroughputMeter:
    """The record of a logged step: loss and learning rate with tokens/s, TFLOP/s per
    device and MFU measured since the previous logged step.

    Kernels run asynchronously: the clock read at a logging point would otherwise fall
    while the step's work is still queued, charging it to the next interval. So every
    clock read (start, each record, a rewind, :meth:`elapsed_s`) first synchronises
    ``device`` (see :func:`synchronize`; the default None picks the current CUDA device
    once CUDA is in use). One sync per logged step costs a pipeline drain, not a step.
    """

    def __init__(
        self,
        flops_per_token: float,
        peak: float | None,
        world_size: int,
        tokens_at_start: int,
        device=None,
    ):
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak, world_size
        self.tokens_at_start = tokens_at_start
        self.device = device
        self.t0 = self.t_last = self._now()
        self.tokens_last = 0

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def elapsed_s(self) -> float:
        """Seconds since the meter started, once the device's queued work is done."""
        return self._now() - self.t0

    def record(self, step: int, tokens: int, loss: float, lr: float, grad_norm: float) -> dict:
        """``tokens``: total trained after ``step`` (the run's start included)."""
        now = self._now()
        done = tokens - self.tokens_at_start
        tps = (done - self.tokens_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.tokens_last = now, done
        flops = self.flops_per_token * tps
        return {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": round(tps, 1),
            "tflops_per_device": round(flops / self.world_size / 1e12, 4),
            "mfu": (round(flops / (self.peak * 1e12 * self.world_size), 4) if self.peak else None),
            "elapsed_s": round(now - self.t0, 3),
        }

    def rewind(self, tokens: int) -> None:
        """The run went back to ``tokens`` (a rollback): measure from here, now."""
        self.t_last = self._now()
        self.tokens_last = tokens - self.tokens_at_start


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop records after ``last_step`` (a resumed run redoes those steps)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by a kill
                pass
    from megablocks_ablate.utils.atomic import atomic_write_text

    atomic_write_text(path, "".join(keep))


WANDB_ID_FILE = "wandb_run_id"  # in the run directory: the W&B run a resume continues


def _has_events(directory: str) -> bool:
    try:
        return any(n.startswith("events.out.tfevents.") for n in os.listdir(directory))
    except OSError:
        return False


class MetricsLogger:
    """Writes records to ``metrics.jsonl`` (+ TensorBoard, W&B); rank 0 only.

    ``start_step``: the step the run starts (or resumes) from; later steps are redone,
    so TensorBoard purges its earlier events after ``start_step`` (as ``metrics.jsonl``
    is cut back by :func:`truncate_jsonl`). The W&B run id is kept in
    ``<out_dir>/wandb_run_id``, and a later start in the same run directory continues
    that W&B run.
    """

    def __init__(
        self,
        out_dir: str,
        enabled: bool,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        run_name: str = "",
        config: dict | None = None,
        start_step: int = 0,
    ):
        self.enabled = enabled
        self._path = os.path.join(out_dir, "metrics.jsonl")
        self._tb_dir = os.path.join(out_dir, "tb")
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self._file = open(self._path, "a", encoding="utf-8")
        if tensorboard:
            self._open_tb(start_step)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                logger.warning(
                    "logging.wandb_project is set but wandb is not installed; "
                    "logging to metrics.jsonl only"
                )
            else:
                self._wandb = self._init_wandb(
                    wandb, out_dir, wandb_project, run_name, config, start_step
                )

    def _open_tb(self, last_step: int) -> None:
        """(Re)open the TensorBoard writer; events after ``last_step`` already written
        by an earlier run or attempt are purged (``purge_step``), so redone steps show
        once, with their new values."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return  # tensorboard not installed: JSONL only
        purge = last_step + 1 if last_step > 0 or _has_events(self._tb_dir) else None
        self._tb = SummaryWriter(self._tb_dir, purge_step=purge)

    @staticmethod
    def _init_wandb(wandb, out_dir, project, run_name, config, start_step):
        id_path = os.path.join(out_dir, WANDB_ID_FILE)
        saved = None
        try:
            with open(id_path, encoding="utf-8") as f:
                saved = f.read().strip() or None
        except FileNotFoundError:
            pass
        kwargs = dict(project=project, name=run_name or None, config=config, dir=out_dir)
        if saved:
            kwargs["id"] = saved  # continue this run directory's W&B run
        run = wandb.init(resume="allow", **kwargs)
        run_id = getattr(run, "id", None)
        if run_id and run_id != saved and not getattr(run, "disabled", False):
            from megablocks_ablate.utils.atomic import atomic_write_text

            atomic_write_text(id_path, f"{run_id}\n")
        if saved and start_step > 0:
            logger.info(f"W&B: continuing run {saved} from step {start_step}")
        return run

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {
            k: v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and v is not None
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def rewind(self, last_step: int) -> None:
        """Drop the JSONL records and TensorBoard events after ``last_step`` (a
        rollback trains them again). W&B cannot go back: it ignores the redone steps it
        already has."""
        if self._file is None:
            return
        self._file.close()
        truncate_jsonl(self._path, last_step)
        self._file = open(self._path, "a", encoding="utf-8")
        if self._tb is not None:
            self._tb.close()
            self._open_tb(last_step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
