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
    ("attention", "(g) attention backends vs the default"),
    ("ce_chunks", "(h) cross-entropy chunking vs the fixed rule"),
    ("train_130m", "(c) training step, 130m"),
    ("train_1.1b", "(c) training step, 1.1b"),
    ("train_1.1b_compile", "(c) training step, 1.1b compiled"),
    ("train_1.1b_mb8", "(c) training step, 1.1b at micro batch 8"),
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


def _err(k: dict, phase: str) -> str:
    if f"{phase}_err_kernel" not in k:
        return "-"
    return f"{k[f'{phase}_err_kernel']:.1e} / {k[f'{phase}_err_reference']:.1e}"


def _ok(k: dict) -> str:
    if k.get("error"):
        return f"NO ({k['error'][:80]})"
    return {True: "yes", False: "NO", None: "-"}[k.get("accurate")]


def _md_kernels(r: dict) -> list[str]:
    d = r["details"]
    shapes = "; ".join(
        f"{p}: d_model {s['d']}, {s['heads']} heads of {s['hd']}, SwiGLU {s['mlp']}, "
        f"vocabulary {s['vocab']:,}"
        for p, s in d["shapes"].items()
    )
    lines = [
        f"{d['dtype']}, {d['shapes'][d['presets'][-1]]['rows']:,} tokens per check ({shapes}). "
        "Error = max |x - truth| / max |truth| against the reference run in fp32 on the same "
        "inputs; the kernel is accurate when its error is <= 2x the reference's + 2^-8 (a "
        "bf16 step). Past 2^31 elements the kernel runs on the whole tensor and is judged on "
        "windows of rows (first, around the boundary, last). Times at the last preset: "
        f"median of {d['reps']}.",
        "",
        "| shape | kernel | fwd err (kernel / ref) | bwd err (kernel / ref) | accurate |",
        "|---|---|---|---|---|",
    ]
    for preset, checks in d["checks"].items():
        for k in checks:
            lines.append(
                f"| {preset} | {k['kernel']} | {_err(k, 'fwd')} | {_err(k, 'bwd')} | {_ok(k)} |"
            )
    limit = d.get("large_limit_elements", 2**31)
    past = "> 2^31" if limit == 2**31 else f"> {limit:,} (not 2^31: dry run)"
    for k in d["large"]:
        where = f"{past}: {k['elements']:,} el."
        if not k.get("run"):
            lines.append(f"| {where} | {k['kernel']} | skipped: {k['reason']} | | - |")
            continue
        lines.append(
            f"| {where} | {k['kernel']} | {_err(k, 'fwd')} | {_err(k, 'bwd')} | {_ok(k)} |"
        )
    lines += [
        "",
        "| kernel | fwd ms (kernel / ref) | fwd+bwd ms (kernel / ref) | fwd+bwd speed-up |",
        "|---|---|---|---:|",
    ]
    for k in d["kernels"]:
        if "fwd_ms_kernel" not in k:
            lines.append(f"| {k['kernel']} | {k.get('speed_error', '-')} | | |")
            continue
        fb = (
            f"{k['fwd_bwd_ms_kernel']:.3f} / {k['fwd_bwd_ms_reference']:.3f}"
            if "fwd_bwd_ms_kernel" in k
            else "-"
        )
        sp = k.get("fwd_bwd_speedup", k["fwd_speedup"])
        lines.append(
            f"| {k['kernel']} | {k['fwd_ms_kernel']:.3f} / {k['fwd_ms_reference']:.3f} | {fb} "
            f"| {sp:.2f}x |"
        )
    return lines


