"""How far a merge from bf16 pool rows is from the fp32 merge: plain rows vs delta rows.

    python benchmarks/pool_delta_error.py [--models demo,130m] [--rel-std 1e-3,1e-2]
        [--trained demo] [--checkpoints SEED UNIT [UNIT ...]]
        [--json benchmarks/results/pool_delta_error.json]

Per model shape (configs/model/<name>.yaml): the seed is the model's own
initialisation, and the unit models are the seed plus

* ``gauss <s>``: Gaussian noise of ``s`` x each tensor's std (``--rel-std``), or
* ``trained``: a few AdamW steps each (``--trained``, for the shapes named; the seed
  itself first trained ``--seed-steps`` on a shared token distribution, each unit then
  ``--unit-steps`` on its own), or
* real checkpoints (``--checkpoints``: a seed and the units that continue it).

The seed is also a row (as the scaled merge has it). Each case goes through
``open_pool`` three times, with fp32, ``bf16-plain`` and ``bf16-delta`` rows, and merges
the same weight vectors (2, 3 and 4 units, an unnormalised mixture, and a scaled merge
seed + 2 x (merge - seed)); the fp32 pool's merge is the reference. Reported: the worst
max-abs error and relative RMS error (||merge - ref|| / ||ref||) over the merges, and
the units' relative distance from the seed (what sets the gain: a delta row rounds only
the difference). CPU only; the 130m shape needs about 5 GB of memory and 3 GB of
temporary disk.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time

import torch

from megablocks_ablate.checkpoint import Lineage, model_hash, save_model_checkpoint
from megablocks_ablate.merge.pool_placement import PoolRequest, open_pool
from megablocks_ablate.model.config import ModelConfig
from megablocks_ablate.utils.benchmark_result import check_writable, command_line, write_result

FORMATS = ("fp32", "bf16-plain", "bf16-delta")
SEED_ROW = "seed"


def merges(units: list[str]) -> dict[str, dict[str, float]]:
    """The weight vectors every case merges (units and the seed row)."""
    n = len(units)
    out = {
        "2 units": {u: 0.5 for u in units[:2]},
        "3 units": {u: 1 / 3 for u in units[:3]},
        f"{n} units": {u: 1 / n for u in units},
        f"{n} units, weights sum {0.2 * n * (n + 1) / 2:g}": {
            u: 0.2 * (i + 1) for i, u in enumerate(units)
        },
        "scaled lambda 2": {**{u: 1.0 for u in units[:2]}, SEED_ROW: -1.0},
    }
    return {k: v for k, v in out.items() if all(u in units or u == SEED_ROW for u in v)}


# --------------------------------------------------------------------------- unit models


def _float_items(sd: dict[str, torch.Tensor]):
    return [(k, v) for k, v in sd.items() if v.is_floating_point()]


def gaussian_units(seed_sd, n: int, rel_std: float) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        sd = dict(seed_sd)
        for k, v in _float_items(seed_sd):
            std = float(v.std()) if v.numel() > 1 else 0.0
            std = std or float(v.abs().mean()) or 1.0  # constant tensors (norm weights)
            sd[k] = v + rel_std * std * torch.randn(v.shape, generator=g)
        out.append(sd)
    return out


def _steps(model, steps: int, lr: float, probs: torch.Tensor, gen: torch.Generator) -> None:
    """AdamW steps (betas 0.9/0.95, weight decay 0.1, as the presets) on token sequences
    drawn from ``probs``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(steps):
        ids = torch.multinomial(probs, 8 * 65, replacement=True, generator=gen).view(8, 65)
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _zipf(vocab: int, gen: torch.Generator) -> torch.Tensor:
    ranks = torch.randperm(vocab, generator=gen).float() + 1
    return 1.0 / ranks


