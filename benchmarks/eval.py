"""Evaluation throughput: ``evaluate()`` vs transformers' Cohere forward on the same documents.

CPU (always): the ``demo`` preset on synthetic documents (lengths log-normal around
half the window, some longer than a window), non-overlapping windows, the same
length-bucketed padded batches for both sides. Ours is :func:`evaluate` (fused
output projection + per-token NLL, no logits); transformers is ``CohereForCausalLM``
with the same config and weights (SDPA attention) producing logits, then
``cross_entropy(reduction="sum")`` over the scored tokens. Rounds alternate between
the two (the machine is shared); tokens/s are the median round, and both sides' NLL
sums are checked to agree.

GPU (when CUDA is present): the same for ``130m`` and ``1.1b`` in bf16 at 2048 tokens.

    python benchmarks/eval.py                  # JSON to benchmarks/results/eval.json
    python benchmarks/eval.py --update-docs    # also the "## Evaluation" section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))

import hf_compare  # noqa: E402  (benchmarks/gpu/hf_compare.py)

from megablocks_ablate.evaluate import EvalSet, EvalSuite, evaluate  # noqa: E402
from megablocks_ablate.evaluate.perplexity import DEFAULT_BATCH_TOKENS, rank_plan  # noqa: E402
from megablocks_ablate.model import ModelConfig  # noqa: E402
from megablocks_ablate.utils.benchmark_result import (  # noqa: E402
    check_writable,
    command_line,
    write_result,
)

EOD = 2
SECTION = "## Evaluation"


def synthetic_suite(vocab: int, tokens: int, max_len: int, seed: int = 0) -> EvalSuite:
    """One domain of Zipf-distributed ids; document lengths log-normal, median max_len/2."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(np.clip(rng.lognormal(np.log(max_len / 2), 0.8), 8, 4 * max_len)))
    ids = np.minimum(rng.zipf(1.2, sum(lengths)) + 2, vocab - 1).astype(np.int32)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    docs = EvalSet(
        domain="synthetic",
        path="<synthetic>",
        tokens=ids,
        offsets=offsets,
        doc_bytes=np.asarray(lengths, np.int64) * 4,
        tokenizer_fingerprint="synthetic",
    )
    return EvalSuite(sets={"synthetic": docs}, tokenizer_fingerprint="synthetic", eod_id=EOD)


def hf_model(cfg: ModelConfig, ours: torch.nn.Module, device, dtype):
    """transformers' model holding ours' weights, loaded strictly (``gpu/hf_compare``:
    a key, shape or tie that does not match fails, never a silently random tensor)."""
    return hf_compare.hf_model(cfg, ours, device, dtype)


def hf_evaluate(hf, suite: EvalSuite, max_len: int, batch_tokens: int, device) -> tuple[float, int]:
    """NLL sum and scored tokens of the same batches through HF logits."""
    rp = rank_plan(suite, max_len, max_len, batch_tokens)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.inference_mode():
        for batch in rp.batches:
            inputs, labels = batch.inputs_and_labels(device)
            logits = hf(input_ids=inputs).logits
            total += F.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), reduction="sum"
            ).double()
            count += batch.scored_tokens
    return float(total), count


def bench(
    preset: str,
    device: torch.device,
    dtype: torch.dtype,
    tokens: int,
    rounds: int,
    batch_tokens: int,
) -> dict:
    cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    ours = cfg.build(device=device, dtype=dtype).eval()
    hf = hf_model(cfg, ours, device, dtype)
    suite = synthetic_suite(cfg.vocab_size, tokens, cfg.max_seq_len)
    L = cfg.max_seq_len
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_ours():
        r = evaluate(ours, suite, batch_tokens=batch_tokens)["synthetic"]
        return r.nll_sum, r.tokens

    def run_hf():
        return hf_evaluate(hf, suite, L, batch_tokens, device)

    runs = {"ours": run_ours, "transformers": run_hf}
    results = {name: fn() for name, fn in runs.items()}  # warm-up (plans, allocator, kernels)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    (nll_ours, n), (nll_hf, n_hf) = results["ours"], results["transformers"]
    assert n == n_hf, (n, n_hf)
    rel = abs(nll_ours - nll_hf) / abs(nll_hf)
    out = {
        "preset": preset,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "params": cfg.num_params(),
        "max_len": L,
        "documents": suite.sets["synthetic"].num_documents,
        "tokens": n,
        "batch_tokens": batch_tokens,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "nll_rel_diff": rel,
    }
    for name in runs:
        out[f"tokens_per_s_{name}"] = round(n / statistics.median(times[name]), 1)
    out["ratio"] = round(out["tokens_per_s_ours"] / out["tokens_per_s_transformers"], 3)
    out["ratio_best"] = round(min(times["transformers"]) / min(times["ours"]), 3)
    return out


def docs_section(res: dict) -> str:
    rows = res["runs"]
    lines = [
        SECTION,
        "",
        f"`python benchmarks/eval.py --update-docs` on {res['machine']} (torch {res['torch']}, "
        f"transformers {res['transformers']}). Synthetic documents (log-normal lengths, median half a "
        "window, some several windows long), non-overlapping windows, the same length-bucketed "
        "batches on both sides. Ours: `evaluate()` (fused output projection + per-token NLL, no "
        "logits). transformers: `CohereForCausalLM` (same config and weights, SDPA) logits, then "
        "`cross_entropy`. Alternating rounds; tokens/s of the median round (the best-round ratio is "
        "shown too, the machine being shared). Both NLL sums agree to the relative difference shown.",
        "",
        "| preset | device | dtype | tokens | ours (tokens/s) | transformers (tokens/s) | ratio (median) "
        "| ratio (best) | NLL rel. diff |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['device']} ({r['threads']} threads) | {r['dtype']} | "
            f"{r['tokens']:,} | {r['tokens_per_s_ours']:,.0f} | "
            f"{r['tokens_per_s_transformers']:,.0f} | {r['ratio']:.2f}x | "
            f"{r['ratio_best']:.2f}x | {r['nll_rel_diff']:.1e} |"
        )
    if not any(r["device"] != "cpu" for r in rows):
        lines += [
            "",
            "GPU rows (130m and 1.1b, bf16, 2048-token windows) are produced when CUDA is "
            "present; none was available for this run.",
        ]
    return "\n".join(lines) + "\n"


def update_docs(section: str, path: str) -> None:
    from docs_section import replace_section

    replace_section(section, path)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=24_000, help="CPU: tokens of synthetic documents")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS)
    ap.add_argument("--gpu-tokens", type=int, default=2_000_000)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "eval.json"))
    ap.add_argument(
        "--update-docs", action="store_true", help="write the section in docs/benchmarks.md"
    )
    args = ap.parse_args()
    check_writable(args.out, "eval")

    import transformers

    res = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "runs": [],
    }
    res["runs"].append(
        bench(
            "demo", torch.device("cpu"), torch.float32, args.tokens, args.rounds, args.batch_tokens
        )
    )
    print(res["runs"][-1])
    if torch.cuda.is_available():
        for preset in ("130m", "1.1b"):
            res["runs"].append(
                bench(preset, torch.device("cuda"), torch.bfloat16, args.gpu_tokens, 3, 8 * 2048)
            )
            print(res["runs"][-1])
    write_result(args.out, "eval", res, command_line(__file__))
    print(f"wrote {args.out}")
    if args.update_docs:
        update_docs(docs_section(res), os.path.join(ROOT, "docs", "benchmarks.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
