"""Merge-kernel bandwidth and file-merge memory, all in one run on the same inputs.

    python benchmarks/merge.py [--params 130m] [--reps 3] [--file-merge-n 8]

* Kernel GB/s = (bytes of the N inputs + bytes of the output) / s for N = 2, 8, 32 over
  a 130m-sized parameter set (the 130m preset's tensor shapes: d_model 768, 12 layers,
  vocab 50304 tied, SwiGLU 2048: 123.6M parameters), against
  (a) this machine's memory-copy bandwidth measured in the same run (``dst.copy_(src)``
      of one fp32 model, read + write bytes, timed interleaved with each kernel timing
      because the machine is shared), (b) naive PyTorch (``sum(w * t for ...)`` per tensor) and
  (c) deep-copying each state dict and averaging (the paper's released approach).
  N = 2 and 8 use fp32 inputs; N = 32 uses bf16 inputs (32 fp32 copies of a 130m model
  are 16 GB, too much beside everything else on a 24 GB machine); outputs are fp32.
* File-to-file merge (``megablocks-ablate merge``) of N = 8 fp32 checkpoints: wall time
  and peak RSS of the merging process (a fresh subprocess), against one model's size.

* ``--vs-mergekit``: ``megablocks-ablate merge`` against mergekit (``mergekit-yaml``,
  linear, fp32) end to end, each as a fresh process, on the same 8 exported 130m-shaped
  unit models: wall time, peak RSS, output agreement, and the merge phase's GB/s next
  to a plain read of the same files (key ``vs_mergekit``).
* ``--vs-mergekit --hf-inputs``: both tools on the same Hugging Face model directories
  and the same mergekit config (``merge --spec mk.yaml``), timed side by side, with
  elementwise agreement for equal and general weights (key ``vs_mergekit_hf``; see
  benchmarks/merge_hf.py).

Writes benchmarks/results/merge.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megablocks_ablate.merge.kernels import merge_into, select_backend  # noqa: E402
from megablocks_ablate.utils.benchmark_result import (  # noqa: E402
    command_line,
    load_own,
    write_result,
)

sys.path.insert(0, HERE)
# the comparison with mergekit lives beside (compare_outputs is used by the tests too)
from merge_mergekit import (  # noqa: E402, F401
    MERGEKIT_VENV,
    MERGEKIT_VERSION,
    compare_outputs,
    main_vs_mergekit,
)


def shapes_130m(d=768, layers=12, vocab=50304, ffn=2048) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the 130m preset (parallel block, fused QKV and gate/up, tied)."""
    out: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, d)}
    for i in range(layers):
        p = f"layers.{i}."
        out.update(
            {
                p + "norm.weight": (d,),
                p + "attn.qkv.weight": (3 * d, d),
                p + "attn.out.weight": (d, d),
                p + "mlp.gate_up.weight": (2 * ffn, d),
                p + "mlp.down.weight": (d, ffn),
            }
        )
    out["final_norm.weight"] = (d,)
    return out