def _md_attention(r: dict) -> list[str]:
    lines = [
        "`dispatch.attention` as the model calls it, under each `MBA_ATTENTION` value that "
        "can run here (auto shows what it resolved to), bf16, causal; error of the output "
        "and q/k/v gradients against SDPA's math kernel in fp32 (accurate: <= 2x the bf16 "
        "math kernel's + 2^-8).",
        "",
        "| preset (batch x seq, heads x dim) | backend | fwd ms | fwd+bwd ms | fwd err | "
        "bwd err | accurate |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for run in r["details"]["runs"]:
        s = run["shape"]
        where = f"{run['preset']} ({s['batch']} x {s['seq']}, {s['heads']} x {s['hd']})"
        for name, b in run["backends"].items():
            if not b["available"]:
                lines.append(f"| {where} | {name} | unavailable: {b['reason']} | | | | - |")
                continue
            label = f"{name} ({b['runs']})" if name == "auto" else name
            fwd = f"{b['fwd_ms']:.3f}" if "fwd_ms" in b else "-"
            fb = f"{b['fwd_bwd_ms']:.3f}" if "fwd_bwd_ms" in b else "-"
            lines.append(
                f"| {where} | {label} | {fwd} | {fb} | {_err(b, 'fwd')} | {_err(b, 'bwd')} "
                f"| {_ok(b)} |"
            )
    return lines


def _md_ce_chunks(r: dict) -> list[str]:
    lines = [
        "Fused linear + cross-entropy (Triton row step), bf16 hidden states, fp32 master "
        "weight: `MBA_CE_CHUNKS=auto` (chunks from the shapes, 8 warps) against `legacy` "
        "(chunk logits no larger than the hidden states, 4 warps); both checked against "
        "full fp32 logits.",
        "",
        "| shape | legacy: chunks x rows, warps | auto: chunks x rows, warps | legacy ms | "
        "auto ms | speed-up | accurate (legacy / auto) |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for run in r["details"]["runs"]:
        a, b = run["modes"]["auto"], run["modes"]["legacy"]

        def cfg(m):
            return f"{m['chunks']} x {m['chunk_rows']}, {m['num_warps']}" if "chunks" in m else "-"

        def ms(m):
            return f"{m['fwd_bwd_ms']:.2f}" if "fwd_bwd_ms" in m else "-"

        sp = f"{run['speedup']:.2f}x" if "speedup" in run else "-"
        lines.append(
            f"| {run['shape']} | {cfg(b)} | {cfg(a)} | {ms(b)} | {ms(a)} | {sp} | "
            f"{_ok(b)} / {_ok(a)} |"
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
    for name in ("train_130m", "train_1.1b", "train_1.1b_mb8"):
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
    mb8 = rows.get("train_1.1b_mb8")
    if mb8 and mb8["status"] == "ok" and mb8["details"].get("speedup_vs_baseline"):
        d = mb8["details"]
        lines += [
            "",
            f"Micro batch {d['micro_batch']} against the default ({d['baseline']['source']}, "
            f"micro batch {d['baseline'].get('micro_batch')}): {d['speedup_vs_baseline']:.2f}x "
            "tokens/s.",
        ]
    return lines


def _md_eval(r: dict) -> list[str]:
    runs = r["details"]["runs"]
    hf = r["details"]["transformers_compared"]
    lines = [
        "`evaluate()` (fused output projection + per-token NLL) on synthetic documents, "
        "bf16 weights, non-overlapping windows of the preset's length"
        + (
            ", against transformers' `CohereForCausalLM` (same weights loaded with "
            "`strict=True`, SDPA, logits + cross_entropy) in alternating rounds. Checks "
            "(a failure when exceeded): mean NLL relative difference <= 2^-8 in bf16; "
            "per-token NLL of both models upcast to fp32 <= 1e-3 nats max, 1e-4 RMS."
            if hf
            else " (transformers not installed: ours only, nothing checked)."
        ),
        "",
        "| preset | tokens | ours (tokens/s) | transformers (tokens/s) | ratio | mean NLL rel. "
        "diff | fp32 per-token max / RMS | timed dtype per-token max / RMS (not judged) | checks |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for x in runs:
        if "tokens_per_s_ours" not in x:
            lines.append(f"| {x['preset']} | | | | | | | | FAILED: {'; '.join(x['failures'])} |")
            continue
        row = f"| {x['preset']} | {x['tokens']:,} | {x['tokens_per_s_ours']:,.0f} | "
        if "ratio" not in x:
            lines.append(row + "- | - | - | - | - | - |")
            continue
        c = x["checks"]
        fp32 = c["per_token_fp32"]
        low = c.get(f"per_token_{x['dtype']}", {})
        low_text = f"{low['max_abs']:.1e} / {low['rms']:.1e}" if low else "-"
        verdict = "ok" if x["checks_ok"] else "FAILED: " + "; ".join(x["failures"])
        lines.append(
            row + f"{x['tokens_per_s_transformers']:,.0f} | {x['ratio']:.2f}x | "
            f"{x['nll_rel_diff']:.1e} | {fp32['max_abs']:.1e} / {fp32['rms']:.1e} | "
            f"{low_text} | {verdict} |"
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
    ("## GPU attention backends", "attention", _md_attention),
    ("## GPU cross-entropy chunking", "ce_chunks", _md_ce_chunks),
    ("## GPU evaluation", "eval", _md_eval),
    ("## GPU merge-eval rate", "merge_eval", _md_merge_eval),
    ("## GPU NCCL all-reduce", "nccl", _md_nccl),
]


def markdown(meta: dict, summary: list[dict], rows: dict) -> str:
    parts = [_md_suite(meta, summary, rows), ["## GPU training step", "", *_md_train(rows)]]
    for title, name, render in SECTIONS:
        r = rows.get(name)
        why = _not_ok(r)
        if why and r is not None and r["status"] == "failed" and r.get("details"):
            try:  # a check that failed loudly: its figures under the reason
                parts.append([title, "", f"**{why}**", "", *render(r)])
                continue
            except (KeyError, TypeError, ValueError):
                pass
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
