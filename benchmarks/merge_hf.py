"""``python benchmarks/merge.py --vs-mergekit --hf-inputs``: both tools on the same
Hugging Face model directories and the same mergekit config (the rest of the mergekit
comparison, and the helpers used here, are in benchmarks/merge_mergekit.py).

    megablocks-ablate merge --spec mk.yaml --out O     vs     mergekit-yaml mk.yaml O

N unit models of the 130m shape (qk_norm on: mergekit's Cohere template needs
q_norm/k_norm) are exported to HF directories once; mk.yaml is a mergekit ``linear``
config naming them by absolute path. Timed: the ``equal`` case (weight 1.0 each,
normalize, dtype float32), each tool a fresh process, one untimed warm-up round, then
``reps`` interleaved rounds (who goes first alternates), medians and peak RSS
(/usr/bin/time -v). Our merge records the sha256 of every input in its provenance,
through the hash cache: the timed rounds find the hashes cached (the warm-up computed
them), and one extra run with an empty cache measures a first merge of new inputs.
Agreement, per case (``equal``; ``general`` weights in float32 and bfloat16): per
tensor max |diff|, and how many elements are bitwise equal and equal in value.

Stored under ``vs_mergekit_hf`` in benchmarks/results/merge.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time

from merge_mergekit import _timed_run, _tool_summary, mergekit_command, write_hf_units

CASES = {  # name -> (weights for n models, dtype); the first is timed
    "equal": (lambda n: [1.0] * n, "float32"),
    "general_fp32": (lambda n: [round(0.1 + 0.37 * i, 2) for i in range(n)], "float32"),
    "general_bf16": (lambda n: [round(0.1 + 0.37 * i, 2) for i in range(n)], "bfloat16"),
}


def _config(path: str, hf_dirs: list[str], weights: list[float], dtype: str) -> str:
    models = [{"model": d, "parameters": {"weight": w}} for d, w in zip(hf_dirs, weights)]
    with open(path, "w") as f:  # JSON is valid YAML
        json.dump({"merge_method": "linear", "dtype": dtype, "models": models}, f)
    return path


def compare_bitwise(a: str, b: str) -> dict:
    """Elementwise agreement of two HF output directories: tensors, elements, how many
    are bitwise equal and equal in value, the largest |a - b| (fp64) and where."""
    import torch

    from megablocks_ablate.checkpoint import MappedSafetensors

    def tensors(path: str) -> dict:
        out = {}
        for f in sorted(os.listdir(path)):
            if f.endswith(".safetensors"):
                m = MappedSafetensors(os.path.join(path, f))
                out.update({name: m for name in m.names})
        return out

    ta, tb = tensors(a), tensors(b)
    common = sorted(set(ta) & set(tb))
    res = {
        "tensors_compared": len(common),
        "only_in_ours": sorted(set(ta) - set(tb)),
        "only_in_mergekit": sorted(set(tb) - set(ta)),
        "elements": 0,
        "elements_bitwise_equal": 0,
        "elements_value_equal": 0,
        "tensors_bitwise_equal": 0,
        "dtype_mismatches": [],
        "max_abs_diff": 0.0,
        "max_abs_diff_tensor": None,
        "elements_within_1_ulp": 0,
        "max_diff_in_ulps_of_tensor_max": 0.0,
    }
    ints = {4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.uint8}
    for name in common:
        x, y = ta[name].tensor(name), tb[name].tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            res["dtype_mismatches"].append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}")
            continue
        bits = int((x.view(ints[x.element_size()]) == y.view(ints[y.element_size()])).sum())
        res["elements"] += x.numel()
        res["elements_bitwise_equal"] += bits
        res["elements_value_equal"] += int((x == y).sum())
        res["tensors_bitwise_equal"] += int(bits == x.numel())
        d = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        if x.is_floating_point() and x.numel():
            res["elements_within_1_ulp"] += int(((_ordinal(x) - _ordinal(y)).abs() <= 1).sum())
            # the difference in units of the last place of the tensor's largest value: the
            # scale both tools round at (an element near 0 after cancellation has tiny ulps)
            top = float(y.double().abs().max())
            if top > 0:
                bits = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}[x.dtype]
                ulp = 2.0 ** (math.frexp(top)[1] - bits)
                res["max_diff_in_ulps_of_tensor_max"] = max(
                    res["max_diff_in_ulps_of_tensor_max"], d / ulp
                )
        if d > res["max_abs_diff"]:
            res["max_abs_diff"], res["max_abs_diff_tensor"] = d, name
    return res


def _ordinal(t):
    """Each float's position on the line of representable values of its dtype (so
    that two values' distance in ulps is the difference; -0.0 and 0.0 are both 0)."""
    import torch

    bits = t.view({4: torch.int32, 2: torch.int16}[t.element_size()]).long()
    lowest = -(2 ** (8 * t.element_size() - 1))
    return torch.where(bits < 0, lowest - bits, bits)


