"""Rows ``train_130m`` / ``train_1.1b``: training tokens/s and MFU through the real trainer.

``train()`` (megablocks_ablate/train/trainer.py) on one GPU, from the seed preset
(``130m_seed``, ``1.1b_seed``) as it is: sequence 2048, its micro batch, bf16
autocast (precision auto on CUDA), its activation-checkpointing policy, Triton
kernels (MBA_KERNELS auto), flash-attn when importable else SDPA. A preset with
``distributed.parallel: fsdp`` (1.1b) runs inside a one-rank process group, so the
trainer takes the FSDP2 path an N-GPU run takes (its MixedPrecisionPolicy: bf16
all-gathers and compute, fp32 master weights and reduction), unsharded; the group
is NCCL with ``device_id`` = ``cuda:<LOCAL_RANK>`` (:func:`one_rank_group_kwargs`). Only the run's
length changes: ``--accum`` micro batches per optimizer step (the preset's global batch
of 1024 sequences would make one step take a minute) and ``--steps`` steps, on the demo
corpus of ``benchmarks/train_throughput.py`` (packed, blended and repeated as the
trainer does). Figures are the median of the per-step metrics records after ``--skip``
warm-up steps; an optimizer step every ``--accum`` micro batches makes them a slight
lower bound of a full-batch run's. MFU = flops_per_token * tokens/s / peak bf16
FLOP/s of the device (megablocks_ablate/train/metrics.py).

``--override KEY=VALUE`` (repeatable) changes the train config of every run of the row;
``--variant NAME:KEY=VALUE[;KEY=VALUE...]`` (repeatable) adds a run with those
overrides on top, reported under ``details.variants.NAME`` beside the row's own figures
(tokens/s, MFU, peak memory), e.g. ``--variant ac_full:activation_checkpointing=full``
or ``--variant fsdp_fp32:distributed.fsdp_param_dtype=fp32`` (the path before the
mixed-precision policy) to measure with and without each setting. An item
``MBA_*=VALUE`` sets the environment for that run instead (``--variant
sdpa:MBA_ATTENTION=sdpa``, ``--variant ce_legacy:MBA_CE_CHUNKS=legacy``; ``--env`` for
every run of the row).

``--baseline-row NAME`` (row ``train_1.1b_mb8``: ``1.1b_seed_mb8`` at one micro batch
of 8 per step, against ``train_1.1b``'s micro batch of 4 x 2, the same tokens per
optimizer step) reads that row's figures from this suite run's ``rows/NAME.json``;
when it is missing or did not finish ok, ``--baseline-variant`` is run here instead.
The target is then tokens/s at least the default's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile

from common import local_rank, meets, parser, process_group_args, run_row, target


def _attention_impl(device) -> str:
    """What attention the run's bf16 blocks take (dispatch.resolve_attention), and why."""
    import torch

    from megablocks_ablate.kernels import dispatch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = dispatch.resolve_attention(device, dtype)
    if name == "flash2":
        import flash_attn

        name = f"flash-attn {flash_attn.__version__}"
    return f"{name} (MBA_ATTENTION={dispatch.configured_attention()})"


ENV_PREFIX = "MBA_"  # a variant item KEY=VALUE with such a KEY sets the environment


