"""Row ``triton_kernels``: every Triton kernel vs its PyTorch reference, error and speed.

For each kernel of ``megablocks_ablate/kernels`` (LayerNorm, RMSNorm, per-head QK-norm,
RoPE, SwiGLU, fused linear + cross-entropy, merge) at the 1.1b preset's shapes (8 x
2048 tokens, d_model 2048, 16 heads of 128, SwiGLU 4096, vocabulary 50304) in bf16:

* error: forward output and backward input/weight gradients of the kernel and of the
  reference (same bf16 inputs) against the reference run on the inputs upcast to fp32
  (the ground truth), as max |error| / max |truth|. The kernel passes when its error
  is at most twice the reference's own error plus a tolerance (fp32: 1e-5; bf16: 2^-8,
  one bf16 ulp of the largest value).
* speed: forward (no grad) and forward + backward, median of ``--reps`` timings.

RoPE and SwiGLU take strided column views, as the model's fused input projection
gives them. Target: every kernel accurate; speed-ups are reported, not required.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

from common import median, parser, run_row, target, time_fn

TARGET = target("every kernel's fwd/bwd error <= 2x the reference's own + tol")
SIZES = {  # tokens, d_model, heads, head_dim, batch, mlp_hidden, vocab, merge params/inputs
    "full": dict(rows=16384, d=2048, heads=16, hd=128, batch=8, mlp=4096, vocab=50304),
    "tiny": dict(rows=32, d=32, heads=2, hd=8, batch=2, mlp=32, vocab=67),
}


@dataclass
class Case:
    name: str
    inputs: list  # tensors; those with requires_grad get gradients compared
    kernel: Callable
    reference: Callable
    backward: bool = True


def make_cases(s: dict, dtype, dev) -> list[Case]:
    import torch

    from megablocks_ablate.kernels import cross_entropy as ce
    from megablocks_ablate.kernels import norm, rope, swiglu
    from megablocks_ablate.kernels.merge_reference import merge_into_reference
    from megablocks_ablate.kernels.merge_triton import merge_into_triton

    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0, grad=True):
        t = (scale * torch.randn(*shape, generator=g, device=dev)).to(dtype)
        return t.requires_grad_(grad)

    rows, d, h, hd = s["rows"], s["d"], s["heads"], s["hd"]
    t = rows // s["batch"]
    cos, sin = rope.rope_tables(t, hd, 10000.0, device=dev)
    # q|k heads as a column view of a wider projection output (strided, like the model's)
    qk_wide = randn(s["batch"], t, 3 * h * hd)
    gu_wide = randn(rows, d + 2 * s["mlp"])
    labels = torch.randint(0, s["vocab"], (rows,), generator=g, device=dev)
    labels[:: max(1, rows // 16)] = ce.IGNORE_INDEX
    n_merge = 8
    merge_in = [randn(rows * d // 4, grad=False) for _ in range(n_merge)]
    ws = [1.0 / n_merge + 0.01 * i for i in range(n_merge)]

    def qk(x):  # the strided q|k view the model hands to RoPE
        return x[..., : 2 * h * hd].unflatten(-1, (2 * h, hd))

    def merge(fn):
        return lambda *xs: fn(torch.empty(xs[0].numel(), dtype=torch.float32, device=dev), xs, ws)

    return [
        Case(
            "layernorm",
            [randn(rows, d), randn(d, scale=0.1).detach().add_(1).requires_grad_()],
            lambda x, w: norm.norm_triton(x, w, 1e-5, "layernorm"),
            lambda x, w: norm.norm_reference(x, w, 1e-5, "layernorm"),
        ),
        Case(
            "rmsnorm",
            [randn(rows, d), randn(d, scale=0.1).detach().add_(1).requires_grad_()],
            lambda x, w: norm.norm_triton(x, w, 1e-5, "rmsnorm"),
            lambda x, w: norm.norm_reference(x, w, 1e-5, "rmsnorm"),
        ),
        Case(
            "qk_norm (per-head layernorm)",
            [randn(rows, 2 * h, hd), randn(2 * h, hd, scale=0.1).detach().add_(1).requires_grad_()],
            lambda x, w: norm.norm_triton(x, w, 1e-5, "layernorm"),
            lambda x, w: norm.norm_reference(x, w, 1e-5, "layernorm"),
        ),
        Case(
            "rope (interleaved)",
            [qk_wide],
            lambda x: rope.rope_triton(qk(x), cos, sin),
            lambda x: rope.rope_reference(qk(x), cos, sin),
        ),
        Case(
            "swiglu",
            [gu_wide],
            lambda x: swiglu.swiglu_triton(x[:, d:]),
            lambda x: swiglu.swiglu_reference(x[:, d:]),
        ),
        Case(
            "linear_cross_entropy",
            [randn(rows, d), randn(s["vocab"], d, scale=d**-0.5)],
            lambda x, w: ce.linear_cross_entropy(x, w, labels, impl="triton"),
            lambda x, w: ce.linear_cross_entropy_reference(x, w, labels),
        ),
        Case(
            "merge (8 inputs)",
            merge_in,
            merge(merge_into_triton),
            merge(merge_into_reference),
            False,
        ),
    ]


def _rel_err(got, truth) -> float:
    scale = float(truth.abs().max())
    return float((got.float() - truth.float()).abs().max()) / (scale if scale > 0 else 1.0)


def _forward_backward(fn, inputs, upstream):
    """Output and input gradients of ``(fn(*inputs) * upstream).sum()``."""
    xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    y = fn(*xs)
    if upstream is None or not any(x.requires_grad for x in xs):
        return y.detach(), []
    (y.float() * upstream).sum().backward()
    return y.detach(), [x.grad for x in xs if x.requires_grad]


def check(case: Case, dtype, truth_dtype, tol: float) -> dict:
    import torch

    g = torch.Generator(device=case.inputs[0].device).manual_seed(1)
    probe = case.reference(*[x.detach() for x in case.inputs])
    upstream = torch.randn(probe.shape, generator=g, device=probe.device) if case.backward else None
    upcast = [x.detach().to(truth_dtype).requires_grad_(x.requires_grad) for x in case.inputs]
    y_t, g_t = _forward_backward(case.reference, upcast, upstream)
    y_k, g_k = _forward_backward(case.kernel, case.inputs, upstream)
    y_r, g_r = _forward_backward(case.reference, case.inputs, upstream)
    res = {"fwd_err_kernel": _rel_err(y_k, y_t), "fwd_err_reference": _rel_err(y_r, y_t)}
    if case.backward:
        res["bwd_err_kernel"] = max(_rel_err(a, b) for a, b in zip(g_k, g_t))
        res["bwd_err_reference"] = max(_rel_err(a, b) for a, b in zip(g_r, g_t))
    res["accurate"] = all(
        res[f"{p}_err_kernel"] <= 2 * res[f"{p}_err_reference"] + tol
        for p in (("fwd", "bwd") if case.backward else ("fwd",))
    )
    return res


def speed(case: Case, dev, reps: int, warmup: int) -> dict:
    import torch

    out = {}
    for side, fn in (("kernel", case.kernel), ("reference", case.reference)):
        xs = [x.detach().requires_grad_(x.requires_grad) for x in case.inputs]

        def fwd(fn=fn, xs=xs):
            with torch.no_grad():
                fn(*xs)

        out[f"fwd_ms_{side}"] = 1e3 * median(time_fn(fwd, dev, reps, warmup))
        if case.backward:

            def fwd_bwd(fn=fn, xs=xs):
                for x in xs:
                    x.grad = None
                fn(*xs).float().sum().backward()

            out[f"fwd_bwd_ms_{side}"] = 1e3 * median(time_fn(fwd_bwd, dev, reps, warmup))
    out["fwd_speedup"] = out["fwd_ms_reference"] / out["fwd_ms_kernel"]
    if case.backward:
        out["fwd_bwd_speedup"] = out["fwd_bwd_ms_reference"] / out["fwd_bwd_ms_kernel"]
    return out


def body(args) -> dict:
    import torch

    from megablocks_ablate.kernels import dispatch

    if not dispatch.triton_available():
        raise RuntimeError("triton is not installed: no Triton kernel to measure")
    dev = torch.device(args.device)
    if dev.type != "cuda" and not dispatch.interpret_mode():
        raise RuntimeError("Triton kernels on CPU need TRITON_INTERPRET=1")
    dtype = getattr(torch, args.dtype)
    truth_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    # fp32: rounding noise; bf16: one bf16 ulp of the largest value (2^-8), so a kernel
    # whose fp32 math differs slightly from the reference may round the other way
    tol = 1e-5 if dtype == torch.float32 else 2.0**-8
    size = args.size or ("tiny" if args.dry_run else "full")
    results = []
    for case in make_cases(SIZES[size], dtype, dev):
        r = {"kernel": case.name, **check(case, dtype, truth_dtype, tol)}
        r.update(speed(case, dev, args.reps, args.warmup))
        results.append(r)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    accurate = sum(r["accurate"] for r in results)
    speedups = [r.get("fwd_bwd_speedup", r["fwd_speedup"]) for r in results]
    geo = math.exp(sum(math.log(x) for x in speedups) / len(speedups))
    slowest = min(results, key=lambda r: r.get("fwd_bwd_speedup", r["fwd_speedup"]))
    text = (
        f"{accurate}/{len(results)} accurate; fwd+bwd speed-up geo-mean {geo:.2f}x, "
        f"lowest {min(speedups):.2f}x ({slowest['kernel']})"
    )
    return {
        "key": {"name": "accurate_kernels", "value": accurate, "unit": "kernels", "text": text},
        "target": {**TARGET, "value": len(results), "op": ">="},
        "met": accurate == len(results),
        "details": {
            "size": size,
            "shapes": SIZES[size],
            "dtype": args.dtype,
            "tolerance": tol,
            "reps": args.reps,
            "speedup_geomean": geo,
            "kernels": results,
        },
    }


if __name__ == "__main__":
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: full (tiny dry)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    sys.exit(run_row("triton_kernels", ap, body))