def bench_hf_inputs(n: int, reps: int, workdir: str, version: str) -> dict:
    """See the module docstring."""
    exe = mergekit_command(version=version)
    t0 = time.perf_counter()
    hf_dirs, _, params = write_hf_units(workdir, n)
    print(f"wrote {n} exported unit models in {time.perf_counter() - t0:.0f} s", flush=True)
    configs = {
        name: _config(os.path.join(workdir, f"{name}.yaml"), hf_dirs, weights(n), dtype)
        for name, (weights, dtype) in CASES.items()
    }
    cache = os.path.join(workdir, "hash-cache")
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MBA_NO_PROGRESS="1",
        MBA_CACHE_DIR=cache,
    )
    ours_cmd = [sys.executable, "-m", "megablocks_ablate.cli", "merge", "--spec"]

    def command(tool: str, case: str, out: str) -> list[str]:
        if tool == "ours":
            return [*ours_cmd, configs[case], "--out", out]
        return [exe, configs[case], out]

    outs = {t: os.path.join(workdir, f"{t}_out") for t in ("ours", "mergekit")}
    runs: dict[str, list[tuple[float, int]]] = {"ours": [], "mergekit": []}
    load_before = os.getloadavg()
    for rep in range(reps + 1):
        for tool in ["ours", "mergekit"] if rep % 2 == 0 else ["mergekit", "ours"]:
            shutil.rmtree(outs[tool], ignore_errors=True)
            wall, rss = _timed_run(command(tool, "equal", outs[tool]), env)
            label = "warm-up" if rep == 0 else f"rep {rep}"
            print(f"  {label} {tool}: {wall:.2f} s, peak RSS {rss / 2**20:.0f} MiB", flush=True)
            if rep:
                runs[tool].append((wall, rss))
    load_after = os.getloadavg()
    agreement = {"equal": compare_bitwise(outs["ours"], outs["mergekit"])}
    # a first merge of these inputs: their sha256 computed, not found in the cache
    cold_out = os.path.join(workdir, "cold_out")
    cold_env = dict(env, MBA_CACHE_DIR=tempfile.mkdtemp(dir=workdir))
    cold_wall, cold_rss = _timed_run(command("ours", "equal", cold_out), cold_env)
    print(f"  ours, hashes not cached: {cold_wall:.2f} s", flush=True)
    for case in list(CASES)[1:]:
        for tool in ("ours", "mergekit"):
            shutil.rmtree(outs[tool], ignore_errors=True)
            _timed_run(command(tool, case, outs[tool]), env)
        agreement[case] = compare_bitwise(outs["ours"], outs["mergekit"])
        a = agreement[case]
        print(
            f"  {case}: {a['elements_bitwise_equal']}/{a['elements']} bitwise equal, max "
            f"|diff| {a['max_abs_diff']:.3g} "
            f"({a['max_diff_in_ulps_of_tensor_max']:.2g} ulps of the tensor's largest value)",
            flush=True,
        )
    model_bytes = params * 4
    ours, theirs = (_tool_summary(runs[t], model_bytes) for t in ("ours", "mergekit"))
    with open(os.path.join(cold_out, "merge_provenance.json")) as f:
        hashed = sum(len(i["sha256"]) for i in json.load(f)["inputs"])
    return {
        "n": n,
        "params": params,
        "model_bytes": model_bytes,
        "preset": "130m with qk_norm=true, exported to HF (CohereForCausalLM) by export-hf",
        "inputs": "the same HF model directories and the same mergekit config for both tools",
        "cases": {
            k: {"weights": w(n), "dtype": d, "normalize": True} for k, (w, d) in CASES.items()
        },
        "timed_case": "equal",
        "reps": reps,
        "ours": ours,
        "mergekit": theirs,
        "mergekit_version": version,
        "speedup": theirs["wall_s"] / ours["wall_s"],
        "ours_first_merge_hashing_inputs": {
            "wall_s": cold_wall,
            "peak_rss_bytes": cold_rss,
            "files_hashed": hashed,
        },
        "agreement": agreement,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rss_method": "/usr/bin/time -v" if os.path.exists("/usr/bin/time") else "RUSAGE_CHILDREN",
        "notes": "ours fsyncs its output (staged, atomic directory) and records the sha256 "
        "of each input (cached after the warm-up round; see ours_first_merge_hashing_inputs); "
        "mergekit does neither; inputs are in the page cache; commands: `python -m "
        "megablocks_ablate.cli merge --spec C --out O` vs `mergekit-yaml C O`",
    }


def print_hf_inputs(res: dict) -> None:
    ours, theirs = res["ours"], res["mergekit"]
    print(
        f"N={res['n']} HF models x {res['params'] / 1e6:.1f}M params fp32, same mergekit config, "
        f"medians of {res['reps']}, load {res['loadavg_before'][0]:.2f} -> "
        f"{res['loadavg_after'][0]:.2f}"
    )
    print(f"{'tool':>9} {'wall s':>7} {'peak RSS MiB':>12} {'x model':>8}")
    for name, r in (("ours", ours), ("mergekit", theirs)):
        print(
            f"{name:>9} {r['wall_s']:>7.2f} {r['peak_rss_bytes'] / 2**20:>12.0f} "
            f"{r['peak_rss_over_model']:>8.2f}"
        )
    cold = res["ours_first_merge_hashing_inputs"]
    print(
        f"speedup {res['speedup']:.1f}x; ours with the inputs' hashes not cached: "
        f"{cold['wall_s']:.2f} s"
    )
    for case, a in res["agreement"].items():
        print(
            f"  {case}: {a['elements_bitwise_equal']:,} of {a['elements']:,} elements bitwise "
            f"equal ({a['elements_value_equal']:,} in value), {a['tensors_bitwise_equal']} of "
            f"{a['tensors_compared']} tensors, {a['elements_within_1_ulp']:,} within 1 ulp; max "
            f"|diff| {a['max_abs_diff']:.3g} = {a['max_diff_in_ulps_of_tensor_max']:.2g} ulps of "
            f"the tensor's largest value; only in ours "
            f"{a['only_in_ours']}, only in mergekit {a['only_in_mergekit']}"
        )