def _split_env(items: list[str]) -> tuple[dict[str, str], list[str]]:
    """``MBA_*=VALUE`` items (environment: MBA_ATTENTION, MBA_CE_CHUNKS, MBA_KERNELS) apart
    from train config overrides."""
    env, rest = {}, []
    for item in items:
        k, _, v = item.partition("=")
        if k.strip().startswith(ENV_PREFIX):
            env[k.strip()] = v.strip()
        else:
            rest.append(item)
    return env, rest


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """Set ``env`` for one run; the kernel and attention switches re-read it."""
    from megablocks_ablate.kernels import dispatch

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dispatch.set_backend(None)
    dispatch.set_attention_backend(None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        dispatch.set_backend(None)
        dispatch.set_attention_backend(None)


def one_rank_group_kwargs(dev, port: int) -> dict:
    """``init_process_group`` arguments of the one-rank group around an FSDP2 run on
    ``dev``: NCCL with ``device_id`` = the indexed CUDA device, or gloo on CPU."""
    index = dev.index if dev.index is not None else local_rank()
    pg = process_group_args(dev.type, index)
    return pg.init_kwargs(rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")


@contextlib.contextmanager
def _one_rank_group(cfg, dev):
    """A one-rank process group when ``cfg`` is FSDP2 (the trainer shards only inside a
    group); nothing otherwise. A group that already exists is left alone."""
    import torch.distributed as dist

    if cfg.distributed.parallel != "fsdp" or dist.is_initialized():
        yield False
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(**one_rank_group_kwargs(dev, port))
    try:
        yield True
    finally:
        dist.destroy_process_group()


def _variants(specs: list[str]) -> dict[str, list[str]]:
    """``NAME:KEY=VALUE[;KEY=VALUE...]`` -> {NAME: [KEY=VALUE, ...]}."""
    out = {}
    for spec in specs:
        name, sep, rest = spec.partition(":")
        items = [x.strip() for x in rest.split(";") if x.strip()]
        if not sep or not name or not items or any("=" not in x for x in items):
            raise SystemExit(f"--variant {spec!r}: expected NAME:KEY=VALUE[;KEY=VALUE...]")
        out[name] = items
    return out


def _row_config(args, data: str, run_dir: str, extra: list[str], steps: int):
    """The preset with the row's sizes, ``--override`` and then ``extra``."""
    from megablocks_ablate.train.config import TrainConfig

    preset = TrainConfig.from_preset(args.preset, args.override)
    seq = args.seq_len or preset.seq_len
    micro = args.micro_batch or preset.micro_batch
    step_tokens = seq * micro * args.accum
    model_overrides = list(preset.model_overrides) + list(args.model_override)
    return TrainConfig.from_preset(
        args.preset,
        [
            *args.override,
            f"out_dir={run_dir}",
            f"data.manifest={data}",
            f"seq_len={seq}",
            f"micro_batch={micro}",
            f"global_batch_tokens={step_tokens}",
            f"train_tokens={step_tokens * steps}",
            f"device={torch_device(args).type}",
            f"model_overrides=[{', '.join(model_overrides)}]",
            "logging.every=1",
            "logging.progress=false",
            "logging.tensorboard=false",
            "checkpoint.every=0",
            "checkpoint.resume=never",
            "checkpoint.final_optimizer=false",
            *extra,
        ],
    )


def torch_device(args):
    import torch

    return torch.device(args.device)


def _fsdp_dtypes(cfg, dev) -> dict:
    from megablocks_ablate.train.parallel import fsdp_dtypes

    d = cfg.distributed
    names = fsdp_dtypes(cfg.precision, dev.type, d.fsdp_param_dtype, d.fsdp_reduce_dtype)
    return dict(zip(("param_dtype", "reduce_dtype"), names))


def _train_once(args, data: str, workdir: str, extra: list[str], steps: int) -> dict:
    """One ``train()`` run of the row's preset with ``extra`` overrides; its figures."""
    import torch

    from megablocks_ablate.model.config import ModelConfig
    from megablocks_ablate.train.parallel import resolve_checkpointing
    from megablocks_ablate.train.trainer import train

    dev = torch_device(args)
    run_dir = os.path.join(workdir, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    env, config_items = _split_env([*args.env, *extra])
    cfg = _row_config(args, data, run_dir, config_items, steps)
    mcfg = ModelConfig.from_preset(cfg.model, cfg.model_overrides)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    with _environment(env), _one_rank_group(cfg, dev) as fsdp:
        attention = _attention_impl(dev)
        train(cfg)
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    shutil.rmtree(run_dir, ignore_errors=True)  # the final weights (4.4 GB for 1.1b)
    steady = records[args.skip :] or records[-1:]
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    policy = resolve_checkpointing(cfg.activation_checkpointing, mcfg.activation_checkpointing)
    peak_mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {
        "overrides": list(extra),
        "env": env,
        "attention": attention,
        "cfg": cfg,
        "mcfg": mcfg,
        "seq_len": cfg.seq_len,
        "micro_batch": cfg.micro_batch,
        "steps": steps,
        "steady_steps": len(steady),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in steady), 1),
        "mfu": statistics.median(mfus) if mfus else None,
        "tflops_per_device": statistics.median(r["tflops_per_device"] for r in steady),
        "activation_checkpointing_policy": policy,
        "activation_checkpointing": policy != "none",  # report.py's on/off column
        "fsdp": _fsdp_dtypes(cfg, dev) if fsdp else None,  # None: not the FSDP2 path
        "peak_memory_gib": round(peak_mem, 2) if peak_mem is not None else None,
        "per_step_tokens_per_s": [r["tokens_per_s"] for r in records],
        "final_loss": records[-1].get("loss"),
    }


def _summary(run: dict) -> dict:
    keys = (
        "overrides",
        "micro_batch",
        "attention",
        "tokens_per_s",
        "mfu",
        "peak_memory_gib",
        "activation_checkpointing_policy",
    )
    return {k: run[k] for k in (*keys, "fsdp", "steady_steps", "final_loss")}


def baseline_from_row(out_path: str, name: str, dry_run: bool) -> dict | None:
    """The figures of row ``name`` of this suite run (``rows/<name>.json`` beside this
    row's JSON) when it finished ok in the same mode; else None."""
    path = os.path.join(os.path.dirname(os.path.abspath(out_path)), f"{name}.json")
    try:
        with open(path, encoding="utf-8") as f:
            row = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    d = row.get("details") or {}
    if row.get("status") != "ok" or row.get("dry_run") != dry_run or "tokens_per_s" not in d:
        return None
    keys = ("micro_batch", "grad_accum", "attention", "tokens_per_s", "mfu", "peak_memory_gib")
    return {"source": f"row {name}", **{k: d.get(k) for k in keys}}


def _baseline(args, data: str, workdir: str) -> dict | None:
    """The default this row's switch is measured against: row ``--baseline-row`` of this
    suite run, else ``--baseline-variant`` run here (None when neither is given)."""
    if not args.baseline_row and not args.baseline_variant:
        return None
    found = (
        baseline_from_row(args.out, args.baseline_row, args.dry_run) if args.baseline_row else None
    )
    if found is not None or not args.baseline_variant:
        return found
    ((name, items),) = _variants([args.baseline_variant]).items()
    run = _train_once(args, data, workdir, items, args.variant_steps or args.steps)
    return {"source": f"variant {name}", "grad_accum": None, **_summary(run)}


def body(args) -> dict:
    import torch
    from train_throughput import make_data  # benchmarks/train_throughput.py

    from megablocks_ablate.kernels import dispatch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dev = torch.device(args.device)
    variants = _variants(args.variant)
    workdir = args.workdir or tempfile.mkdtemp(prefix="mba-train-step-")
    data = make_data(args.data_cache or os.path.join(workdir, "data-cache"))
    run = _train_once(args, data, workdir, [], args.steps)
    extra_runs = {
        name: _summary(_train_once(args, data, workdir, items, args.variant_steps or args.steps))
        for name, items in variants.items()
    }
    cfg, mcfg, tps, mfu = run["cfg"], run["mcfg"], run["tokens_per_s"], run["mfu"]
    tgt = (
        target(f"MFU >= {args.target_mfu:.0%}", ">=", args.target_mfu) if args.target_mfu else None
    )
    text = f"{tps:,.0f} tokens/s" + (f", MFU {mfu:.1%}" if mfu is not None else ", MFU n/a")
    details = {
        "preset": args.preset,
        "model": cfg.model,
        "params": mcfg.num_params(),
        "overrides": list(args.override),
        "grad_accum": args.accum,
        "flops_per_token": mcfg.flops_per_token(run["seq_len"]),
        "precision": "bf16 autocast" if dev.type == "cuda" else cfg.precision,
        "compile": mcfg.compile,
        "kernels": (
            "triton"
            if dev.type == "cuda"
            and dispatch.triton_available()
            and dispatch.configured_backend() != "reference"
            else "reference"
        ),
        **{k: v for k, v in run.items() if k not in ("cfg", "mcfg", "overrides")},
    }
    if extra_runs:
        details["variants"] = extra_runs
        ratios = {
            name: r["tokens_per_s"] / tps
            for name, r in extra_runs.items()
            if r.get("tokens_per_s") and tps
        }
        details["variant_speedups"] = ratios
        if ratios:
            text += "; " + ", ".join(f"{n} {x:.2f}x" for n, x in ratios.items())
    met = meets(mfu, tgt) if tgt else None
    base = _baseline(args, data, workdir)
    if base is not None:  # the switch against the default, same suite run
        speedup = tps / base["tokens_per_s"] if base.get("tokens_per_s") else None
        details["baseline"] = base
        details["speedup_vs_baseline"] = speedup
        if speedup is not None:
            mb = base.get("micro_batch")
            shown = f" (micro batch {mb})" if mb is not None and mb != cfg.micro_batch else ""
            text += f"; {speedup:.2f}x {base['source']}{shown}"
        tgt = target(f"tokens/s >= the default's ({base['source']})", ">=", 1.0)
        met = meets(speedup, tgt)
    return {
        "key": {"name": "tokens_per_s", "value": tps, "unit": "tokens/s", "text": text},
        "target": tgt,
        "met": met,
        "details": details,
    }


if __name__ == "__main__":
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="train", help="the row's name")
    ap.add_argument("--preset", default="130m_seed", help="train preset (configs/train/)")
    ap.add_argument("--model-override", action="append", default=[], help="key=value, repeatable")
    ap.add_argument(
        "--override", action="append", default=[], help="train config key=value, repeatable"
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:KEY=VALUE[;KEY=VALUE...]: an extra run with these train overrides",
    )
    ap.add_argument("--variant-steps", type=int, default=None, help="default: --steps")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the preset's")
    ap.add_argument("--accum", type=int, default=2, help="micro batches per optimizer step")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the figures")
    ap.add_argument("--target-mfu", type=float, default=None)
    ap.add_argument("--data-cache", default=None, help="corpus/tokenizer/manifest cache dir")
    ap.add_argument(
        "--env", action="append", default=[], help="MBA_*=VALUE for every run of the row"
    )
    ap.add_argument(
        "--baseline-row", default=None, help="compare with this row's figures (same suite run)"
    )
    ap.add_argument(
        "--baseline-variant",
        default=None,
        help="NAME:KEY=VALUE[;...]: run this as the default when --baseline-row has none",
    )
    known, _ = ap.parse_known_args()
    sys.exit(run_row(known.name, ap, body))
