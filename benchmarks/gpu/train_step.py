"""Rows ``train_130m`` / ``train_1.1b``: training tokens/s and MFU through the real trainer.

``train()`` (megablocks_ablate/train/trainer.py) on one GPU, from the seed preset
(``130m_seed``, ``1.1b_seed``) as it is: sequence 2048, its micro batch, bf16
autocast (precision auto on CUDA), its activation-checkpointing setting (1.1b: on),
Triton kernels (MBA_KERNELS auto), flash-attn when importable else SDPA. Only the
run's length changes: ``--accum`` micro batches per optimizer step (the preset's
global batch of 1024 sequences would make one step take a minute) and ``--steps``
steps, on the demo corpus of ``benchmarks/train_throughput.py`` (packed, blended and
repeated as the trainer does). Figures are the median of the per-step metrics records
after ``--skip`` warm-up steps; an optimizer step every ``--accum`` micro batches makes
them a slight lower bound of a full-batch run's. MFU = flops_per_token * tokens/s /
peak bf16 FLOP/s of the device (megablocks_ablate/train/metrics.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import sys
import tempfile

from common import meets, parser, run_row, target


def _attention_impl(device) -> str:
    from megablocks_ablate.kernels import dispatch

    flash = dispatch.flash_attn_func() if device.type == "cuda" else None
    if flash is not None:
        import flash_attn

        return f"flash-attn {flash_attn.__version__}"
    return "sdpa"


def body(args) -> dict:
    import torch
    from train_throughput import make_data  # benchmarks/train_throughput.py

    from megablocks_ablate.kernels import dispatch
    from megablocks_ablate.model.config import ModelConfig
    from megablocks_ablate.train.config import TrainConfig
    from megablocks_ablate.train.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dev = torch.device(args.device)
    workdir = args.workdir or tempfile.mkdtemp(prefix="mba-train-step-")
    data = make_data(args.data_cache or os.path.join(workdir, "data-cache"))
    preset = TrainConfig.from_preset(args.preset)
    seq = args.seq_len or preset.seq_len
    micro = args.micro_batch or preset.micro_batch
    step_tokens = seq * micro * args.accum
    model_overrides = list(preset.model_overrides) + list(args.model_override)
    run_dir = os.path.join(workdir, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = TrainConfig.from_preset(
        args.preset,
        [
            f"out_dir={run_dir}",
            f"data.manifest={data}",
            f"seq_len={seq}",
            f"micro_batch={micro}",
            f"global_batch_tokens={step_tokens}",
            f"train_tokens={step_tokens * args.steps}",
            f"device={dev.type}",
            f"model_overrides=[{', '.join(model_overrides)}]",
            "logging.every=1",
            "logging.progress=false",
            "logging.tensorboard=false",
            "checkpoint.every=0",
            "checkpoint.resume=never",
            "checkpoint.final_optimizer=false",
        ],
    )
    mcfg = ModelConfig.from_preset(cfg.model, cfg.model_overrides)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    train(cfg)
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    steady = records[args.skip :] or records[-1:]
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    mfu = statistics.median(mfus) if mfus else None
    peak_mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    shutil.rmtree(run_dir, ignore_errors=True)  # the final weights (4.4 GB for 1.1b)
    tgt = (
        target(f"MFU >= {args.target_mfu:.0%}", ">=", args.target_mfu) if args.target_mfu else None
    )
    text = f"{tps:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu is not None else ", MFU n/a")
    return {
        "key": {"name": "tokens_per_s", "value": round(tps, 1), "unit": "tokens/s", "text": text},
        "target": tgt,
        "met": meets(mfu, tgt) if tgt else None,
        "details": {
            "preset": args.preset,
            "model": cfg.model,
            "params": mcfg.num_params(),
            "seq_len": seq,
            "micro_batch": micro,
            "grad_accum": args.accum,
            "steps": args.steps,
            "steady_steps": len(steady),
            "tokens_per_s": round(tps, 1),
            "mfu": mfu,
            "tflops_per_device": statistics.median(r["tflops_per_device"] for r in steady),
            "flops_per_token": mcfg.flops_per_token(seq),
            "precision": "bf16 autocast" if dev.type == "cuda" else cfg.precision,
            "activation_checkpointing": mcfg.activation_checkpointing,
            "compile": mcfg.compile,
            "attention": _attention_impl(dev),
            "kernels": (
                "triton"
                if dev.type == "cuda"
                and dispatch.triton_available()
                and dispatch.configured_backend() != "reference"
                else "reference"
            ),
            "peak_memory_gib": round(peak_mem, 2) if peak_mem is not None else None,
            "per_step_tokens_per_s": [r["tokens_per_s"] for r in records],
            "final_loss": records[-1].get("loss"),
        },
    }


if __name__ == "__main__":
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="train", help="the row's name")
    ap.add_argument("--preset", default="130m_seed", help="train preset (configs/train/)")
    ap.add_argument("--model-override", action="append", default=[], help="key=value, repeatable")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the preset's")
    ap.add_argument("--accum", type=int, default=2, help="micro batches per optimizer step")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the figures")
    ap.add_argument("--target-mfu", type=float, default=None)
    ap.add_argument("--data-cache", default=None, help="corpus/tokenizer/manifest cache dir")
    known, _ = ap.parse_known_args()
    sys.exit(run_row(known.name, ap, body))