def scaled_shapes(params: int) -> dict[str, tuple[int, ...]]:
    full = shapes_130m()
    total = sum(torch.Size(s).numel() for s in full.values())
    if params >= total:
        return full
    # Smaller runs (smoke tests): shrink the vocabulary and the depth.
    layers = max(1, round(12 * params / total))
    return shapes_130m(d=256, layers=layers, vocab=max(512, params // (4 * 256)), ffn=768)


def views(row: torch.Tensor, shapes) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for k, s in shapes.items():
        n = torch.Size(s).numel()
        out[k] = row[off : off + n].view(s)
        off += n
    return out


def best_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


class CopyProbe:
    """Memory-copy bandwidth (``dst.copy_(src)`` of one fp32 model, read + write bytes).

    The machine is shared, so its bandwidth drifts: every kernel timing is interleaved
    with a copy timing, and each kernel is compared with the copy measured beside it.
    """

    def __init__(self, p: int):
        self.src = torch.rand(p)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # fault the pages in
        self.nbytes = 2 * p * 4

    def seconds(self) -> float:
        t = time.perf_counter()
        self.dst.copy_(self.src)
        return time.perf_counter() - t


def bench_n(
    n: int, in_dtype: torch.dtype, shapes, reps: int, baselines: bool, probe: CopyProbe
) -> dict:
    p = sum(torch.Size(s).numel() for s in shapes.values())
    # One allocation per unit model, as N loaded models are (a deepcopy of one model's
    # tensors then copies that model only; page-aligned separate allocations are also
    # the worst case for cache-set aliasing between the input streams).
    rows = [torch.empty(p, dtype=in_dtype) for _ in range(n)]
    base = torch.rand(p)
    for i, row in enumerate(rows):  # distinct values per row, cheaply
        row.copy_(base)
        row.add_(i * 1e-3)
    del base
    ws = [1.0 / n] * n
    out = torch.empty(p)
    merge_into(out, rows, ws)  # warm up, fault the output in
    t_kernel, t_copy = float("inf"), float("inf")
    for _ in range(reps):  # interleaved, best of each
        t_copy = min(t_copy, probe.seconds())
        t_kernel = min(t_kernel, best_time(functools.partial(merge_into, out, rows, ws), 1))
    nbytes = n * p * in_dtype.itemsize + p * 4
    copy_gbps = probe.nbytes / t_copy / 1e9
    res = {
        "n": n,
        "input_dtype": str(in_dtype).replace("torch.", ""),
        "output_dtype": "float32",
        "params": p,
        "bytes_per_merge": nbytes,
        "kernel_s": t_kernel,
        "kernel_gbps": nbytes / t_kernel / 1e9,
        "copy_gbps_adjacent": copy_gbps,
        "fraction_of_copy_bw": nbytes / t_kernel / 1e9 / copy_gbps,
    }
    if baselines:
        sds = [views(rows[i], shapes) for i in range(n)]

        def naive():
            return {k: sum(w * sd[k] for w, sd in zip(ws, sds)) for k in shapes}

        def deepcopy_average():
            merged = copy.deepcopy(sds[0])  # what a script that loads each model does
            for k in merged:
                merged[k].mul_(ws[0])
            for w, sd in zip(ws[1:], sds[1:]):
                other = copy.deepcopy(sd)
                for k in merged:
                    merged[k].add_(other[k] * w)
                del other
            return merged

        base_reps = 1 if n >= 32 else min(reps, 2)
        res["naive_s"] = best_time(naive, base_reps)
        res["deepcopy_s"] = best_time(deepcopy_average, base_reps)
        res["speedup_vs_naive"] = res["naive_s"] / t_kernel
        res["speedup_vs_deepcopy"] = res["deepcopy_s"] / t_kernel
    del rows
    return res


def bench_file_merge(n: int, shapes, workdir: str) -> dict:
    from megablocks_ablate.checkpoint import Lineage, save_model_checkpoint

    p = sum(torch.Size(s).numel() for s in shapes.values())
    row = torch.rand(p)
    units = {}
    for i in range(n):
        d = os.path.join(workdir, "pool", f"u{i}")
        row.add_(1e-3)
        save_model_checkpoint(
            d,
            views(row, shapes),
            {"preset": "130m"},
            Lineage(kind="unit", seed_hash="0" * 64, units=[f"u{i}"], weights=[1.0], tokens_seen=1),
        )
        units[f"u{i}"] = d
    del row
    spec = os.path.join(workdir, "merge.yaml")
    with open(spec, "w") as f:
        json.dump({"checkpoints": units, "uniform": True}, f)  # JSON is valid YAML
    out = os.path.join(workdir, "merged")
    env = dict(os.environ, MBA_NO_PROGRESS="1")
    # Each child reports its own peak RSS as its last line: VmHWM of its own address
    # space (ru_maxrss would also count the pages of the forked parent before exec).
    report = (
        "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
        "if l.startswith('VmHWM')][0])"
    )
    idle = f"import torch, megablocks_ablate.merge.file_merge; {report}"
    merge = (
        "import sys; from megablocks_ablate.cli import main; "
        f"rc = main(['merge', '--spec', {spec!r}, '--out', {out!r}]); {report}; sys.exit(rc)"
    )

    def child(code: str) -> int:
        r = subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        return int(r.stdout.strip().splitlines()[-1])

    base_rss = child(idle)
    t = time.perf_counter()
    peak = child(merge)
    wall = time.perf_counter() - t
    model_bytes = p * 4
    return {
        "n": n,
        "dtype": "float32",
        "params": p,
        "model_bytes": model_bytes,
        "wall_s": wall,
        "peak_rss_bytes": peak,
        "peak_rss_over_model": peak / model_bytes,
        "idle_process_rss_bytes": base_rss,
        "read_write_gbps": (n + 1) * model_bytes / wall / 1e9,
        "note": "inputs just written, so read from the page cache",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="130m", help="'130m' or a parameter count (smoke runs)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--file-merge-n", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "merge.json"))
    ap.add_argument("--workdir", default=None, help="scratch dir for checkpoints (default: temp)")
    ap.add_argument(
        "--vs-mergekit",
        action="store_true",
        help="only compare `megablocks-ablate merge` with mergekit end to end (installs "
        f"mergekit into {os.path.relpath(MERGEKIT_VENV, ROOT)}); stored under vs_mergekit",
    )
    ap.add_argument(
        "--hf-inputs",
        action="store_true",
        help="with --vs-mergekit: both tools read the same Hugging Face directories and the "
        "same mergekit config (stored under vs_mergekit_hf)",
    )
    ap.add_argument("--vs-n", type=int, default=8, help="--vs-mergekit: unit models merged")
    ap.add_argument("--vs-reps", type=int, default=3, help="--vs-mergekit: timed rounds")
    ap.add_argument("--mergekit-version", default=MERGEKIT_VERSION)
    args = ap.parse_args()
    if args.hf_inputs and not args.vs_mergekit:
        ap.error("--hf-inputs compares with mergekit: add --vs-mergekit")
    previous = load_own(args.out, "merge") or {}  # refuses a file that is not ours, now
    if args.vs_mergekit:
        return main_vs_mergekit(args)

    shapes = shapes_130m() if args.params == "130m" else scaled_shapes(int(float(args.params)))
    p = sum(torch.Size(s).numel() for s in shapes.values())
    t0 = time.perf_counter()
    probe = CopyProbe(p)
    kernel = [
        bench_n(n, torch.float32 if n <= 8 else torch.bfloat16, shapes, args.reps, True, probe)
        for n in args.ns
    ]
    copy_gbps = max(r["copy_gbps_adjacent"] for r in kernel)
    del probe
    workdir = tempfile.mkdtemp(prefix="mba-bench-merge-", dir=args.workdir)
    try:
        file_merge = (
            bench_file_merge(args.file_merge_n, shapes, workdir) if args.file_merge_n else None
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "backend": select_backend(torch.device("cpu")),
        "params": p,
        "copy_gbps": copy_gbps,
        "kernel": kernel,
        "file_merge": file_merge,
        "total_s": time.perf_counter() - t0,
    }
    for key in ("vs_mergekit", "vs_mergekit_hf"):  # measured by their own runs: kept
        if key in previous:
            result[key] = previous[key]
    write_result(args.out, "merge", result, command_line(__file__))

    print(
        f"params {p / 1e6:.1f}M, backend {result['backend']}, best copy bandwidth "
        f"{copy_gbps:.2f} GB/s"
    )
    print(
        f"{'N':>3} {'inputs':>8} {'kernel s':>9} {'GB/s':>6} {'copy GB/s':>9} {'of copy':>8} "
        f"{'naive s':>8} {'x naive':>8} {'deepcopy s':>10} {'x deepcopy':>10}"
    )
    for r in kernel:
        print(
            f"{r['n']:>3} {r['input_dtype']:>8} {r['kernel_s']:>9.3f} {r['kernel_gbps']:>6.2f} "
            f"{r['copy_gbps_adjacent']:>9.2f} {r['fraction_of_copy_bw']:>8.0%} {r['naive_s']:>8.3f} {r['speedup_vs_naive']:>8.1f} "
            f"{r['deepcopy_s']:>10.3f} {r['speedup_vs_deepcopy']:>10.1f}"
        )
    if file_merge:
        print(
            f"file merge N={file_merge['n']}: {file_merge['wall_s']:.2f} s, peak RSS "
            f"{file_merge['peak_rss_bytes'] / 2**20:.0f} MiB = "
            f"{file_merge['peak_rss_over_model']:.2f} x one model "
            f"({file_merge['model_bytes'] / 2**20:.0f} MiB); idle process "
            f"{file_merge['idle_process_rss_bytes'] / 2**20:.0f} MiB"
        )
    print(f"wrote {args.out} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
