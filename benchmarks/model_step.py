"""Model step throughput: ours vs transformers' CohereForCausalLM on the same config.

CPU (always): the ``demo`` preset, a training step (forward, backward, AdamW) and a
no-grad forward (inference, logits out), each for our model and for
``CohereForCausalLM`` built from the exported config with the same weights, in the
same process, measured in alternating rounds (the machine is shared; the median of
the rounds is reported) and printed as a ratio.

GPU (when CUDA is present): tokens/s and MFU of a bf16 training step for ``130m`` and
``1.1b`` at sequence length 2048, MFU = flops_per_token * tokens/s / peak bf16 FLOP/s.
By default the model itself: bf16 parameters, no autocast, no activation
checkpointing, no FSDP (comparable with earlier results). ``--real-path`` times the
step as the trainer runs it instead (:func:`bench_real`): fp32 master weights under bf16
autocast, the ``<preset>_seed`` train preset's activation-checkpointing policy and
micro batch, gradient clipping, and, launched with 2+ ranks (torchrun), FSDP2 with its
mixed-precision policy or DDP as the preset says (``train/parallel.py``); rank 0
writes ``model_step_real.json``. ``--override KEY=VALUE`` changes that train config
(e.g. ``activation_checkpointing=full``, ``distributed.fsdp_param_dtype=fp32``).

    python benchmarks/model_step.py                 # JSON to benchmarks/results/
    python benchmarks/model_step.py --update-docs   # also docs/benchmarks.md "## Model step"
    torchrun --nproc-per-node 8 benchmarks/model_step.py --real-path
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))

import hf_compare

from megablocks_ablate.model import ModelConfig
from megablocks_ablate.utils.benchmark_result import (
    check_writable,
    command_line,
    write_result,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf_model(cfg: ModelConfig, ours: torch.nn.Module):
    """transformers' model holding ours' weights, loaded strictly (``gpu/hf_compare``)."""
    return hf_compare.hf_model(cfg, ours, torch.device("cpu"), torch.float32)


def _train_step(model, opt, ids, labels, hf: bool):
    out = model(ids, labels=labels)
    loss = out.loss if hf else out
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _timed(fn, steps: int, sync=lambda: None) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return time.perf_counter() - t0


def bench_cpu(batch: int, seq: int, steps: int, rounds: int) -> dict:
    cfg = ModelConfig.from_preset("demo", [f"max_seq_len={max(seq, 512)}"])
    torch.manual_seed(0)
    ours = cfg.build()
    hf = _hf_model(cfg, ours)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    models = {"ours": ours, "transformers": hf}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    tokens = batch * seq
    times: dict = {(k, mode): [] for k in models for mode in ("train", "infer")}

    def step(name, mode):
        m = models[name]
        if mode == "train":
            m.train()
            return lambda: _train_step(m, opts[name], ids, labels, name == "transformers")
        m.eval()

        def infer():
            with torch.no_grad():
                out = m(ids)
                return out if name == "ours" else out.logits

        return infer

    for name in models:  # warm-up (allocator, SDPA dispatch)
        for mode in ("train", "infer"):
            _timed(step(name, mode), 2)
    for _ in range(rounds):  # alternate so both see the same machine load
        for mode in ("train", "infer"):
            for name in models:
                times[(name, mode)].append(_timed(step(name, mode), steps) / steps)
    out = {
        "preset": "demo",
        "batch": batch,
        "seq_len": seq,
        "params": cfg.num_params(),
        "threads": torch.get_num_threads(),
        "steps_per_round": steps,
        "rounds": rounds,
    }
    for mode in ("train", "infer"):
        for name in models:
            out[f"{mode}_tokens_per_s_{name}"] = round(
                tokens / statistics.median(times[(name, mode)]), 1
            )
        out[f"{mode}_ratio"] = round(
            out[f"{mode}_tokens_per_s_ours"] / out[f"{mode}_tokens_per_s_transformers"], 3
        )
        # Best round of each: the least disturbed by other tenants of a shared machine.
        out[f"{mode}_ratio_best"] = round(
            min(times[("transformers", mode)]) / min(times[("ours", mode)]), 3
        )
    return out


def bench_gpu(preset: str, batch: int, steps: int) -> dict:
    seq = 2048
    cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    model = cfg.build(device="cuda", dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    labels = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    fn = lambda: _train_step(model, opt, ids, labels, False)
    _timed(fn, 3, torch.cuda.synchronize)
    dt = _timed(fn, steps, torch.cuda.synchronize) / steps
    tps = batch * seq / dt
    name = torch.cuda.get_device_name()
    from megablocks_ablate.train.metrics import gpu_peak_tflops

    tflops = gpu_peak_tflops(name)  # the trainer's table (H100 SXM/PCIe/NVL differ)
    peak = tflops * 1e12 if tflops else None
    return {
        "preset": preset,
        "device": name,
        "batch": batch,
        "seq_len": seq,
        "dtype": "bfloat16",
        "tokens_per_s": round(tps, 1),
        "flops_per_token": cfg.flops_per_token(seq),
        "mfu": round(cfg.flops_per_token(seq) * tps / peak, 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def _real_config(preset: str, batch: int | None, seq: int, overrides):
    from megablocks_ablate.train.config import TrainConfig

    sizes = [f"seq_len={seq}"] + ([f"micro_batch={batch}"] if batch else [])
    # data.manifest: the step is timed on random tokens, no data is read
    return TrainConfig.from_preset(f"{preset}_seed", [*sizes, "data.manifest=unused", *overrides])


def bench_real(preset: str, batch: int | None, steps: int, env, overrides=(), seq=2048) -> dict:
    """A training step the way ``train()`` runs it (see the module doc) on ``env``'s
    device; ``batch`` None: the train preset's micro batch. tokens/s are per rank."""
    from megablocks_ablate.train.divergence import clip_grads_with_norm, total_grad_norm
    from megablocks_ablate.train.optim import build_optimizer
    from megablocks_ablate.train.parallel import computes_in_bf16, wrap_model

    tcfg = _real_config(preset, batch, seq, overrides)
    cfg = ModelConfig.from_preset(tcfg.model, tcfg.model_overrides)
    torch.manual_seed(0)
    dev = env.device
    model = wrap_model(cfg.build(device=dev), tcfg, env)
    opt = build_optimizer(model, tcfg.optimizer, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    bf16 = computes_in_bf16(tcfg.precision, dev.type)
    ids = torch.randint(0, cfg.vocab_size, (tcfg.micro_batch, seq), device=dev)
    model.train()

    def step():
        with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
            loss = model(ids, ids)
            loss.backward()
        clip_grads_with_norm(params, tcfg.grad_clip, total_grad_norm(params))
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _timed(step, 3, sync)
    dt = _timed(step, steps, sync) / steps
    tps = tcfg.micro_batch * seq / dt
    peak = _peak_flops(dev)
    fsdp = hasattr(model, "set_requires_gradient_sync")
    return {
        "preset": preset,
        "train_preset": f"{preset}_seed",
        "overrides": list(overrides),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "ranks": env.world_size,
        "parallel": "fsdp" if fsdp else ("ddp" if env.distributed else "single"),
        "batch": tcfg.micro_batch,
        "seq_len": seq,
        "autocast_bf16": bf16,
        "activation_checkpointing": _unwrapped(model).checkpointing_policy(),
        "tokens_per_s_per_rank": round(tps, 1),
        "mfu": round(cfg.flops_per_token(seq) * tps / peak, 4) if peak else None,
        "peak_memory_gib": (
            round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None
        ),
    }


def _unwrapped(model):
    return getattr(model, "module", model)


def _peak_flops(dev) -> float | None:
    if dev.type != "cuda":
        return None
    from megablocks_ablate.train.metrics import gpu_peak_tflops

    tflops = gpu_peak_tflops(torch.cuda.get_device_name(dev))
    return tflops * 1e12 if tflops else None


def main_real(args) -> int:
    """``--real-path``: the GPU presets (or ``--presets``) through the trainer's path."""
    from megablocks_ablate.train.distributed import distributed_session

    out = args.out.replace(".json", "_real.json")
    check_writable(out, "model_step")
    with distributed_session(args.device) as env:
        rows = [
            bench_real(p, args.real_batch, args.real_steps, env, args.override, args.real_seq)
            for p in args.presets.split(",")
        ]
    if env.is_main:
        res = {"torch": torch.__version__, "path": "real", "gpu": rows}
        write_result(out, "model_step", res, command_line(__file__))
        print(json.dumps(res, indent=2))
    return 0


def _docs_section(res: dict) -> str:
    c = res["cpu"]
    lines = [
        "## Model step",
        "",
        f"`python benchmarks/model_step.py --update-docs` on {res['machine']} "
        f"(torch {res['torch']}, transformers {res['transformers']}, {c['threads']} threads), "
        f"`demo` preset ({c['params']:,} parameters), batch {c['batch']} x {c['seq_len']} tokens, "
        f"fp32, {c['rounds']} alternating rounds of {c['steps_per_round']} steps "
        "(tokens/s: median round; the machine is shared with other jobs, so the best-round ratio is shown too). "
        "transformers runs `CohereForCausalLM` with the same config and weights (SDPA attention).",
        "",
        "| step | ours (tokens/s) | transformers (tokens/s) | ratio (median) | ratio (best rounds) |",
        "|---|---:|---:|---:|---:|",
        f"| train (fwd + bwd + AdamW) | {c['train_tokens_per_s_ours']:,.0f} | "
        f"{c['train_tokens_per_s_transformers']:,.0f} | {c['train_ratio']:.2f}x | {c['train_ratio_best']:.2f}x |",
        f"| inference (no-grad forward) | {c['infer_tokens_per_s_ours']:,.0f} | "
        f"{c['infer_tokens_per_s_transformers']:,.0f} | {c['infer_ratio']:.2f}x | {c['infer_ratio_best']:.2f}x |",
        "",
    ]
    if res.get("gpu"):
        lines += [
            "| GPU preset | device | batch x seq | tokens/s | MFU | peak memory |",
            "|---|---|---|---:|---:|---:|",
        ]
        for g in res["gpu"]:
            mfu = f"{100 * g['mfu']:.1f}%" if g["mfu"] is not None else "n/a"
            lines.append(
                f"| {g['preset']} | {g['device']} | {g['batch']} x {g['seq_len']} | "
                f"{g['tokens_per_s']:,.0f} | {mfu} | {g['peak_memory_gib']} GiB |"
            )
    else:
        lines.append(
            "GPU rows (130m and 1.1b, bf16, sequence 2048, tokens/s and MFU) are produced "
            "when CUDA is present; none was available for this run."
        )
    lines.append("")
    return "\n".join(lines)


def update_docs(section: str, path: str) -> None:
    from docs_section import replace_section

    replace_section(section, path)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "model_step.json"))
    ap.add_argument(
        "--update-docs", action="store_true", help="write the section in docs/benchmarks.md"
    )
    ap.add_argument(
        "--real-path",
        action="store_true",
        help="time the step as train() runs it (autocast, checkpointing policy, FSDP2/DDP "
        "under torchrun); the module doc says what",
    )
    ap.add_argument("--presets", default="130m,1.1b", help="--real-path: model presets")
    ap.add_argument("--real-batch", type=int, default=None, help="default: the train preset's")
    ap.add_argument("--real-steps", type=int, default=10)
    ap.add_argument("--real-seq", type=int, default=2048, help="--real-path: sequence length")
    ap.add_argument("--device", default="auto", help="--real-path: auto, cuda or cpu")
    ap.add_argument("--override", action="append", default=[], help="--real-path: train key=value")
    args = ap.parse_args()
    if args.real_path:
        if args.update_docs:
            ap.error("--update-docs writes the default mode's section; drop --real-path")
        return main_real(args)
    check_writable(args.out, "model_step")

    import transformers

    res = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": bench_cpu(args.batch, args.seq, args.steps, args.rounds),
        "gpu": [],
    }
    if torch.cuda.is_available():
        res["gpu"].append(bench_gpu("130m", 8, 10))
        res["gpu"].append(bench_gpu("1.1b", 4, 10))
    write_result(args.out, "model_step", res, command_line(__file__))
    print(json.dumps(res, indent=2))
    if args.update_docs:
        update_docs(_docs_section(res), os.path.join(ROOT, "docs", "benchmarks.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
