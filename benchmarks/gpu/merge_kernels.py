"""Row ``merge_kernels``: merge kernels (CUDA ``_C_cuda``, Triton) vs device copy bandwidth.

The GPU counterpart of ``benchmarks/merge.py``'s kernel table, on the same 130m-sized
parameter vector (123.6M parameters) and the same cases: N = 2 and 8 fp32 inputs, N =
32 bf16 inputs, fp32 output. GB/s = (bytes of the N inputs + the output) / s; the copy
bandwidth is ``dst.copy_(src)`` of one fp32 model (read + write bytes), each kernel
timing interleaved with a copy timing and compared with it (best of ``--reps`` each).
Each backend's output is also checked against the PyTorch reference: the row **fails**
(status failed, exit 1) when max |out - reference| / max |reference| exceeds 4 N fp32
half-ulps (``N x 2^-22``: the rounding of an fp32 sum of N terms taken in another order),
which an indexing error exceeds by orders of magnitude. Target: every kernel at >= 70 % of copy bandwidth for every N. When ``_C_cuda`` is not
built (the build_ext row failed or was skipped: the suite passes its reason as
``--ext-status``), the CUDA kernel is skipped with that reason and Triton still measured.
"""

from __future__ import annotations

import functools
import os
import sys

from common import meets, parser, run_row, target, time_fn

TARGET = target(">= 70% of copy bandwidth (every N)", ">=", 0.70)
CASES = [(2, "float32"), (8, "float32"), (32, "bfloat16")]


def _available(backend: str, device, ext_status: str | None = None) -> str | None:
    """None when ``backend`` can run on ``device``, else why not (``ext_status``: what
    the build_ext row said, when it ran in this suite run)."""
    from megablocks_ablate import _ext
    from megablocks_ablate.kernels import merge_triton

    if backend == "cuda":
        if device.type != "cuda":
            return "no CUDA device"
        if _ext.cuda is None or not hasattr(_ext.cuda, "merge_into"):
            why = f"build_ext {ext_status}" if ext_status else "see the build_ext row"
            return f"skipped: _C_cuda is not built ({why})"
    if backend == "cpp" and _ext.cpp is None:
        return "_C is not built"
    if backend == "triton":
        if merge_triton.triton is None:
            return "triton is not installed"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return "CPU tensors need TRITON_INTERPRET=1"
    return None


def body(args) -> dict:
    import torch

    from megablocks_ablate.merge.kernels import merge_into

    dev = torch.device(args.device)
    if args.params:
        p, source = int(float(args.params)), "--params"
    else:
        from merge import shapes_130m  # benchmarks/merge.py: the 130m preset's tensors

        p, source = sum(torch.Size(s).numel() for s in shapes_130m().values()), "the 130m preset's"
    kernels = ["cuda", "triton"] if dev.type == "cuda" else ["cpp", "triton"]
    unavailable = {
        b: why for b in kernels if (why := _available(b, dev, args.ext_status)) is not None
    }
    runnable = [b for b in kernels if b not in unavailable]
    src = torch.rand(p, device=dev)
    dst = torch.empty_like(src)
    copy_bytes = 2 * p * 4

    def copy():
        dst.copy_(src)

    rows_out = []
    for n, dtype_name in CASES:
        dtype = getattr(torch, dtype_name)
        base = torch.rand(p, device=dev)
        inputs = [torch.empty(p, dtype=dtype, device=dev) for _ in range(n)]
        for i, x in enumerate(inputs):  # distinct values per input, cheaply
            x.copy_(base).add_(i * 1e-3)
        del base
        ws = [1.0 / n] * n
        expected = torch.empty(p, device=dev)
        merge_into(expected, inputs, ws, backend="reference")
        out = torch.empty(p, device=dev)
        nbytes = n * p * dtype.itemsize + p * 4
        for backend in runnable + ["reference"]:
            fn = functools.partial(merge_into, out, inputs, ws, backend=backend)
            t_kernel, t_copy = float("inf"), float("inf")
            fn()  # warm-up: compiles Triton, faults pages in
            for _ in range(args.reps):  # interleaved: both see the same machine state
                t_copy = min(t_copy, min(time_fn(copy, dev, 1, warmup=0)))
                t_kernel = min(t_kernel, min(time_fn(fn, dev, 1, warmup=0)))
            scale = float(expected.abs().max()) or 1.0
            rel = float((out - expected).abs().max()) / scale
            tol = n * 2.0**-22
            copy_gbps = copy_bytes / t_copy / 1e9
            gbps = nbytes / t_kernel / 1e9
            rows_out.append(
                {
                    "n": n,
                    "input_dtype": dtype_name,
                    "backend": backend,
                    "kernel_s": t_kernel,
                    "kernel_gbps": round(gbps, 2),
                    "copy_gbps_adjacent": round(copy_gbps, 2),
                    "fraction_of_copy_bw": round(gbps / copy_gbps, 4),
                    "max_abs_err_vs_reference": float((out - expected).abs().max()),
                    "rel_err_vs_reference": rel,
                    "tolerance": tol,
                    "accurate": rel <= tol,
                }
            )
        del inputs, expected, out
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    worst = {
        b: min(r["fraction_of_copy_bw"] for r in rows_out if r["backend"] == b) for b in runnable
    }
    value = min(worst.values()) if worst else None
    parts = [f"{b} {worst[b]:.0%}" for b in runnable] + [f"{b}: unavailable" for b in unavailable]
    text = ", ".join(parts) + " of copy bandwidth (worst N)"
    met = meets(value, TARGET) if not unavailable else False
    bad = [
        f"{r['backend']} N={r['n']} ({r['rel_err_vs_reference']:.1e})"
        for r in rows_out
        if not r["accurate"]
    ]
    failed = {"status": "failed", "reason": f"wrong merge: {', '.join(bad)}"[:300]} if bad else {}
    return {
        **failed,
        "key": {
            "name": "min_fraction_of_copy_bw",
            "value": value,
            "unit": "fraction",
            "text": text,
        },
        "target": TARGET,
        "met": met,
        "details": {
            "params": p,
            "params_source": source,
            "reps": args.reps,
            "copy_gbps": max(r["copy_gbps_adjacent"] for r in rows_out),
            "unavailable": unavailable,
            "worst_fraction": worst,
            "cases": rows_out,
        },
    }


if __name__ == "__main__":
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=None, help="parameter count (default: the 130m preset's)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--ext-status", default=None, help="the build_ext row's outcome (the suite passes it)"
    )
    sys.exit(run_row("merge_kernels", ap, body))
