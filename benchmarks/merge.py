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


# ---- --vs-mergekit: `megablocks-ablate merge` against mergekit, end to end ----------

MERGEKIT_TORCH = "2.13.0"  # installed first, CPU build, so that pip never pulls another
MERGEKIT_VERSION = "0.1.5"
MERGEKIT_VENV = os.path.join(HERE, ".cache", "mergekit-venv")


class MergekitUnavailable(RuntimeError):
    """mergekit could not be installed or run here (the comparison is skipped)."""


def mergekit_command(venv: str = MERGEKIT_VENV, version: str = MERGEKIT_VERSION) -> str:
    """Path of ``mergekit-yaml`` in a throwaway venv (created on first use): torch
    first, then mergekit with torch pinned, so mergekit's dependencies cannot replace
    it. Raises MergekitUnavailable with the failing step's output."""
    exe = os.path.join(venv, "bin", "mergekit-yaml")
    pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q"]
    steps = [
        [sys.executable, "-m", "venv", venv],
        pip + [f"torch=={MERGEKIT_TORCH}"],
        pip + [f"mergekit=={version}", f"torch=={MERGEKIT_TORCH}"],
    ]
    if not os.path.exists(exe):
        for step in steps:
            print("mergekit venv:", " ".join(step[-2:]), flush=True)
            r = subprocess.run(step, capture_output=True, text=True)
            if r.returncode != 0:
                tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-5:])
                raise MergekitUnavailable(f"`{' '.join(step)}` failed:\n{tail}")
    check = [os.path.join(venv, "bin", "python"), "-c", "import mergekit, torch"]
    if not os.path.exists(exe) or subprocess.run(check, capture_output=True).returncode:
        raise MergekitUnavailable(f"{venv}: mergekit-yaml is not usable (delete the venv)")
    return exe


def write_hf_units(workdir: str, n: int) -> tuple[list[str], list[str], int]:
    """``n`` unit models of the 130m shape, random fp32 weights, exported with
    ``model/hf.py``'s exporter (HF Cohere format). Returns (hf_dirs, our_dirs,
    params): each of our checkpoint directories has our config and lineage and a
    ``model.safetensors`` that is a symlink to the export's, so both tools read the
    very same files. The preset gets ``qk_norm=true``: mergekit's Cohere template
    requires the q_norm/k_norm tensors (1.5k parameters per layer)."""
    import logging

    from megablocks_ablate.checkpoint import Lineage, save_model_checkpoint
    from megablocks_ablate.model.config import ModelConfig
    from megablocks_ablate.model.hf import export_hf

    logging.getLogger("megablocks_ablate.model.hf").setLevel(logging.ERROR)  # no tokenizer
    cfg = ModelConfig.from_preset("130m", ["qk_norm=true"])
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in cfg.build().state_dict().items()}
    params = sum(v.numel() for v in base.values())
    hf_dirs, our_dirs = [], []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        state = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        tmp, hf, ours = (os.path.join(workdir, f"{kind}_u{i}") for kind in ("tmp", "hf", "ck"))
        lineage = Lineage(
            kind="unit", seed_hash="0" * 64, units=[f"u{i}"], weights=[1.0], tokens_seen=1
        )
        save_model_checkpoint(tmp, state, cfg.to_dict(), lineage)
        del state
        export_hf(tmp, hf)
        os.makedirs(ours)
        for name in ("config.json", "lineage.json"):
            shutil.copy(os.path.join(tmp, name), os.path.join(ours, name))
        os.symlink(os.path.join(hf, "model.safetensors"), os.path.join(ours, "model.safetensors"))
        shutil.rmtree(tmp)
        hf_dirs.append(hf)
        our_dirs.append(ours)
    return hf_dirs, our_dirs, params


