"""End-to-end training throughput vs a plain loop over an in-memory tensor.

    python benchmarks/train_throughput.py [--steps 10] [--rounds 3] [--update-docs]

CPU: the ``demo`` model preset. (a) ``train()``: the real trainer reading a
partition-balanced mixture of every base unit of a preprocessed corpus (packed
samples, blending, per-rank slicing, metrics, progress); (b) a plain loop doing the
same work (same model, AdamW, micro batches, clipping) on batches sliced from one
in-memory tensor. Steady-state tokens/s from step 2 on, in alternating rounds (the
machine is shared), and the data path alone (``mix.batches`` for the same batches)
timed directly. Loader overhead = 1 - (a) / (b); target < 5 %.

With CUDA, also tokens/s and MFU of the trainer for the 130m and 1.1b presets
(bf16, sequence 2048). Writes benchmarks/results/train_throughput.json.

By default those GPU runs use the bare model presets (no activation checkpointing,
DDP), comparable with earlier results. ``--real-path`` runs them from the train
presets as users do (``<model>_seed``: its micro batch, activation-checkpointing
policy and ``distributed.parallel``; launched with 2+ ranks by torchrun, FSDP2 with its
mixed-precision policy for 1.1b, DDP for 130m; ``--override KEY=VALUE`` changes that
config) and skips the CPU comparison; rank 0 writes ``train_throughput_real.json``::

    torchrun --nproc-per-node 8 benchmarks/train_throughput.py --real-path
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("MBA_NO_PROGRESS", "1")

import torch  # noqa: E402

from megablocks_ablate.utils.benchmark_result import (  # noqa: E402
    check_writable,
    command_line,
    write_result,
)

CACHE = os.path.join(HERE, ".cache", "train_throughput")


def make_data(cache: str = CACHE) -> str:
    """A demo-sized corpus, tokenizer and manifest (cached under ``cache``; the GPU
    suite, benchmarks/gpu/train_step.py, passes its own scratch directory)."""
    from megablocks_ablate.corpora.synthetic import write_corpus
    from megablocks_ablate.data.preprocess import PreprocessConfig, run_preprocess
    from megablocks_ablate.data.tokenizer import train_sentencepiece

    data = os.path.join(cache, "data")
    if os.path.exists(os.path.join(data, "manifest.json")):
        return data
    os.makedirs(cache, exist_ok=True)
    corpus = os.path.join(cache, "corpus.jsonl")
    write_corpus(corpus, n_docs=2000, seed=0)
    tok = os.path.join(cache, "tok")
    train_sentencepiece([corpus], tok, vocab_size=1024, num_threads=2)  # the demo vocabulary
    run_preprocess(
        PreprocessConfig.from_dict(
            dict(
                input=[corpus],
                out=data,
                tokenizer=tok + ".model",
                partition_by=["fos"],
                order_by="year",
                unit_tokens=20000,
                heldout_fraction=0.0,
                workers=1,
            )
        )
    )
    return data


def config(
    data: str, out: str, steps: int, model: str, seq_len: int, batch: int, micro: int, device: str
):
    from megablocks_ablate.train.config import TrainConfig

    return TrainConfig.load(
        None,
        [
            "kind=seq",
            f"model={model}",
            f"out_dir={out}",
            f"data.manifest={data}",
            "data.mixture=['*']",
            f"seq_len={seq_len}",
            f"global_batch_tokens={seq_len * batch}",
            f"micro_batch={micro}",
            f"train_tokens={seq_len * batch * steps}",
            "schedule.warmup_steps=1",
            f"device={device}",
            "logging.every=1",
            "logging.progress=false",
            "logging.tensorboard=false",
            "checkpoint.every=0",
            "checkpoint.resume=never",
        ],
    )


def steady_tps(elapsed: list[float], tokens_per_step: int, skip: int = 2) -> float:
    """tokens/s between the end of step ``skip`` and the last step."""
    return tokens_per_step * (len(elapsed) - skip) / (elapsed[-1] - elapsed[skip - 1])


def run_trainer(cfg) -> float:
    from megablocks_ablate.train.trainer import train

    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    train(cfg)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        elapsed = [json.loads(line)["elapsed_s"] for line in f]
    return steady_tps(elapsed, cfg.global_batch_tokens)


def run_plain(cfg, tokens: torch.Tensor, device: torch.device) -> float:
    """The same optimisation from an in-memory [samples, seq_len + 1] tensor."""
    from megablocks_ablate.model.config import ModelConfig
    from megablocks_ablate.train.optim import build_optimizer, lr_at, set_lr

    torch.manual_seed(cfg.seed)
    model = ModelConfig.from_preset(cfg.model).build(device=device)
    opt = build_optimizer(model, cfg.optimizer, device)
    accum, bf16 = cfg.grad_accum_steps(1), device.type == "cuda"
    tokens = tokens.to(device)
    elapsed, t0 = [], time.perf_counter()
    for step in range(cfg.train_steps):
        set_lr(opt, lr_at(step, cfg))
        loss_sum = torch.zeros((), device=device)
        for m in range(accum):
            start = (step * accum + m) * cfg.micro_batch
            batch = tokens[start : start + cfg.micro_batch]
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                loss = model(batch[:, :-1], batch[:, 1:])
                (loss / accum).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum.item()  # the trainer syncs on the logged loss every step too
        elapsed.append(time.perf_counter() - t0)
    return steady_tps(elapsed, cfg.global_batch_tokens)


def loader_seconds_per_step(cfg) -> float:
    """The data path alone: blended packed samples -> int64 tensors, per global batch."""
    from megablocks_ablate.train.data import build_mixture

    mix, _, _ = build_mixture(cfg)
    t0 = time.perf_counter()
    n = 0
    for batch in mix.batches(cfg.global_batch, micro_batch=cfg.micro_batch):
        torch.from_numpy(batch)
        n += 1
    return (time.perf_counter() - t0) / (n / cfg.grad_accum_steps(1))


def cpu_benchmark(steps: int, rounds: int) -> dict:
    data = make_data()
    seq_len, batch, micro = 256, 8, 8
    cfg = config(data, os.path.join(CACHE, "run"), steps, "demo", seq_len, batch, micro, "cpu")
    from megablocks_ablate.train.data import build_mixture

    mix, _, _ = build_mixture(cfg)
    tokens = torch.from_numpy(mix.batches(cfg.train_samples).__next__().copy())
    trainer, plain = [], []
    for _ in range(rounds):
        plain.append(run_plain(cfg, tokens, torch.device("cpu")))
        trainer.append(run_trainer(cfg))
    loader_s = loader_seconds_per_step(cfg)
    ratios = [t / p for t, p in zip(trainer, plain)]
    step_s = cfg.global_batch_tokens / statistics.median(plain)
    return {
        "preset": "demo",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "seq_len": seq_len,
        "global_batch": batch,
        "micro_batch": micro,
        "steps": steps,
        "rounds": rounds,
        "trainer_tokens_per_s": [round(x, 1) for x in trainer],
        "plain_tokens_per_s": [round(x, 1) for x in plain],
        "trainer_median": round(statistics.median(trainer), 1),
        "plain_median": round(statistics.median(plain), 1),
        "overhead_median_ratio": round(1 - statistics.median(ratios), 4),
        "overhead_best_round": round(1 - max(ratios), 4),
        "loader_ms_per_step": round(loader_s * 1e3, 3),
        "loader_share_of_step": round(loader_s / step_s, 5),
    }


def gpu_benchmark(steps: int) -> list[dict]:
    out = []
    for preset, micro in (("130m", 16), ("1.1b", 8)):
        data = make_data()
        cfg = config(
            data, os.path.join(CACHE, f"run-{preset}"), steps, preset, 2048, micro, micro, "cuda"
        )
        run_trainer(cfg)
        with open(os.path.join(cfg.out_dir, "metrics.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][2:]
        out.append(
            {
                "preset": preset,
                "device": torch.cuda.get_device_name(),
                "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows), 1),
                "mfu": statistics.median(r["mfu"] for r in rows) if rows[0]["mfu"] else None,
            }
        )
    return out


def real_path_benchmark(presets: list[str], steps: int, overrides: list[str], device: str):
    """The trainer from the ``<model>_seed`` train presets (see the module doc): one
    optimizer step of ``micro_batch x ranks`` sequences each. Rank 0's list of results
    (other ranks: None)."""
    import torch.distributed as dist

    from megablocks_ablate.train.config import TrainConfig
    from megablocks_ablate.train.distributed import init_distributed
    from megablocks_ablate.train.trainer import train

    env = init_distributed(device)  # the trainer's session reuses this group
    data = make_data() if env.is_main else None
    if env.distributed:
        box = [data]
        dist.broadcast_object_list(box)
        data = box[0]
    out = []
    for model in presets:
        preset = TrainConfig.from_preset(f"{model}_seed", overrides)
        tokens = preset.seq_len * preset.micro_batch * env.world_size
        run_dir = os.path.join(CACHE, f"real-{model}")
        cfg = TrainConfig.from_preset(
            f"{model}_seed",
            [
                *overrides,
                f"out_dir={run_dir}",
                f"data.manifest={data}",
                f"global_batch_tokens={tokens}",
                f"train_tokens={tokens * steps}",
                f"device={env.device.type}",
                "logging.every=1",
                "logging.progress=false",
                "logging.tensorboard=false",
                "checkpoint.every=0",
                "checkpoint.resume=never",
                "checkpoint.final_optimizer=false",
            ],
        )
        if env.is_main:  # a finished run there would make every rank skip training
            shutil.rmtree(run_dir, ignore_errors=True)
        if env.distributed:
            dist.barrier()
        train(cfg)
        if env.is_main:
            out.append(_real_row(cfg, env))
            shutil.rmtree(run_dir, ignore_errors=True)  # final weights: 4.4 GB for 1.1b
    if env.distributed:
        dist.destroy_process_group()
    return out if env.is_main else None


def _real_row(cfg, env) -> dict:
    from megablocks_ablate.model.config import ModelConfig
    from megablocks_ablate.train.parallel import resolve_checkpointing

    mcfg = ModelConfig.from_preset(cfg.model, cfg.model_overrides)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    tps = steady_tps([r["elapsed_s"] for r in records], cfg.global_batch_tokens)
    rows = records[2:]
    mfus = [r["mfu"] for r in rows if r.get("mfu") is not None]
    return {
        "preset": f"{cfg.model}_seed",
        "device": torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu",
        "ranks": env.world_size,
        "parallel": cfg.distributed.parallel if env.distributed else "single",
        "micro_batch": cfg.micro_batch,
        "activation_checkpointing": resolve_checkpointing(
            cfg.activation_checkpointing, mcfg.activation_checkpointing
        ),
        "tokens_per_s": round(tps, 1),  # all ranks together
        "tokens_per_s_per_rank": round(tps / env.world_size, 1),
        "mfu": statistics.median(mfus) if mfus else None,
    }


def update_docs(result: dict, command: str) -> None:
    c = result["cpu"]
    lines = [
        "",
        "## Training throughput",
        "",
        f"`{command}` on {platform.machine()} {os.cpu_count()} cores (torch {torch.__version__}, "
        f"{c['threads']} threads), `demo` preset, sequence {c['seq_len']}, global batch "
        f"{c['global_batch']} x micro {c['micro_batch']}, fp32, {c['steps']} steps per run "
        f"(steady state from step 2), {c['rounds']} alternating rounds. The trainer reads a "
        "partition-balanced mixture of every base unit (packed samples, blending, DP slicing, "
        "metrics); the plain loop slices one in-memory tensor. The machine is shared with other "
        "jobs, so the data path is also timed alone.",
        "",
        "| loop | tokens/s (median) | per round |",
        "|---|---:|---|",
        f"| trainer (`train()`, data loading included) | {c['trainer_median']:,.0f} | "
        f"{', '.join(f'{x:,.0f}' for x in c['trainer_tokens_per_s'])} |",
        f"| plain loop, in-memory tensor | {c['plain_median']:,.0f} | "
        f"{', '.join(f'{x:,.0f}' for x in c['plain_tokens_per_s'])} |",
        "",
        f"Overhead of the trainer over the plain loop: {100 * c['overhead_median_ratio']:.1f} % "
        f"(median of per-round ratios; {100 * c['overhead_best_round']:.1f} % in the best round). "
        f"The data path alone costs {c['loader_ms_per_step']:.2f} ms per step, "
        f"{100 * c['loader_share_of_step']:.2f} % of a step (target < 5 %).",
    ]
    runs = c["trainer_tokens_per_s"] + c["plain_tokens_per_s"]
    spread = max(runs) / min(runs)
    if spread > 1.2:  # other jobs on the machine: the ratio measures them, not the loader
        lines[-1] += (
            f" Runs of the same loop varied {spread:.1f}x between rounds here, far more "
            "than the effect sought, so the end-to-end ratio is noise on this machine "
            "and the direct timing of the data path is the figure to trust."
        )
    if result.get("gpu"):
        lines += ["", "| preset | device | tokens/s | MFU |", "|---|---|---:|---:|"]
        lines += [
            f"| {g['preset']} | {g['device']} | {g['tokens_per_s']:,.0f} | {g['mfu']} |"
            for g in result["gpu"]
        ]
    else:
        lines += [
            "",
            "GPU rows (130m and 1.1b, bf16, sequence 2048: tokens/s and MFU) are produced "
            "when CUDA is present; none was available for this run.",
        ]
    from docs_section import replace_section

    replace_section("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--update-docs", action="store_true", help="write the section in docs/benchmarks.md"
    )
    ap.add_argument(
        "--real-path",
        action="store_true",
        help="GPU runs from the train presets as users run them (see the module doc)",
    )
    ap.add_argument("--presets", default="130m,1.1b", help="--real-path: model names")
    ap.add_argument("--device", default="auto", help="--real-path: auto, cuda or cpu")
    ap.add_argument("--override", action="append", default=[], help="--real-path: key=value")
    args = ap.parse_args()
    if args.steps < 3:  # steady state is timed from the end of step 2 (steady_tps)
        ap.error(f"--steps: at least 3 (the first 2 are warm-up), got {args.steps}")
    name = "train_throughput_real.json" if args.real_path else "train_throughput.json"
    path = os.path.join(HERE, "results", name)
    check_writable(path, "train_throughput")
    if args.real_path:
        if args.update_docs:
            ap.error("--update-docs writes the default mode's section; drop --real-path")
        rows = real_path_benchmark(args.presets.split(","), args.steps, args.override, args.device)
        if rows is not None:
            write_result(
                path, "train_throughput", {"path": "real", "gpu": rows}, command_line(__file__)
            )
            print(json.dumps(rows, indent=2))
        return
    result = {"cpu": cpu_benchmark(args.steps, args.rounds)}
    if torch.cuda.is_available():
        result["gpu"] = gpu_benchmark(args.steps)
    write_result(path, "train_throughput", result, command_line(__file__))
    print(json.dumps(result, indent=2))
    if args.update_docs:
        update_docs(result, command_line(__file__))


if __name__ == "__main__":
    main()
