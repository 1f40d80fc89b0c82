"""The GPU suite's summary table, ``summary.json`` and ``benchmarks_gpu.md``, from row JSONs.

    python benchmarks/gpu/report.py DIR     # rebuild DIR/summary.json and DIR/benchmarks_gpu.md

The runner (suite.py) calls :func:`write_reports` at the end of every run; running
this by hand regenerates both files from ``DIR/rows/*.json`` (after a rerun of some
rows with ``--rows``, say). The Markdown holds one ``## `` section per topic, in the
form ``benchmarks/docs_section.py`` replaces in docs/benchmarks.md.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

from common import write_json

# (row name, title) in suite order: the one list the runner and the report share.
ROW_TITLES = [
    ("env", "environment"),
    ("build_ext", "CUDA extension build"),
    ("merge_kernels", "(a) merge kernels vs copy bandwidth"),
    ("triton_kernels", "(b) Triton kernels vs PyTorch reference"),
    ("train_130m", "(c) training step, 130m"),
    ("train_1.1b", "(c) training step, 1.1b"),
    ("eval", "(d) evaluation tokens/s"),
    ("merge_eval", "(e) merge-eval rate, in-memory pool"),
    ("nccl", "(f) NCCL all-reduce"),
]
TITLES = dict(ROW_TITLES)


def load_rows(out_dir: str) -> dict[str, dict]:
    rows = {}
    for name, _ in ROW_TITLES:
        path = os.path.join(out_dir, "rows", f"{name}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                rows[name] = json.load(f)
    return rows


def summary_rows(rows: dict[str, dict]) -> list[dict]:
    out = []
    for name, title in ROW_TITLES:
        r = rows.get(name)
        if r is None:
            out.append({"row": name, "title": title, "status": "not run"})
            continue
        key, tgt = r.get("key") or {}, r.get("target") or {}
        out.append(
            {
                "row": name,
                "title": title,
                "status": r["status"],
                "reason": r.get("reason"),
                "key": key.get("text"),
                "value": key.get("value"),
                "unit": key.get("unit"),
                "target": tgt.get("text"),
                "met": r.get("met"),
                "elapsed_s": r.get("elapsed_s", r.get("wall_s")),
                "timeout_s": r.get("timeout_s"),
            }
        )
    return out


def _num(x: float) -> str:
    """Readable at any scale: 3,350 or 0.0421."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _met(m) -> str:
    return {True: "yes", False: "NO", None: "-"}[m]


def _status(s: dict) -> str:
    return s["status"] if s["status"] in ("ok", "not run") else f"{s['status']}: {s.get('reason')}"


def table(summary: list[dict]) -> str:
    """Plain-text table for the terminal."""
    head = ("row", "status", "key figure", "target", "met")
    lines = [
        (
            s["row"],
            _status(s)[:60],
            (s.get("key") or "")[:70],
            (s.get("target") or "")[:50],
            _met(s.get("met")),
        )
        for s in summary
    ]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        + [fmt.format(*x) for x in lines]
    )


# ---- Markdown --------------------------------------------------------------------------


def _not_ok(r: dict | None) -> str | None:
    if r is None:
        return "Not run."
    if r["status"] != "ok":
        return f"{r['status'].capitalize()}: {r.get('reason')}"
    return None


def _devices(env: dict) -> str:
    devs = env.get("devices") or []
    if not devs:
        return f"CPU only ({env.get('cpus')} cores)"
    d = devs[0]
    return f"{len(devs)} x {d['name']} ({d['memory_gib']} GiB, sm {d['capability']})"


def _md_suite(meta: dict, summary: list[dict], rows: dict) -> list[str]:
    env = (rows.get("env") or {}).get("details", {})
    lines = [
        "## GPU suite",
        "",
        f"`{meta['command']}` on {_devices(env)} (torch {env.get('torch')}, CUDA "
        f"{env.get('torch_cuda')}, triton {env.get('modules', {}).get('triton')}, flash-attn "
        f"{env.get('modules', {}).get('flash_attn') or 'absent'}), {meta['date']}, "
        f"{meta['elapsed_s']:.0f} s of a {meta['budget_s']:.0f} s budget. Each row ran in its "
        "own process with its own time slice; raw figures in `rows/*.json`.",
    ]
    if meta.get("finished") is False:
        lines += ["", "**Incomplete**: written while the suite was still running."]
    if meta["dry_run"]:
        lines += [
            "",
            "**Dry run** (CPU, tiny sizes, Triton interpreter): these figures only show "
            "that every driver runs; they measure nothing.",
        ]
    lines += ["", "| row | status | key figure | target | met |", "|---|---|---|---|---|"]
    for s in summary:
        lines.append(
            f"| {s['title']} | {_status(s)} | {s.get('key') or ''} | {s.get('target') or ''} "
            f"| {_met(s.get('met'))} |"
        )
    return lines


