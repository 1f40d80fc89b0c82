"""Row ``merge_eval``: the study runner's in-memory merge-eval rate (merges/s).

What ``Scorer.open_pool`` + ``Scorer.score_mixture`` do (megablocks_ablate/ablate/
runner/scoring.py), minus the results store: ``--units`` unit checkpoints of the preset
(fp32, as the trainer writes them) are loaded into one ``ModelPool`` on the device, a
live fp32 model is built from the pool's config, and each mixture is one
``pool.merge_into(live, weights)`` (one kernel call) plus ``evaluate(live, suite)``
(bf16 autocast on CUDA) on a resident synthetic suite of ``--eval-tokens`` tokens.
Mixtures are random subsets of the units with equal weights, as a study's are.
Reported: merges/s, and the merge and evaluation time of one merge separately, so
the rate for another suite size follows. No target: the figure sizes a study.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time

from common import parser, run_row, sync


def write_units(preset: str, n: int, root: str) -> tuple[dict[str, str], object]:
    """``n`` distinct checkpoints of ``preset`` (one random model, shifted per unit)."""
    import torch

    from megablocks_ablate.checkpoint import Lineage, save_model_checkpoint
    from megablocks_ablate.model import ModelConfig

    cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    model = cfg.build()
    units = {}
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)
        d = os.path.join(root, f"unit_{i}")
        lineage = Lineage(
            kind="unit", seed_hash="0" * 64, units=[f"unit_{i}"], weights=[1.0], tokens_seen=1
        )
        save_model_checkpoint(d, model.state_dict(), cfg.to_dict(), lineage)
        units[f"unit_{i}"] = d
    return units, cfg


def body(args) -> dict:
    import torch
    from eval import synthetic_suite  # benchmarks/eval.py

    from megablocks_ablate.evaluate import evaluate
    from megablocks_ablate.merge.kernels import select_backend
    from megablocks_ablate.merge.pool import ModelPool
    from megablocks_ablate.model import ModelConfig

    dev = torch.device(args.device)
    workdir = args.workdir or tempfile.mkdtemp(prefix="mba-merge-eval-")
    root = os.path.join(workdir, "pool")
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    units, cfg = write_units(args.preset, args.units, root)
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    pool = ModelPool.from_checkpoints(units, device=dev, show_progress=False)
    live = ModelConfig.from_dict(pool.config).build(device=dev)  # as Scorer.open_pool
    sync(dev)
    load_s = time.perf_counter() - t
    suite = synthetic_suite(cfg.vocab_size, args.eval_tokens, cfg.max_seq_len)
    rng = random.Random(0)
    names = list(units)
    mixtures = []
    for _ in range(args.mixtures + 1):  # the first is a warm-up
        chosen = rng.sample(names, rng.randint(1, len(names)))
        mixtures.append({u: 1.0 / len(chosen) for u in chosen})
    merge_s, eval_s, tokens = [], [], 0
    for i, weights in enumerate(mixtures):
        sync(dev)
        t0 = time.perf_counter()
        pool.merge_into(live, weights)
        sync(dev)
        t1 = time.perf_counter()
        res = evaluate(live, suite, batch_tokens=args.batch_tokens)["synthetic"]
        sync(dev)
        t2 = time.perf_counter()
        if i:
            merge_s.append(t1 - t0)
            eval_s.append(t2 - t1)
            tokens = res.tokens
    total = sum(merge_s) + sum(eval_s)
    rate = len(merge_s) / total
    merge_ms = 1e3 * sum(merge_s) / len(merge_s)
    eval_ms = 1e3 * sum(eval_s) / len(eval_s)
    del pool, live
    shutil.rmtree(root, ignore_errors=True)
    text = (
        f"{rate:.2f} merges/s ({args.units} units, {tokens:,} eval tokens: "
        f"merge {merge_ms:.1f} ms + eval {eval_ms:.0f} ms)"
    )
    return {
        "key": {"name": "merges_per_s", "value": round(rate, 3), "unit": "merges/s", "text": text},
        "target": None,
        "met": None,
        "details": {
            "preset": args.preset,
            "params": cfg.num_params(),
            "units": args.units,
            "mixtures": len(merge_s),
            "eval_tokens": tokens,
            "batch_tokens": args.batch_tokens,
            "merge_backend": select_backend(dev),
            "merges_per_s": rate,
            "merge_ms": merge_ms,
            "eval_ms": eval_ms,
            "merge_share": sum(merge_s) / total,
            "eval_tokens_per_s": tokens / (eval_ms / 1e3),
            "write_units_s": write_s,
            "pool_load_s": load_s,
        },
    }


if __name__ == "__main__":
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="130m")
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--mixtures", type=int, default=20)
    ap.add_argument("--eval-tokens", type=int, default=65_536)
    ap.add_argument("--batch-tokens", type=int, default=8 * 2048)
    sys.exit(run_row("merge_eval", ap, body))
