"""Row ``eval``: evaluation tokens/s of ``evaluate()`` for the 130m and 1.1b presets, and its
loss checked against transformers'.

bf16 weights, 2048-token non-overlapping windows, the synthetic documents of
``benchmarks/eval.py`` (log-normal lengths, median half a window). When transformers
imports: ``CohereForCausalLM`` (same config, SDPA) gets our weights with
``strict=True`` (hf_compare.py: every key filled, nothing left over, the tie kept,
every tensor equal), rounds of ours and theirs alternate (logits + cross_entropy on
their side), and the losses are checked: the mean NLL over every token in bf16 within
2^-8 relative, and per-token NLL in fp32 (both models upcast, the first
``--check-tokens``) within 1e-3 nats max / 1e-4 RMS (hf_compare.py says why). A
refused load or a loss outside its tolerance **fails** the row (status failed, exit 1,
the numbers in the JSON); speed is a target (ours at least as fast: ratio >= 1), not
a failure. Without transformers only ours is timed, nothing is checked, no target.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time

from common import parser, run_row, sync, target
from hf_compare import fp32_token_check, hf_model, judge_mean, per_token, token_stats


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _time_rounds(fns: dict, rounds: int, dev) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    return times


def _first_batches(batches, tokens: int) -> list:
    out, n = [], 0
    for b in batches:
        if n >= tokens:
            break
        out.append(b)
        n += int(b.scored_tokens)
    return out


def run_preset(preset: str, dev, dtype, args, with_hf: bool) -> dict:
    """Tokens/s of ours (and transformers'), and the loss checks when compared."""
    import torch
    from eval import hf_evaluate, synthetic_suite  # benchmarks/eval.py

    from megablocks_ablate.evaluate import evaluate
    from megablocks_ablate.evaluate.perplexity import rank_plan
    from megablocks_ablate.model import ModelConfig

    cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    ours = cfg.build(device=dev, dtype=dtype).eval()
    suite = synthetic_suite(cfg.vocab_size, args.tokens, cfg.max_seq_len)
    L = cfg.max_seq_len

    def run_ours():
        r = evaluate(ours, suite, batch_tokens=args.batch_tokens)["synthetic"]
        return r.nll_sum, r.tokens

    out = {
        "preset": preset,
        "dtype": _dtype_name(dtype),
        "params": cfg.num_params(),
        "max_len": L,
        "batch_tokens": args.batch_tokens,
        "rounds": args.rounds,
    }
    fns = {"ours": run_ours}
    hf = None
    if with_hf:
        try:
            hf = hf_model(cfg, ours, dev, dtype)
        except ValueError as e:  # the strict load refused: a failure with its reason
            return {**out, "checks_ok": False, "failures": [str(e)], "strict_load": False}
        fns["transformers"] = lambda: hf_evaluate(hf, suite, L, args.batch_tokens, dev)
    first = {name: fn() for name, fn in fns.items()}  # warm-up; also the losses compared
    times = _time_rounds(fns, args.rounds, dev)
    n = first["ours"][1]
    out["tokens"] = n
    for name in fns:
        out[f"tokens_per_s_{name}"] = round(n / statistics.median(times[name]), 1)
    if hf is None:
        return out
    out["ratio"] = round(out["tokens_per_s_ours"] / out["tokens_per_s_transformers"], 3)
    out["strict_load"] = True
    (nll_ours, n_ours), (nll_hf, n_hf) = first["ours"], first["transformers"]
    mean = judge_mean(nll_ours, n_ours, nll_hf, n_hf, _dtype_name(dtype))
    out["nll_rel_diff"] = mean["rel_diff"]
    batches = _first_batches(rank_plan(suite, L, L, args.batch_tokens).batches, args.check_tokens)
    # the timed models' per-token differences (autocast as evaluate()): recorded only
    low = token_stats(*per_token(ours, hf, batches, dev, autocast_dtype=torch.bfloat16))
    fp32 = fp32_token_check(cfg, ours, hf, batches, dev)
    out["checks"] = {"mean_nll": mean, "per_token_fp32": fp32, f"per_token_{out['dtype']}": low}
    out["failures"] = [c["why"] for c in (mean, fp32) if not c["ok"]]
    out["checks_ok"] = not out["failures"]
    return out


def body(args) -> dict:
    import torch

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with_hf = args.transformers == "on" or (
        args.transformers == "auto" and importlib.util.find_spec("transformers") is not None
    )
    note = None
    if with_hf:
        try:
            import transformers  # noqa: F401
        except ImportError as e:  # installed but broken: keep our own figure
            if args.transformers == "on":
                raise
            with_hf, note = False, f"transformers does not import ({e}): ours only"
    runs = []
    for preset in args.presets:
        r = run_preset(preset, dev, dtype, args, with_hf)
        runs.append(r)
        print(r, file=sys.stderr, flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return summarize(runs, with_hf, note)


def summarize(runs: list[dict], with_hf: bool, note: str | None = None) -> dict:
    """The row's JSON: failed when any preset's load or loss check failed."""
    parts = []
    for r in runs:
        if "tokens_per_s_ours" not in r:
            parts.append(f"{r['preset']} not timed (load refused)")
            continue
        part = f"{r['preset']} {r['tokens_per_s_ours']:,.0f} tokens/s"
        if "ratio" in r:
            part += f" ({r['ratio']:.2f}x transformers, NLL rel. diff {r['nll_rel_diff']:.1e})"
        parts.append(part)
    failures = [f"{r['preset']}: {f}" for r in runs for f in r.get("failures", [])]
    timed = [r for r in runs if "tokens_per_s_ours" in r]
    tgt = target("ours >= transformers (ratio >= 1)", ">=", 1.0) if with_hf else None
    met = all(r.get("ratio", 0) >= 1.0 for r in runs) if with_hf else None
    last = timed[-1] if timed else runs[-1]
    out: dict = {
        "key": {
            "name": f"tokens_per_s_{last['preset']}",
            "value": last.get("tokens_per_s_ours"),
            "unit": "tokens/s",
            "text": ", ".join(parts),
        },
        "target": tgt,
        "met": met,
        "details": {"transformers_compared": with_hf, "note": note, "runs": runs},
    }
    if failures:
        out.update(status="failed", reason=f"loss check: {'; '.join(failures)}"[:300])
    return out


if __name__ == "__main__":
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["130m", "1.1b"])
    ap.add_argument("--tokens", type=int, default=300_000, help="tokens of synthetic documents")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=8 * 2048)
    ap.add_argument(
        "--check-tokens", type=int, default=16_384, help="tokens of the fp32 per-token check"
    )
    ap.add_argument("--transformers", choices=["auto", "on", "off"], default="auto")
    sys.exit(run_row("eval", ap, body))
