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

Vector loads (``MBA_MERGE_VEC=auto|off``, :mod:`megablocks_ablate.kernels.merge_switch`):
each CUDA and Triton case is timed twice, with the switch ``off`` (element-wise loads,
2 bytes per bf16 load) and ``auto`` (16-byte loads, the inputs here are all aligned),
both in GB/s; ``details.vector_loads`` gives each backend's ``auto`` / ``off`` speed-up
per case (the one that matters is N = 32 bf16) and whether the two outputs are bitwise
equal (they compute the same fold; recorded, the accuracy check is what fails the row).
The target is judged on ``auto``, the default.
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


VEC_BACKENDS = ("cuda", "triton")  # the kernels MBA_MERGE_VEC switches


def _time_case(fn, copy, dev, reps: int) -> tuple[float, float]:
    """Best kernel and copy seconds over ``reps`` interleaved pairs (same machine state)."""
    t_kernel, t_copy = float("inf"), float("inf")
    fn()  # warm-up: compiles Triton, faults pages in
    for _ in range(reps):
        t_copy = min(t_copy, min(time_fn(copy, dev, 1, warmup=0)))
        t_kernel = min(t_kernel, min(time_fn(fn, dev, 1, warmup=0)))
    return t_kernel, t_copy


def _measure(backend, mode, case, copy, dev, reps) -> dict:
    """One backend at one ``MBA_MERGE_VEC`` mode on one case: speed and error."""
    from megablocks_ablate.kernels.merge_switch import merge_vec, use_vector_loads
    from megablocks_ablate.merge.kernels import merge_into

    n, dtype_name, inputs, ws, expected, out, copy_bytes = case
    nbytes = n * out.numel() * inputs[0].element_size() + out.numel() * 4
    with merge_vec("auto" if mode == "n/a" else mode):
        fn = functools.partial(merge_into, out, inputs, ws, backend=backend)
        t_kernel, t_copy = _time_case(fn, copy, dev, reps)
        vector = backend in VEC_BACKENDS and use_vector_loads(
            out.data_ptr(), [x.data_ptr() for x in inputs]
        )
    scale = float(expected.abs().max()) or 1.0
    rel = float((out - expected).abs().max()) / scale
    tol = n * 2.0**-22
    copy_gbps = copy_bytes / t_copy / 1e9
    gbps = nbytes / t_kernel / 1e9
    return {
        "n": n,
        "input_dtype": dtype_name,
        "backend": backend,
        "merge_vec": mode,
        "loads": "vector" if vector else "element-wise",
        "kernel_s": t_kernel,
        "kernel_gbps": round(gbps, 2),
        "copy_gbps_adjacent": round(copy_gbps, 2),
        "fraction_of_copy_bw": round(gbps / copy_gbps, 4),
        "max_abs_err_vs_reference": float((out - expected).abs().max()),
        "rel_err_vs_reference": rel,
        "tolerance": tol,
        "accurate": rel <= tol,
    }


def _run_cases(p: int, runnable: list[str], dev, reps: int) -> tuple[list[dict], list[dict]]:
    """Every case x backend (x MBA_MERGE_VEC mode for CUDA / Triton): the measured rows,
    and per vector-switched backend and case the auto-vs-off comparison."""
    import torch

    from megablocks_ablate.merge.kernels import merge_into

    src = torch.rand(p, device=dev)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    rows_out, vec = [], []
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
        case = (n, dtype_name, inputs, ws, expected, out, 2 * p * 4)
        for backend in runnable + ["reference"]:
            if backend not in VEC_BACKENDS:  # not switched: measured once
                rows_out.append(_measure(backend, "n/a", case, copy, dev, reps))
                continue
            off = _measure(backend, "off", case, copy, dev, reps)
            off_out = out.clone()
            auto = _measure(backend, "auto", case, copy, dev, reps)
            rows_out += [off, auto]
            vec.append(
                {
                    "n": n,
                    "input_dtype": dtype_name,
                    "backend": backend,
                    "loads": auto["loads"],
                    "off_gbps": off["kernel_gbps"],
                    "auto_gbps": auto["kernel_gbps"],
                    "speedup": round(off["kernel_s"] / auto["kernel_s"], 3),
                    "bitwise_equal": bool(torch.equal(off_out, out)),
                }
            )
            del off_out
        del inputs, expected, out, case
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows_out, vec


def body(args) -> dict:
    import torch

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
    rows_out, vec = _run_cases(p, runnable, dev, args.reps)
    default = [r for r in rows_out if r["merge_vec"] != "off"]  # the target: the default
    worst = {
        b: min(r["fraction_of_copy_bw"] for r in default if r["backend"] == b) for b in runnable
    }
    value = min(worst.values()) if worst else None
    parts = [f"{b} {worst[b]:.0%}" for b in runnable] + [f"{b}: unavailable" for b in unavailable]
    text = ", ".join(parts) + " of copy bandwidth (worst N)"
    bf16 = [v for v in vec if v["input_dtype"] == "bfloat16"]
    if bf16:
        text += "; bf16 vector loads " + ", ".join(
            f"{v['backend']} x{v['speedup']:.2f}" for v in bf16
        )
    met = meets(value, TARGET) if not unavailable else False
    bad = [
        f"{r['backend']} N={r['n']} {r['merge_vec']} ({r['rel_err_vs_reference']:.1e})"
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
            "vector_loads": vec,
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