def trained_models(cfg: ModelConfig, n: int, seed_steps: int, unit_steps: int, lr: float):
    """(seed state dict, unit state dicts): the seed trained ``seed_steps`` from its
    initialisation, each unit ``unit_steps`` more on its own token distribution."""
    torch.manual_seed(0)
    model = cfg.build()
    gen = torch.Generator().manual_seed(0)
    _steps(model, seed_steps, lr, _zipf(cfg.vocab_size, gen), gen)
    seed_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    units = []
    for i in range(n):
        model.load_state_dict(seed_sd)
        g = torch.Generator().manual_seed(100 + i)
        _steps(model, unit_steps, lr, _zipf(cfg.vocab_size, g), g)
        units.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return seed_sd, units


# --------------------------------------------------------------------------- measuring


def write_case(work: str, config: dict, seed_sd, unit_sds) -> tuple[str, dict[str, str]]:
    """Seed and unit checkpoints (fp32, as the trainer writes them) under ``work``."""
    seed_dir = os.path.join(work, "seed")
    save_model_checkpoint(seed_dir, seed_sd, config, Lineage(kind="seed"))
    seed_hash = model_hash(seed_dir)
    ckpts = {}
    for i, sd in enumerate(unit_sds):
        d = os.path.join(work, f"u{i}")
        save_model_checkpoint(
            d, sd, config, Lineage(kind="unit", seed_hash=seed_hash, parents=[seed_dir])
        )
        ckpts[f"u{i}"] = d
    return seed_dir, ckpts


def relative_distance(ckpts: dict[str, str], seed_dir: str) -> float:
    """RMS over the units of ||unit - seed|| / ||seed|| (all float tensors)."""
    from megablocks_ablate.checkpoint import load_model_checkpoint

    seed = load_model_checkpoint(seed_dir)[0]
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for _, v in _float_items(seed)))
    rel = []
    for d in ckpts.values():
        sd = load_model_checkpoint(d)[0]
        diff = sum(float((sd[k].double() - v.double()).pow(2).sum()) for k, v in _float_items(seed))
        rel.append(math.sqrt(diff) / norm)
    return math.sqrt(sum(r * r for r in rel) / len(rel))


def measure(seed_dir: str, ckpts: dict[str, str], config: dict) -> dict:
    """Per row format and merge: max-abs and relative RMS error against the fp32 merge."""
    rows = {**ckpts, SEED_ROW: seed_dir}
    weights = merges(list(ckpts))
    live = ModelConfig.from_dict(config).build()
    refs: dict[str, torch.Tensor] = {}
    out: dict = {"merges": {m: {} for m in weights}, "formats": {}}
    for fmt in FORMATS:
        t0 = time.perf_counter()
        pool, choice = open_pool(
            rows, PoolRequest("resident", fmt), seed_dir=seed_dir, show_progress=False
        )
        out["formats"][fmt] = {
            "row_format": pool.row_format,
            "bytes": choice.size.total_bytes,
            "load_s": round(time.perf_counter() - t0, 2),
        }
        flat = pool.bind(live)
        for name, w in weights.items():
            pool.merge_into(live, w)
            if fmt == "fp32":
                refs[name] = flat.clone()
                continue
            ref = refs[name]
            err = (flat - ref).double()
            out["merges"][name][fmt] = {
                "max_abs": float(err.abs().max()),
                "rel_rms": float(err.norm() / ref.double().norm()),
            }
        pool.close()
        del pool, flat  # the rows go before the next format's are loaded
        live = ModelConfig.from_dict(config).build()  # not bound to that pool's buffer
    for fmt in FORMATS[1:]:
        per = [m[fmt] for m in out["merges"].values()]
        out["formats"][fmt]["max_abs"] = max(p["max_abs"] for p in per)
        out["formats"][fmt]["rel_rms"] = max(p["rel_rms"] for p in per)
    return out


