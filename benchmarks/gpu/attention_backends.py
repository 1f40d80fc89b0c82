"""Row ``attention``: each attention backend against the default, at the presets' micro batches.

The switch is ``MBA_ATTENTION`` (megablocks_ablate/kernels/dispatch.py): ``auto`` (the
default: cuDNN SDPA on Hopper when torch has it, else flash-attn 2 when installed, else
SDPA's own choice), or one named backend: ``sdpa``, ``math``, ``cudnn``, ``flash2``,
``fa3``. For each preset (``--presets``, default 130m and 1.1b, at their seed presets'
micro batch x 2048 tokens; bf16) and each backend that can run here (the others are
listed with dispatch's one-line reason):

* accuracy: causal attention forward and the q/k/v gradients, through
  ``dispatch.attention`` as the model calls it (q and k views of one RoPE output, v a
  view of the projection), against SDPA's math kernel run in fp32 on the same values
  (kernel_checks.py: error <= 2x the bf16 math kernel's own + 2^-8);
* speed: forward and forward + backward, median of ``--reps``.

Key figure: ``auto``'s fwd+bwd time against plain ``sdpa`` (what ``auto`` did on a GPU
without flash-attn before the switch) at the last preset; target ``auto`` at least as
fast. The row **fails** when a backend that runs is inaccurate or raises.
"""

from __future__ import annotations

import sys

from common import median, parser, run_row, target, time_fn
from kernel_checks import Case, check

BACKENDS = ("auto", "sdpa", "cudnn", "flash2", "fa3", "math")
TINY = dict(batch=2, seq=16, heads=2, kv_heads=2, hd=8)


def shapes(preset: str) -> dict:
    """``[batch, seq, heads, head_dim]`` of one micro batch of ``<preset>_seed``."""
    if preset == "tiny":
        return dict(TINY)
    from megablocks_ablate.model import ModelConfig
    from megablocks_ablate.train.config import TrainConfig

    c = ModelConfig.from_preset(preset)
    t = TrainConfig.from_preset(f"{preset}_seed")
    return dict(
        batch=t.micro_batch, seq=t.seq_len, heads=c.n_heads, kv_heads=c.n_kv_heads, hd=c.head_dim
    )


def make_case(s: dict, backend: str, dtype, dev) -> Case:
    """``dispatch.attention`` under ``backend`` vs under ``math`` (the reference)."""
    import torch

    from megablocks_ablate.kernels import dispatch

    g = torch.Generator(device=dev).manual_seed(0)
    b, t, h, kv, hd = s["batch"], s["seq"], s["heads"], s["kv_heads"], s["hd"]
    qk = torch.randn(b, t, h + kv, hd, generator=g, device=dev, dtype=dtype).requires_grad_()
    v = torch.randn(b, t, 3 * kv * hd, generator=g, device=dev, dtype=dtype).requires_grad_()

    def run(name):
        def fn(qk, v):
            q, k = qk.split([h, kv], dim=2)
            with dispatch.attention_backend(name):
                return dispatch.attention(q, k, v[..., : kv * hd].unflatten(-1, (kv, hd)))

        return fn

    return Case(f"attention[{backend}]", [qk, v], run(backend), run("math"))


def speed(case: Case, dev, reps: int, warmup: int) -> dict:
    import torch

    xs = [x.detach().requires_grad_() for x in case.inputs]

    def fwd():
        with torch.no_grad():
            case.kernel(*xs)

    def fwd_bwd():
        for x in xs:
            x.grad = None
        case.kernel(*xs).sum().backward()

    return {
        "fwd_ms": 1e3 * median(time_fn(fwd, dev, reps, warmup)),
        "fwd_bwd_ms": 1e3 * median(time_fn(fwd_bwd, dev, reps, warmup)),
    }


def run_preset(preset: str, dtype, dev, reps: int, warmup: int) -> dict:
    import torch

    from megablocks_ablate.errors import ConfigError
    from megablocks_ablate.kernels import dispatch

    s = shapes(preset)
    out: dict = {"preset": preset, "shape": s, "backends": {}}
    for name in BACKENDS:
        rec: dict = {}
        try:
            rec["runs"] = dispatch.resolve_attention(dev, dtype, name)
        except ConfigError as e:
            out["backends"][name] = {"available": False, "reason": str(e)}
            continue
        try:
            case = make_case(s, name, dtype, dev)
            rec.update(check(case, dtype))
            rec.update(speed(case, dev, reps, warmup))
        except Exception as e:  # raised at run time: the switch is broken here
            rec.update(accurate=False, error=f"{type(e).__name__}: {e}"[:400])
        out["backends"][name] = {"available": True, **rec}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def summarize(runs: list[dict]) -> dict:
    """The row's JSON: failed when any backend that runs is inaccurate or raised."""
    bad = [
        f"{r['preset']} {name}" + (f" ({b['error']})" if "error" in b else "")
        for r in runs
        for name, b in r["backends"].items()
        if b["available"] and not b["accurate"]
    ]
    last = runs[-1]["backends"]
    auto, sdpa = last.get("auto", {}), last.get("sdpa", {})
    ratio = None
    if "fwd_bwd_ms" in auto and "fwd_bwd_ms" in sdpa:
        ratio = sdpa["fwd_bwd_ms"] / auto["fwd_bwd_ms"]
    parts = []
    for name, b in last.items():
        if "fwd_bwd_ms" in b:
            parts.append(f"{name}{'=' + b['runs'] if name == 'auto' else ''} {b['fwd_bwd_ms']:.2f}")
    text = f"{runs[-1]['preset']} fwd+bwd ms: " + ", ".join(parts)
    if ratio is not None:
        text += f"; auto {ratio:.2f}x sdpa"
    tgt = target("auto fwd+bwd at least as fast as sdpa (speed-up >= 1)", ">=", 1.0)
    out = {
        "key": {"name": "auto_speedup_vs_sdpa", "value": ratio, "unit": "x", "text": text},
        "target": tgt,
        "met": (ratio >= 1.0) if ratio is not None else None,
        "details": {"backends": list(BACKENDS), "runs": runs},
    }
    if bad:
        out.update(status="failed", reason=f"inaccurate: {'; '.join(bad)}"[:300])
    return out


def body(args) -> dict:
    import torch

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else getattr(torch, args.cpu_dtype)
    presets = args.presets or (["tiny"] if args.dry_run else ["130m", "1.1b"])
    return summarize([run_preset(p, dtype, dev, args.reps, args.warmup) for p in presets])


if __name__ == "__main__":
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=None, help="default: 130m 1.1b (dry: tiny)")
    ap.add_argument("--cpu-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    sys.exit(run_row("attention", ap, body))
