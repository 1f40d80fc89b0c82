"""Row ``ce_chunks``: the fused cross-entropy's chunking from the shapes against the fixed rule.

The switch is ``MBA_CE_CHUNKS`` (megablocks_ablate/kernels/cross_entropy.py,
``choose_chunking``): ``auto`` (the default) sizes the chunks on CUDA from the shapes
(the fewest whose logits fit 1 GiB: one or two per micro batch at the presets') and
launches the Triton row step with 8 warps; ``legacy`` keeps the chunk no larger than
the hidden states (``default_chunk_rows``: 25 chunks at 1.1b x 8192 tokens, each
re-reading the 412 MB fp32 weight-gradient accumulator) and 4 warps.

For each shape (the 130m preset at its micro batch of 16 sequences, 1.1b at 4 and 8;
``--shapes``): bf16 hidden states, the fp32 master weight cast by the loss itself (as
under autocast in training), labels with some ignored rows. Both chunkings are timed
(forward + backward, median of ``--reps``) and both are checked against the full-logit
reference in fp32 (kernel_checks.py: error <= 2x the bf16 full-logit reference's own +
2^-8); the largest difference between the two is recorded. The chunking is passed
explicitly, so the dry run (CPU, interpreter) runs the CUDA choice too. Key figure:
the speed-up at 1.1b x 4; target >= 1. The row **fails** when either is inaccurate.
"""

from __future__ import annotations

import math
import sys

from common import median, parser, run_row, target, time_fn
from kernel_checks import Case, check, rel_err

SHAPES = {  # name: (rows, d_model, vocab)
    "130m x16": (16 * 2048, 768, 50304),
    "1.1b x4": (4 * 2048, 2048, 50304),
    "1.1b x8": (8 * 2048, 2048, 50304),
    "tiny": (96, 32, 2100),
}
KEY_SHAPE = "1.1b x4"


def make_case(rows: int, d: int, vocab: int, mode: str, dtype, dev):
    """The fused loss under ``mode``'s chunking (what it picks on CUDA) vs full logits."""
    import torch

    from megablocks_ablate.kernels import cross_entropy as ce

    chunking = ce.choose_chunking(
        rows, d, vocab, "cuda", torch.empty((), dtype=dtype).element_size(), "triton", mode
    )
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(rows, d, generator=g, device=dev).to(dtype).requires_grad_()
    w = (d**-0.5 * torch.randn(vocab, d, generator=g, device=dev)).requires_grad_()  # fp32
    labels = torch.randint(0, vocab, (rows,), generator=g, device=dev)
    labels[:: max(1, rows // 16)] = ce.IGNORE_INDEX

    def kernel(h, w):
        return ce.linear_cross_entropy(
            h,
            w,
            labels,
            impl="triton",
            chunk_rows=chunking.chunk_rows,
            num_warps=chunking.num_warps,
        )

    def reference(h, w):
        return ce.linear_cross_entropy_reference(h, w.to(h.dtype), labels)

    return Case(f"linear_cross_entropy[{mode}]", [h, w], kernel, reference), chunking


def _grads(case: Case):
    xs = [x.detach().requires_grad_() for x in case.inputs]
    loss = case.kernel(*xs)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


def run_shape(name: str, dtype, dev, reps: int, warmup: int) -> dict:
    import torch

    rows, d, vocab = SHAPES[name]
    out: dict = {"shape": name, "rows": rows, "d_model": d, "vocab": vocab, "modes": {}}
    results = {}
    for mode in ("legacy", "auto"):
        rec: dict = {}
        try:
            case, chunking = make_case(rows, d, vocab, mode, dtype, dev)
            rec.update(chunk_rows=chunking.chunk_rows, num_warps=chunking.num_warps)
            rec["chunks"] = -(-rows // chunking.chunk_rows)
            rec.update(check(case, dtype))
            xs = [x.detach().requires_grad_() for x in case.inputs]

            def fwd_bwd(case=case, xs=xs):
                for x in xs:
                    x.grad = None
                case.kernel(*xs).backward()

            rec["fwd_bwd_ms"] = 1e3 * median(time_fn(fwd_bwd, dev, reps, warmup))
            results[mode] = _grads(case)
        except Exception as e:
            rec.update(accurate=False, error=f"{type(e).__name__}: {e}"[:400])
        out["modes"][mode] = rec
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if len(results) == 2:  # auto vs legacy directly
        (la, ga), (lb, gb) = results["auto"], results["legacy"]
        out["auto_vs_legacy"] = {
            "loss_rel": rel_err(la, lb),
            "grad_hidden_rel": rel_err(ga[0], gb[0]),
            "grad_weight_rel": rel_err(ga[1], gb[1]),
        }
    a, b = out["modes"]["auto"], out["modes"]["legacy"]
    if "fwd_bwd_ms" in a and "fwd_bwd_ms" in b:
        out["speedup"] = b["fwd_bwd_ms"] / a["fwd_bwd_ms"]
    return out


def summarize(runs: list[dict]) -> dict:
    bad = [
        f"{r['shape']} {mode}" + (f" ({m['error']})" if "error" in m else "")
        for r in runs
        for mode, m in r["modes"].items()
        if not m.get("accurate")
    ]
    key_run = next((r for r in runs if r["shape"] == KEY_SHAPE), runs[-1])
    ratio = key_run.get("speedup")
    parts = []
    for r in runs:
        a, b = r["modes"]["auto"], r["modes"]["legacy"]
        if "speedup" in r:
            parts.append(
                f"{r['shape']}: {b['chunks']} -> {a['chunks']} chunks, {r['speedup']:.2f}x"
            )
    speedups = [r["speedup"] for r in runs if "speedup" in r]
    geo = math.exp(sum(map(math.log, speedups)) / len(speedups)) if speedups else None
    out = {
        "key": {
            "name": "speedup_auto_vs_legacy",
            "value": ratio,
            "unit": "x",
            "text": "; ".join(parts) or "not timed",
        },
        "target": target(f"auto fwd+bwd >= legacy's speed at {key_run['shape']}", ">=", 1.0),
        "met": (ratio >= 1.0) if ratio is not None else None,
        "details": {"speedup_geomean": geo, "runs": runs},
    }
    if bad:
        out.update(status="failed", reason=f"inaccurate: {'; '.join(bad)}"[:300])
    return out


def body(args) -> dict:
    import torch

    from megablocks_ablate.kernels import dispatch

    if not dispatch.triton_available():
        raise RuntimeError("triton is not installed: the Triton row step is what is measured")
    dev = torch.device(args.device)
    if dev.type != "cuda" and not dispatch.interpret_mode():
        raise RuntimeError("Triton kernels on CPU need TRITON_INTERPRET=1")
    dtype = torch.bfloat16
    shapes = args.shapes or (["tiny"] if args.dry_run else ["130m x16", "1.1b x4", "1.1b x8"])
    return summarize([run_shape(s, dtype, dev, args.reps, args.warmup) for s in shapes])


if __name__ == "__main__":
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    sys.exit(run_row("ce_chunks", ap, body))