def run_case(label: str, work: str, config: dict, seed_sd, unit_sds) -> dict:
    case_dir = tempfile.mkdtemp(prefix="case-", dir=work)
    try:
        seed_dir, ckpts = write_case(case_dir, config, seed_sd, unit_sds)
        del seed_sd, unit_sds
        res = measure(seed_dir, ckpts, config)
        res["rel_distance"] = relative_distance(ckpts, seed_dir)
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)
    res["case"] = label
    return res


def checkpoint_case(seed_dir: str, units: list[str]) -> dict:
    from megablocks_ablate.checkpoint import read_checkpoint_meta

    ckpts = {f"u{i}": d for i, d in enumerate(units)}
    res = measure(seed_dir, ckpts, read_checkpoint_meta(seed_dir)[0])
    res["rel_distance"] = relative_distance(ckpts, seed_dir)
    res["case"] = f"checkpoints {seed_dir}"
    return res


# --------------------------------------------------------------------------- output


def table(results: list[dict]) -> list[str]:
    lines = [
        "| model | units | distance from seed (rel.) | max abs: bf16-plain | bf16-delta | "
        "rel. RMS: bf16-plain | bf16-delta | plain / delta (max abs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p, d = r["formats"]["bf16-plain"], r["formats"]["bf16-delta"]
        ratio = p["max_abs"] / d["max_abs"] if d["max_abs"] else math.inf
        lines.append(
            f"| {r['model']} | {r['case']} | {r['rel_distance']:.2e} | {p['max_abs']:.2e} | "
            f"{d['max_abs']:.2e} | {p['rel_rms']:.2e} | {d['rel_rms']:.2e} | {ratio:.0f}x |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="demo,130m", help="model presets (configs/model)")
    ap.add_argument("--units", type=int, default=4, help="unit models per case (2-4 merged)")
    ap.add_argument("--rel-std", default="1e-3,1e-2", help="Gaussian deltas, x tensor std")
    ap.add_argument("--trained", default="demo", help="presets to also train units of")
    ap.add_argument("--seed-steps", type=int, default=30)
    ap.add_argument("--unit-steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW lr of --trained")
    ap.add_argument("--checkpoints", nargs="+", metavar="DIR", help="SEED UNIT [UNIT ...]")
    ap.add_argument("--work", default=None, help="temporary checkpoints (default: temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.json:
        check_writable(args.json, "pool_delta_error")
    if args.units < 2:
        raise SystemExit("error: --units must be at least 2")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = tempfile.mkdtemp(prefix="pool-delta-", dir=args.work)
    results = []
    try:
        for name in [m for m in args.models.split(",") if m]:
            cfg = ModelConfig.from_preset(name)
            torch.manual_seed(0)
            seed_sd = {k: v.detach().clone() for k, v in cfg.build().state_dict().items()}
            for s in [float(x) for x in args.rel_std.split(",") if x]:
                units = gaussian_units(seed_sd, args.units, s)
                r = run_case(f"gauss {s:g}", work, cfg.to_dict(), seed_sd, units)
                del units
                results.append({"model": name, **r})
                print(table([results[-1]])[-1], flush=True)
            del seed_sd
            if name in args.trained.split(","):
                seed_t, units = trained_models(
                    cfg, args.units, args.seed_steps, args.unit_steps, args.lr
                )
                label = f"trained {args.seed_steps}+{args.unit_steps} steps"
                results.append(
                    {"model": name, **run_case(label, work, cfg.to_dict(), seed_t, units)}
                )
                print(table([results[-1]])[-1], flush=True)
        if args.checkpoints:
            if len(args.checkpoints) < 3:
                raise SystemExit("error: --checkpoints needs a seed and at least 2 units")
            r = checkpoint_case(args.checkpoints[0], args.checkpoints[1:])
            results.append({"model": "checkpoints", **r})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n".join(table(results)))
    if args.json:
        write_result(
            args.json,
            "pool_delta_error",
            {"device": "cpu", "units": args.units, "results": results},
            command_line(__file__, argv),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
