"""``python benchmarks/merge.py --vs-mergekit``: ``megablocks-ablate merge`` against
mergekit (``mergekit-yaml``, linear, fp32) end to end, each as a fresh process, on the
same 8 exported 130m-shaped unit models: wall time, peak RSS, output agreement, and the
merge phase's GB/s next to a plain read of the same files (key ``vs_mergekit``); with
``--hf-inputs`` both tools read the same Hugging Face directories and mergekit config
(benchmarks/merge_hf.py, key ``vs_mergekit_hf``).

The mergekit side runs in a throwaway venv (benchmarks/.cache/mergekit-venv; mergekit is
never a project dependency). Imported by benchmarks/merge.py, which owns the options.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megablocks_ablate.utils.benchmark_result import (  # noqa: E402
    command_line,
    load_own,
    write_result,
)

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
    """``--vs-mergekit``: run :func:`bench_vs_mergekit` (``--hf-inputs``: merge_hf's
    :func:`bench_hf_inputs`), store it under ``vs_mergekit`` (``vs_mergekit_hf``) in the
    results file (other keys kept), print it."""
    from merge_hf import bench_hf_inputs, print_hf_inputs  # imports this module

    key = "vs_mergekit_hf" if args.hf_inputs else "vs_mergekit"
    workdir = tempfile.mkdtemp(prefix="mba-bench-vs-mergekit-", dir=args.workdir)
    try:
        if args.hf_inputs:
            res = bench_hf_inputs(args.vs_n, args.vs_reps, workdir, args.mergekit_version)
        else:
            res = bench_vs_mergekit(args.vs_n, args.vs_reps, workdir, args.mergekit_version)
    except MergekitUnavailable as e:
        print(f"mergekit is not available here, so there is nothing to compare with:\n{e}")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res["command"] = command_line(os.path.join(HERE, "merge.py"))
    stored = load_own(args.out, "merge") or {}
    stored[key] = res
    write_result(args.out, "merge", stored, stored.get("command") or res["command"])
    (print_hf_inputs if args.hf_inputs else print_vs_mergekit)(res)
    print(f"wrote {args.out} (key {key})")
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