def _md_merge(r: dict) -> list[str]:
    d = r["details"]
    lines = [
        f"{d['params']:,} parameters ({d.get('params_source', 'given')}), fp32 output; GB/s = "
        "(N inputs + output) bytes / s, against the device's `copy_` bandwidth measured "
        f"beside each timing (best {_num(d['copy_gbps'])} GB/s); best of {d['reps']}. "
        "Target >= 70 % of copy bandwidth.",
        "",
        "| N | inputs | backend | GB/s | copy GB/s | of copy | max abs err vs reference |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for c in d["cases"]:
        lines.append(
            f"| {c['n']} | {c['input_dtype']} | {c['backend']} | {_num(c['kernel_gbps'])} | "
            f"{_num(c['copy_gbps_adjacent'])} | {c['fraction_of_copy_bw']:.0%} | "
            f"{c['max_abs_err_vs_reference']:.1e} |"
        )
    for b, why in d["unavailable"].items():
        lines += ["", f"{b}: not measured ({why})."]
    return lines


def _md_kernels(r: dict) -> list[str]:
    d = r["details"]
    s = d["shapes"]
    lines = [
        f"{d['dtype']}, {s['rows']:,} tokens, d_model {s['d']}, {s['heads']} heads of {s['hd']}, "
        f"SwiGLU {s['mlp']}, vocabulary {s['vocab']:,}. Error = max |x - truth| / max |truth| "
        "against the reference run in fp32 on the same inputs; the kernel is accurate when its "
        f"error is <= 2x the bf16 reference's + {d['tolerance']:.1e}. Times: median of "
        f"{d['reps']}.",
        "",
        "| kernel | fwd err (kernel / ref) | bwd err (kernel / ref) | accurate | fwd ms "
        "(kernel / ref) | fwd+bwd ms (kernel / ref) | fwd+bwd speed-up |",
        "|---|---|---|---|---|---|---:|",
    ]
    for k in d["kernels"]:
        bwd = (
            f"{k['bwd_err_kernel']:.1e} / {k['bwd_err_reference']:.1e}"
            if "bwd_err_kernel" in k
            else "-"
        )
        fb = (
            f"{k['fwd_bwd_ms_kernel']:.3f} / {k['fwd_bwd_ms_reference']:.3f}"
            if "fwd_bwd_ms_kernel" in k
            else "-"
        )
        sp = k.get("fwd_bwd_speedup", k["fwd_speedup"])
        lines.append(
            f"| {k['kernel']} | {k['fwd_err_kernel']:.1e} / {k['fwd_err_reference']:.1e} | {bwd} | "
            f"{'yes' if k['accurate'] else 'NO'} | {k['fwd_ms_kernel']:.3f} / "
            f"{k['fwd_ms_reference']:.3f} | {fb} | {sp:.2f}x |"
        )
    return lines


def _md_train(rows: dict) -> list[str]:
    lines = [
        "`train()` on one GPU from the seed presets as they are (sequence 2048, their micro "
        "batch and activation checkpointing, bf16 autocast, Triton kernels); a short run of "
        "a few optimizer steps, median of the per-step records after the warm-up steps. MFU "
        "counts the PaLM FLOPs (attention included) over the dense bf16 peak. Target: 1.1b "
        ">= 45 % MFU on H100/H200-class GPUs.",
        "",
        "| preset | params | micro batch x accum | act. ckpt | attention | tokens/s | MFU | "
        "peak memory |",
        "|---|---:|---|---|---|---:|---:|---:|",
    ]
    for name in ("train_130m", "train_1.1b"):
        r = rows.get(name)
        why = _not_ok(r)
        if why:
            lines.append(f"| {name.removeprefix('train_')} | {why} | | | | | | |")
            continue
        d = r["details"]
        mfu = f"{d['mfu']:.1%}" if d["mfu"] is not None else "n/a"
        mem = f"{d['peak_memory_gib']} GiB" if d["peak_memory_gib"] is not None else "n/a"
        lines.append(
            f"| {d['preset']} | {_params(d['params'])} | {d['micro_batch']} x {d['grad_accum']} | "
            f"{'on' if d['activation_checkpointing'] else 'off'} | {d['attention']} | "
            f"{d['tokens_per_s']:,.0f} | {mfu} | {mem} |"
        )
    return lines


def _md_eval(r: dict) -> list[str]:
    runs = r["details"]["runs"]
    hf = r["details"]["transformers_compared"]
    lines = [
        "`evaluate()` (fused output projection + per-token NLL) on synthetic documents, "
        "bf16 weights, non-overlapping windows of the preset's length"
        + (
            ", against transformers' `CohereForCausalLM` (same weights, SDPA, logits + "
            "cross_entropy) in alternating rounds."
            if hf
            else " (transformers not installed: ours only)."
        ),
        "",
        "| preset | tokens | ours (tokens/s) | transformers (tokens/s) | ratio | NLL rel. diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for x in runs:
        lines.append(
            f"| {x['preset']} | {x['tokens']:,} | {x['tokens_per_s_ours']:,.0f} | "
            + (
                f"{x['tokens_per_s_transformers']:,.0f} | {x['ratio']:.2f}x | "
                f"{x['nll_rel_diff']:.1e} |"
                if "ratio" in x
                else "- | - | - |"
            )
        )
    return lines


def _md_merge_eval(r: dict) -> list[str]:
    d = r["details"]
    return [
        f"What the study runner's `Scorer` does per mixture: `ModelPool.merge_into` ({d['units']} "
        f"fp32 unit models of the {d['preset']} preset resident on {r['device']}, backend "
        f"`{d['merge_backend']}`) then `evaluate()` of the live model on {d['eval_tokens']:,} "
        f"tokens; {d['mixtures']} random mixtures after a warm-up.",
        "",
        "| merges/s | merge ms | eval ms | merge share | eval tokens/s | pool load s |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {_num(d['merges_per_s'])} | {_num(d['merge_ms'])} | {_num(d['eval_ms'])} | "
        f"{d['merge_share']:.1%} | {d['eval_tokens_per_s']:,.0f} | {d['pool_load_s']:.1f} |",
    ]


def _md_nccl(r: dict) -> list[str]:
    d = r["details"]
    lines = [
        f"`all_reduce(SUM)` of fp32 tensors over {d['world_size']} ranks ({d['backend']}), best "
        "of the repetitions; bus bandwidth = algbw x 2 (n - 1) / n.",
        "",
        "| size | algbw GB/s | busbw GB/s |",
        "|---:|---:|---:|",
    ]
    lines += [
        f"| {s['size_mb']:g} MB | {s['algbw_gbps']} | {s['busbw_gbps']} |" for s in d["sizes"]
    ]
    return lines


SECTIONS = [  # (title, row, renderer)
    ("## GPU merge kernels", "merge_kernels", _md_merge),
    ("## GPU Triton kernels", "triton_kernels", _md_kernels),
    ("## GPU evaluation", "eval", _md_eval),
    ("## GPU merge-eval rate", "merge_eval", _md_merge_eval),
    ("## GPU NCCL all-reduce", "nccl", _md_nccl),
]


def markdown(meta: dict, summary: list[dict], rows: dict) -> str:
    parts = [_md_suite(meta, summary, rows), ["## GPU training step", "", *_md_train(rows)]]
    for title, name, render in SECTIONS:
        r = rows.get(name)
        why = _not_ok(r)
        parts.append([title, "", why] if why else [title, "", *render(r)])
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


def write_reports(out_dir: str, meta: dict) -> tuple[dict, str]:
    """Write ``summary.json`` and ``benchmarks_gpu.md``; returns (summary, text table)."""
    rows = load_rows(out_dir)
    summary = summary_rows(rows)
    meta = {"device": _devices((rows.get("env") or {}).get("details", {})), **meta}
    write_json(os.path.join(out_dir, "summary.json"), {**meta, "rows": summary})
    md = markdown(meta, summary, rows)
    tmp = os.path.join(out_dir, f"benchmarks_gpu.md.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(md)
    os.replace(tmp, os.path.join(out_dir, "benchmarks_gpu.md"))
    return {**meta, "rows": summary}, table(summary)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out_dir = sys.argv[1]
    old = {}
    path = os.path.join(out_dir, "summary.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    meta = {
        k: old.get(k)
        for k in ("command", "dry_run", "budget_s", "elapsed_s", "finished", "exit_code")
    }
    meta["date"] = old.get("date") or datetime.date.today().isoformat()
    meta = {k: (0 if v is None and k.endswith("_s") else v) for k, v in meta.items()}
    meta["command"] = meta["command"] or "bash benchmarks/gpu_suite.sh"
    _, text = write_reports(out_dir, meta)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