def _timed_run(cmd: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``cmd`` as a fresh process. The RSS comes
    from /usr/bin/time -v, whose own tiny image is what the child starts from (a child
    forked from this process would carry this process's torch-sized RSS into its
    high-water mark); without it, from wait4's rusage of the child."""
    use_time = os.path.exists("/usr/bin/time")
    full = ["/usr/bin/time", "-v", *cmd] if use_time else cmd
    t = time.perf_counter()
    p = subprocess.Popen(full, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate()
    wall = time.perf_counter() - t
    if p.returncode != 0:
        tail = "\n".join((out + err).decode(errors="replace").strip().splitlines()[-8:])
        raise RuntimeError(f"`{' '.join(cmd[:3])} ...` exited {p.returncode}:\n{tail}")
    if use_time:
        for line in err.decode(errors="replace").splitlines():
            if "Maximum resident set size" in line:
                return wall, int(line.rsplit(":", 1)[1]) * 1024
    import resource

    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def safetensors_files(path: str) -> list[str]:
    """The .safetensors files of an output (a file, or a directory with shards)."""
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def compare_outputs(a: str, b: str) -> dict:
    """Tensor-by-tensor agreement of two merged models (files or shard directories):
    max |a - b| over every tensor both have (in fp64), and the names only one has."""
    from megablocks_ablate.checkpoint import MappedSafetensors

    def tensors(path):
        out = {}
        for f in safetensors_files(path):
            m = MappedSafetensors(f)
            out.update({name: m for name in m.names})
        return out

    ta, tb = tensors(a), tensors(b)
    common = sorted(set(ta) & set(tb))
    worst, worst_name, rel = 0.0, None, 0.0
    for name in common:
        x, y = ta[name].tensor(name).double(), tb[name].tensor(name).double()
        if x.shape != y.shape:
            raise ValueError(f"{name}: shape {list(x.shape)} vs {list(y.shape)}")
        d = float((x - y).abs().max()) if x.numel() else 0.0
        if d > worst or worst_name is None:
            worst, worst_name = d, name
            rel = d / max(float(x.abs().max()) if x.numel() else 0.0, 1e-30)
    return {
        "tensors_compared": len(common),
        "only_in_first": sorted(set(ta) - set(tb)),
        "only_in_second": sorted(set(tb) - set(ta)),
        "max_abs_diff": worst,
        "max_abs_diff_tensor": worst_name,
        "max_diff_relative_to_tensor_max": rel,
    }


# Run in a fresh process: read every byte of the inputs through mmap (16 MiB at a
# time, pages dropped after use, as the merge does), vs the merge phase alone.
_PLAIN_READ = """
import mmap, os, sys, time, numpy as np
t = time.perf_counter(); total = 0
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    n = len(mm) // 8 * 8
    for off in range(0, n, 16 << 20):
        k = min(16 << 20, n - off)
        np.bitwise_xor.reduce(np.frombuffer(mm, np.uint64, k // 8, off))
        mm.madvise(mmap.MADV_DONTNEED, off, k)
    total += len(mm); mm.close()
print(total, time.perf_counter() - t)
"""
_MERGE_PHASE = """
import sys, time
from megablocks_ablate.merge.file_merge import merge_checkpoints
from megablocks_ablate.merge.spec import MergeSpec
spec = MergeSpec.load(sys.argv[1]); t = time.perf_counter()
merge_checkpoints(spec, sys.argv[2], show_progress=False)
print(time.perf_counter() - t, int("torch" in sys.modules))
"""


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def bandwidth_vs_plain_read(spec: str, out: str, files: list[str], reps: int) -> dict:
    """GB/s of the merge phase (no start-up) next to a plain mmap read of the same
    input files, alternating, ``reps`` each (medians)."""
    env = dict(os.environ, MBA_NO_PROGRESS="1")
    merge_s, read_s, torch_loaded = [], [], False
    in_bytes = sum(os.path.getsize(f) for f in files)
    for _ in range(reps):
        shutil.rmtree(out, ignore_errors=True)
        r = subprocess.run(
            [sys.executable, "-c", _MERGE_PHASE, spec, out],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        seconds, loaded = r.stdout.split()
        merge_s.append(float(seconds))
        torch_loaded |= loaded == "1"
        r = subprocess.run(
            [sys.executable, "-c", _PLAIN_READ, *files], check=True, capture_output=True, text=True
        )
        read_s.append(float(r.stdout.split()[1]))
    out_bytes = os.path.getsize(os.path.join(out, "model.safetensors"))
    return {
        "input_bytes": in_bytes,
        "output_bytes": out_bytes,
        "merge_phase_s": _median(merge_s),
        "merge_input_gbps": in_bytes / _median(merge_s) / 1e9,
        "merge_read_write_gbps": (in_bytes + out_bytes) / _median(merge_s) / 1e9,
        "plain_read_s": _median(read_s),
        "plain_read_gbps": in_bytes / _median(read_s) / 1e9,
        "merge_process_imported_torch": torch_loaded,
        "all_merge_s": merge_s,
        "all_plain_read_s": read_s,
    }


def _write_specs(workdir: str, hf_dirs: list[str], our_dirs: list[str]) -> tuple[str, str]:
    """Our merge spec and mergekit's config: the same uniform linear fp32 merge."""
    spec = os.path.join(workdir, "merge.yaml")
    with open(spec, "w") as f:  # JSON is valid YAML
        json.dump({"checkpoints": {f"u{i}": d for i, d in enumerate(our_dirs)}, "uniform": True}, f)
    mk = os.path.join(workdir, "mergekit.yaml")
    with open(mk, "w") as f:  # equal weights, normalized (mergekit's default): 1/n each
        models = [{"model": d, "parameters": {"weight": 1.0}} for d in hf_dirs]
        json.dump({"merge_method": "linear", "dtype": "float32", "models": models}, f)
    return spec, mk


def _tool_summary(runs: list[tuple[float, int]], model_bytes: int) -> dict:
    walls, rss = [w for w, _ in runs], [r for _, r in runs]
    return {
        "wall_s": _median(walls),
        "peak_rss_bytes": _median(rss),
        "peak_rss_over_model": _median(rss) / model_bytes,
        "all_wall_s": walls,
        "all_peak_rss_bytes": rss,
    }


def bench_vs_mergekit(n: int, reps: int, workdir: str, version: str) -> dict:
    """Both tools end to end as fresh processes on the same files, alternating (who goes
    first alternates too), one untimed warm-up round, then ``reps`` timed rounds."""
    exe = mergekit_command(version=version)
    t0 = time.perf_counter()
    hf_dirs, our_dirs, params = write_hf_units(workdir, n)
    print(f"wrote {n} exported unit models in {time.perf_counter() - t0:.0f} s", flush=True)
    spec, mk = _write_specs(workdir, hf_dirs, our_dirs)
    ours_out, mk_out = os.path.join(workdir, "ours_out"), os.path.join(workdir, "mergekit_out")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    tools = {
        "ours": (
            [
                sys.executable,
                "-m",
                "megablocks_ablate.cli",
                "merge",
                "--spec",
                spec,
                "--out",
                ours_out,
            ],
            ours_out,
        ),
        "mergekit": ([exe, mk, mk_out], mk_out),
    }
    runs: dict[str, list[tuple[float, int]]] = {"ours": [], "mergekit": []}
    load_before = os.getloadavg()
    for rep in range(reps + 1):
        for name in ["ours", "mergekit"] if rep % 2 == 0 else ["mergekit", "ours"]:
            cmd, out = tools[name]
            shutil.rmtree(out, ignore_errors=True)
            wall, rss = _timed_run(cmd, env)
            print(
                f"  {'warm-up' if rep == 0 else f'rep {rep}'} {name}: {wall:.2f} s, "
                f"peak RSS {rss / 2**20:.0f} MiB",
                flush=True,
            )
            if rep:
                runs[name].append((wall, rss))
    load_after = os.getloadavg()
    agreement = compare_outputs(os.path.join(ours_out, "model.safetensors"), mk_out)
    files = [os.path.join(d, "model.safetensors") for d in hf_dirs]
    bandwidth = bandwidth_vs_plain_read(spec, os.path.join(workdir, "bw_out"), files, reps)
    model_bytes = params * 4
    ours, theirs = (
        _tool_summary(runs["ours"], model_bytes),
        _tool_summary(runs["mergekit"], model_bytes),
    )
    return {
        "n": n,
        "params": params,
        "model_bytes": model_bytes,
        "preset": "130m with qk_norm=true (mergekit's Cohere template needs q_norm/k_norm)",
        "inputs": "the same HF-format model.safetensors files (export-hf's exporter) for both; "
        "ours through checkpoint dirs whose model.safetensors is a symlink to the export's",
        "merge": "uniform linear, fp32 inputs and output",
        "reps": reps,
        "ours": ours,
        "mergekit": theirs,
        "mergekit_version": version,
        "speedup": theirs["wall_s"] / ours["wall_s"],
        "agreement": agreement,
        "bandwidth": bandwidth,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rss_method": "/usr/bin/time -v" if os.path.exists("/usr/bin/time") else "RUSAGE_CHILDREN",
        "notes": "ours fsyncs its output (atomic checkpoint), mergekit does not; inputs are in "
        "the page cache (warm-up round untimed); commands: "
        "`python -m megablocks_ablate.cli merge --spec S --out O` vs `mergekit-yaml C O`",
    }


def main_vs_mergekit(args: argparse.Namespace) -> int:
    """``--vs-mergekit``: run :func:`bench_vs_mergekit`, store it under ``vs_mergekit`` in
    the results file (other keys kept), print it."""
    workdir = tempfile.mkdtemp(prefix="mba-bench-vs-mergekit-", dir=args.workdir)
    try:
        res = bench_vs_mergekit(args.vs_n, args.vs_reps, workdir, args.mergekit_version)
    except MergekitUnavailable as e:
        print(f"mergekit is not available here, so there is nothing to compare with:\n{e}")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res["command"] = command_line(__file__)
    stored = load_own(args.out, "merge") or {}
    stored["vs_mergekit"] = res
    write_result(args.out, "merge", stored, stored.get("command") or res["command"])
    print_vs_mergekit(res)
    print(f"wrote {args.out} (key vs_mergekit)")
    return 0


def print_vs_mergekit(res: dict) -> None:
    ours, theirs, bw, agree = res["ours"], res["mergekit"], res["bandwidth"], res["agreement"]
    print(
        f"N={res['n']} x {res['params'] / 1e6:.1f}M params fp32 ({res['model_bytes'] / 2**20:.0f} "
        f"MiB each), medians of {res['reps']}, load {res['loadavg_before'][0]:.2f} -> "
        f"{res['loadavg_after'][0]:.2f}"
    )
    print(f"{'tool':>9} {'wall s':>7} {'peak RSS MiB':>12} {'x model':>8}")
    for name, r in (("ours", ours), ("mergekit", theirs)):
        print(
            f"{name:>9} {r['wall_s']:>7.2f} {r['peak_rss_bytes'] / 2**20:>12.0f} "
            f"{r['peak_rss_over_model']:>8.2f}"
        )
    print(
        f"speedup {res['speedup']:.1f}x; outputs agree to max |diff| {agree['max_abs_diff']:.3g} "
        f"over {agree['tensors_compared']} tensors ({agree['max_abs_diff_tensor']})"
    )
    print(
        f"merge phase {bw['merge_phase_s']:.3f} s: inputs {bw['merge_input_gbps']:.1f} GB/s "
        f"(read+write {bw['merge_read_write_gbps']:.1f} GB/s) vs plain mmap read of the same "
        f"files {bw['plain_read_gbps']:.1f} GB/s; torch imported by the merge: "
        f"{bw['merge_process_imported_torch']}"
    )


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
    ap.add_argument("--vs-n", type=int, default=8, help="--vs-mergekit: unit models merged")
    ap.add_argument("--vs-reps", type=int, default=3, help="--vs-mergekit: timed rounds")
    ap.add_argument("--mergekit-version", default=MERGEKIT_VERSION)
    args = ap.parse_args()
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
    if "vs_mergekit" in previous:  # measured by its own run (--vs-mergekit): keep it
        result["vs_mergekit"] = previous["vs_mergekit"]
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
