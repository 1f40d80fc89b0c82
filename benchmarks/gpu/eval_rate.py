"""Row ``eval``: evaluation tokens/s of ``evaluate()`` for the 130m and 1.1b presets.

bf16 weights, 2048-token non-overlapping windows, the synthetic documents of
``benchmarks/eval.py`` (log-normal lengths, median half a window). When transformers
imports, this is ``benchmarks/eval.py``'s own ``bench()``: alternating rounds of ours and
``CohereForCausalLM`` (same config and weights, SDPA, logits + cross_entropy), NLL sums
checked to agree; target then: ours at least as fast (ratio >= 1). Without
transformers only ours is timed, and there is no target.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time

from common import parser, run_row, sync, target


def ours_only(preset: str, dev, dtype, tokens: int, rounds: int, batch_tokens: int) -> dict:
    """Tokens/s of ``evaluate()`` alone (median round after one warm-up pass)."""
    import torch
    from eval import synthetic_suite  # benchmarks/eval.py

    from megablocks_ablate.evaluate import evaluate
    from megablocks_ablate.model import ModelConfig

    cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    model = cfg.build(device=dev, dtype=dtype).eval()
    suite = synthetic_suite(cfg.vocab_size, tokens, cfg.max_seq_len)
    n = evaluate(model, suite, batch_tokens=batch_tokens)["synthetic"].tokens  # warm-up
    times = []
    for _ in range(rounds):
        sync(dev)
        t0 = time.perf_counter()
        evaluate(model, suite, batch_tokens=batch_tokens)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {
        "preset": preset,
        "dtype": str(dtype).removeprefix("torch."),
        "params": cfg.num_params(),
        "max_len": cfg.max_seq_len,
        "tokens": n,
        "batch_tokens": batch_tokens,
        "rounds": rounds,
        "tokens_per_s_ours": round(n / statistics.median(times), 1),
    }


def body(args) -> dict:
    import torch

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with_hf = args.transformers == "on" or (
        args.transformers == "auto" and importlib.util.find_spec("transformers") is not None
    )
    runs, note = [], None
    for preset in args.presets:
        r = None
        if with_hf:
            from eval import bench  # benchmarks/eval.py: ours vs transformers

            try:
                r = bench(preset, dev, dtype, args.tokens, args.rounds, args.batch_tokens)
            except ImportError as e:  # installed but broken: keep our own figure
                if args.transformers == "on":
                    raise
                with_hf, note = False, f"transformers does not import ({e}): ours only"
        if r is None:
            r = ours_only(preset, dev, dtype, args.tokens, args.rounds, args.batch_tokens)
        runs.append(r)
        print(r, file=sys.stderr, flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    parts = []
    for r in runs:
        part = f"{r['preset']} {r['tokens_per_s_ours']:,.0f} tokens/s"
        if "ratio" in r:
            part += f" ({r['ratio']:.2f}x transformers)"
        parts.append(part)
    tgt = target("ours >= transformers (ratio >= 1)", ">=", 1.0) if with_hf else None
    met = all(r["ratio"] >= 1.0 for r in runs) if with_hf else None
    last = runs[-1]
    return {
        "key": {
            "name": f"tokens_per_s_{last['preset']}",
            "value": last["tokens_per_s_ours"],
            "unit": "tokens/s",
            "text": ", ".join(parts),
        },
        "target": tgt,
        "met": met,
        "details": {"transformers_compared": with_hf, "note": note, "runs": runs},
    }


if __name__ == "__main__":
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["130m", "1.1b"])
    ap.add_argument("--tokens", type=int, default=300_000, help="tokens of synthetic documents")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=8 * 2048)
    ap.add_argument("--transformers", choices=["auto", "on", "off"], default="auto")
    sys.exit(run_row("eval", ap, body))
