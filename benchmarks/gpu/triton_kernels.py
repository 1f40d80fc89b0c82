"""Row ``triton_kernels``: every Triton kernel checked against its PyTorch reference, and timed.

For each kernel of ``megablocks_ablate/kernels`` (LayerNorm, RMSNorm, per-head QK-norm,
RoPE, SwiGLU, fused linear + cross-entropy, merge), in bf16:

* at each preset's shapes (``--presets``, default 130m and 1.1b: d_model, heads and
  head_dim, SwiGLU hidden and padded vocabulary of ``configs/model/<preset>.yaml``, an
  8 x 2048-token micro batch): forward output and backward input/weight gradients of
  the kernel and of the reference against the truth (kernel_checks.py: accurate when
  the kernel's error is <= 2x the reference's own + 2^-8);
* past 2^31 elements (``--large``, at the last preset's widths): each kernel on a
  tensor whose flat offsets pass 2^31, judged on windows of rows (first, around the
  boundary, last) against the reference on those rows; run only where the computed
  memory need fits the free GPU memory, else skipped with the figures;
* speed at the last preset's shapes: forward and forward + backward, median of ``--reps``.

RoPE and SwiGLU take strided column views, as the model's fused input projection gives
them. The row **fails** (status failed, exit code 1, every error in the JSON) when any
kernel is inaccurate or raises; a skipped large check does not fail it. Speed-ups are
reported, not required. Dry run: the tiny shapes on CPU (Triton interpreter) with the
large checks at a 2^13-element limit, so their code runs too.
"""

from __future__ import annotations

import math
import sys

from common import median, parser, run_row, target, time_fn
from kernel_checks import (
    INT32_LIMIT,
    Case,
    LargeSpec,
    boundary_rows,
    check,
    check_large,
    plan_large,
)

TARGET = target("every kernel's fwd/bwd error <= 2x the reference's own + tol")
TOKENS = 8 * 2048  # an 8-sequence micro batch at the presets' 2048
TINY = dict(rows=32, d=32, heads=2, kv_heads=2, hd=8, batch=2, mlp=32, vocab=67)
DRY_LIMIT = 1 << 13  # the dry run's stand-in for 2^31 elements


def preset_shapes(preset: str) -> dict:
    """The model preset's widths at an 8 x 2048-token micro batch (``tiny``: hand-made)."""
    if preset == "tiny":
        return dict(TINY)
    from megablocks_ablate.model import ModelConfig

    c = ModelConfig.from_preset(preset)
    return dict(
        rows=TOKENS,
        d=c.d_model,
        heads=c.n_heads,
        kv_heads=c.n_kv_heads,
        hd=c.head_dim,
        batch=TOKENS // c.max_seq_len,
        mlp=c.mlp_hidden,
        vocab=c.padded_vocab_size,
    )


def _kernels():
    from megablocks_ablate.kernels import cross_entropy as ce
    from megablocks_ablate.kernels import norm, rope, swiglu
    from megablocks_ablate.kernels.merge_reference import merge_into_reference
    from megablocks_ablate.kernels.merge_triton import merge_into_triton

    return ce, norm, rope, swiglu, merge_into_reference, merge_into_triton


def _randn(g, dtype, dev, *shape, scale=1.0, grad=True):
    import torch

    t = torch.randn(*shape, generator=g, device=dev, dtype=dtype)
    if scale != 1.0:
        t.mul_(scale)
    return t.requires_grad_(grad)


def _norm_weight(g, dtype, dev, *shape, grad=True):
    return _randn(g, dtype, dev, *shape, scale=0.1, grad=False).add_(1).requires_grad_(grad)


def _merge(fn, ws, dev):
    import torch

    return lambda *xs: fn(torch.empty(xs[0].numel(), dtype=torch.float32, device=dev), xs, ws)


def make_cases(s: dict, dtype, dev) -> list[Case]:
    """Every kernel at the shapes ``s`` (:func:`preset_shapes`)."""
    import torch

    ce, norm, rope, swiglu, merge_ref, merge_tri = _kernels()
    g = torch.Generator(device=dev).manual_seed(0)
    rows, d, h, kv, hd = s["rows"], s["d"], s["heads"], s["kv_heads"], s["hd"]
    t = rows // s["batch"]
    cos, sin = rope.rope_tables(t, hd, 10000.0, device=dev)
    qk_heads = h + kv
    # q|k heads as a column view of the wider projection output (strided, like the model's)
    qk_wide = _randn(g, dtype, dev, s["batch"], t, (h + 2 * kv) * hd)
    gu_wide = _randn(g, dtype, dev, rows, d + 2 * s["mlp"])
    labels = torch.randint(0, s["vocab"], (rows,), generator=g, device=dev)
    labels[:: max(1, rows // 16)] = ce.IGNORE_INDEX
    n_merge = 8
    merge_in = [_randn(g, dtype, dev, rows * d // 4, grad=False) for _ in range(n_merge)]
    ws = [1.0 / n_merge + 0.01 * i for i in range(n_merge)]

    def qk(x):  # the strided q|k view the model hands to RoPE
        return x[..., : qk_heads * hd].unflatten(-1, (qk_heads, hd))

    def norm_case(name, x, w, kind):
        return Case(
            name,
            [x, w],
            lambda x, w: norm.norm_triton(x, w, 1e-5, kind),
            lambda x, w: norm.norm_reference(x, w, 1e-5, kind),
        )

    return [
        norm_case(
            "layernorm", _randn(g, dtype, dev, rows, d), _norm_weight(g, dtype, dev, d), "layernorm"
        ),
        norm_case(
            "rmsnorm", _randn(g, dtype, dev, rows, d), _norm_weight(g, dtype, dev, d), "rmsnorm"
        ),
        norm_case(
            "qk_norm (per-head layernorm)",
            _randn(g, dtype, dev, rows, qk_heads, hd),
            _norm_weight(g, dtype, dev, qk_heads, hd),
            "layernorm",
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
            [_randn(g, dtype, dev, rows, d), _randn(g, dtype, dev, s["vocab"], d, scale=d**-0.5)],
            lambda x, w: ce.linear_cross_entropy(x, w, labels, impl="triton"),
            lambda x, w: ce.linear_cross_entropy_reference(x, w, labels),
        ),
        Case(
            "merge (8 inputs)",
            merge_in,
            _merge(merge_tri, ws, dev),
            _merge(merge_ref, ws, dev),
            False,
        ),
    ]


def large_specs(s: dict, dtype, dev, limit: int = INT32_LIMIT) -> list[LargeSpec]:
    """Each kernel on a tensor past ``limit`` elements at the widths ``s``, as
    :class:`LargeSpec` (memory need from the shapes; nothing allocated until built)."""
    import torch

    ce, norm, rope, swiglu, merge_ref, merge_tri = _kernels()
    b = torch.empty((), dtype=dtype).element_size()
    d, h, kv, hd, m, v = s["d"], s["heads"], s["kv_heads"], s["hd"], s["mlp"], s["vocab"]
    t = s["rows"] // s["batch"]
    qk_heads = h + kv

    def past(per_row: int, extra: int) -> int:  # rows so that rows * per_row > limit
        return limit // per_row + extra

    def g():
        return torch.Generator(device=dev).manual_seed(0)

    def norm_spec(name, width, w_shape, kind):
        rows = past(width, 64)
        per = rows * width

        def build():
            gen = g()
            x = _randn(gen, dtype, dev, rows, *w_shape)
            w = _norm_weight(gen, dtype, dev, *w_shape, grad=False)
            return Case(
                name,
                [x, w],
                lambda x, w: norm.norm_triton(x, w, 1e-5, kind),
                lambda x, w: norm.norm_reference(x, w, 1e-5, kind),
                row_inputs=(0,),
            )

        # x, y, upstream, dx
        return LargeSpec(
            name, 4 * per * b, rows, boundary_rows(rows, [width], limit), build, 8, per
        )

    wide_w = (h + 2 * kv) * hd
    qk_w = qk_heads * hd
    rope_batch = past(t * qk_w, 1)  # the output passes the limit too (the input earlier)

    def rope_build():
        gen = g()
        x = _randn(gen, dtype, dev, rope_batch, t, wide_w)
        cos, sin = rope.rope_tables(t, hd, 10000.0, device=dev)

        def qk(x):
            return x[..., :qk_w].unflatten(-1, (qk_heads, hd))

        return Case(
            "rope (interleaved)",
            [x],
            lambda x: rope.rope_triton(qk(x), cos, sin),
            lambda x: rope.rope_reference(qk(x), cos, sin),
        )

    gu_rows = past(m, 64)

    def swiglu_build():
        x = _randn(g(), dtype, dev, gu_rows, 2 * m)
        return Case("swiglu", [x], swiglu.swiglu_triton, swiglu.swiglu_reference)

    ce_rows = past(v, 64)

    def ce_build():
        gen = g()
        x = _randn(gen, dtype, dev, ce_rows, d)
        w = _randn(gen, dtype, dev, v, d, scale=d**-0.5, grad=False)
        labels = torch.randint(0, v, (ce_rows,), generator=gen, device=dev)

        def kernel(x, lab, w):  # one chunk: its logits pass the limit
            return ce.linear_cross_entropy(
                x, w, lab, reduction="none", chunk_rows=ce_rows, impl="triton"
            )

        def reference(x, lab, w):
            return ce.linear_cross_entropy_reference(x, w, lab, reduction="none")

        return Case("linear_cross_entropy", [x, labels, w], kernel, reference, row_inputs=(0, 1))

    n_merge = limit + 64 * 1024
    ws = [0.3, 0.7]

    def merge_build():
        gen = g()
        xs = [_randn(gen, dtype, dev, n_merge, grad=False) for _ in ws]
        return Case(
            "merge (2 inputs)", xs, _merge(merge_tri, ws, dev), _merge(merge_ref, ws, dev), False
        )

    return [
        norm_spec("layernorm", d, (d,), "layernorm"),
        norm_spec("rmsnorm", d, (d,), "rmsnorm"),
        norm_spec("qk_norm (per-head layernorm)", qk_w, (qk_heads, hd), "layernorm"),
        LargeSpec(  # input, its gradient (the wide shape); output, upstream, dx
            "rope (interleaved)",
            (2 * rope_batch * t * wide_w + 3 * rope_batch * t * qk_w) * b,
            rope_batch,
            boundary_rows(rope_batch, [t * wide_w, t * qk_w], limit),
            rope_build,
            1,
            rope_batch * t * wide_w,
        ),
        LargeSpec(  # gate|up and its gradient; output and upstream
            "swiglu",
            6 * gu_rows * m * b,
            gu_rows,
            boundary_rows(gu_rows, [2 * m, m], limit),
            swiglu_build,
            8,
            gu_rows * 2 * m,
        ),
        LargeSpec(  # one chunk of logits (forward, then again in backward), h, dh, w, fp32 dw
            "linear_cross_entropy",
            ce_rows * v * b + 2 * ce_rows * d * b + v * d * (b + 4) + 16 * ce_rows,
            ce_rows,
            boundary_rows(ce_rows, [v], limit),
            ce_build,
            64,
            ce_rows * v,
        ),
        LargeSpec(
            "merge (2 inputs)",
            n_merge * (4 + 2 * b),
            n_merge,
            boundary_rows(n_merge, [1], limit),
            merge_build,
            1 << 16,
            n_merge,
        ),
    ]


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


def free_bytes(dev) -> int | None:
    """Free memory where the large checks would allocate (CPU: MemAvailable)."""
    import torch

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _release(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _failed(name: str, e: BaseException) -> dict:
    return {"kernel": name, "accurate": False, "error": f"{type(e).__name__}: {e}"[:500]}


def run_checks(presets: list[str], dtype, dev, large: bool, limit: int) -> dict:
    """Accuracy at each preset's shapes and past ``limit`` elements (plain data)."""
    import torch

    by_preset = {}
    for preset in presets:
        results = []
        for case in make_cases(preset_shapes(preset), dtype, dev):
            try:
                results.append({"kernel": case.name, **check(case, dtype)})
            except Exception as e:  # a crash is a failed check, reported with the rest
                results.append(_failed(case.name, e))
            del case
            _release(dev)
        by_preset[preset] = results
    large_res: list[dict] = []
    if large:
        specs = large_specs(preset_shapes(presets[-1]), dtype, dev, limit)
        for spec in specs:
            plan = plan_large([spec], free_bytes(dev))[0]  # free memory now, each in turn
            if not plan["run"]:
                large_res.append({**plan, "accurate": None})
                continue
            try:
                case = spec.build()
                large_res.append({**plan, **check_large(case, spec, dtype)})
                del case
            except Exception as e:
                large_res.append({**plan, **_failed(spec.name, e)})
            _release(dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
    return {"presets": by_preset, "large": large_res}


def body(args) -> dict:
    import torch

    from megablocks_ablate.kernels import dispatch

    if not dispatch.triton_available():
        raise RuntimeError("triton is not installed: no Triton kernel to measure")
    dev = torch.device(args.device)
    if dev.type != "cuda" and not dispatch.interpret_mode():
        raise RuntimeError("Triton kernels on CPU need TRITON_INTERPRET=1")
    dtype = getattr(torch, args.dtype)
    presets = args.presets or (["tiny"] if args.dry_run else ["130m", "1.1b"])
    limit = args.large_limit or (DRY_LIMIT if args.dry_run else INT32_LIMIT)
    checks = run_checks(presets, dtype, dev, args.large == "on", limit)
    timed = []
    for case in make_cases(preset_shapes(presets[-1]), dtype, dev):
        try:
            timed.append({"kernel": case.name, **speed(case, dev, args.reps, args.warmup)})
        except Exception as e:  # the check above already says why
            timed.append({"kernel": case.name, "speed_error": f"{type(e).__name__}: {e}"[:300]})
        _release(dev)
    return summarize(checks, timed, presets, args, limit)


def summarize(checks: dict, timed: list[dict], presets: list[str], args, limit: int) -> dict:
    """The row's JSON from the checks and timings: failed when any check is inaccurate."""
    every = [(p, r) for p, rs in checks["presets"].items() for r in rs]
    every += [("large", r) for r in checks["large"] if r.get("run")]
    bad = [
        f"{p}: {r['kernel']}" + (f" ({r['error']})" if "error" in r else "")
        for p, r in every
        if not r["accurate"]
    ]
    skipped = [f"{r['kernel']}: {r['reason']}" for r in checks["large"] if not r.get("run")]
    timed_ok = [r for r in timed if "fwd_speedup" in r]
    speedups = [r.get("fwd_bwd_speedup", r["fwd_speedup"]) for r in timed_ok]
    geo = math.exp(sum(math.log(x) for x in speedups) / len(speedups)) if speedups else None
    n_ok = len(every) - len(bad)
    last = {c["kernel"]: c for c in checks["presets"][presets[-1]]}  # beside the timings
    text = f"{n_ok}/{len(every)} checks accurate"
    if skipped:
        text += f" ({len(skipped)} large skipped)"
    if geo is not None:
        slowest = min(timed_ok, key=lambda r: r.get("fwd_bwd_speedup", r["fwd_speedup"]))
        text += f"; fwd+bwd speed-up geo-mean {geo:.2f}x, lowest {min(speedups):.2f}x"
        text += f" ({slowest['kernel']})"
    out = {
        "key": {"name": "accurate_checks", "value": n_ok, "unit": "checks", "text": text},
        "target": {**TARGET, "value": len(every), "op": ">="},
        "met": not bad,
        "details": {
            "presets": presets,
            "shapes": {p: preset_shapes(p) for p in presets},
            "dtype": args.dtype,
            "large_limit_elements": limit,
            "reps": args.reps,
            "speedup_geomean": geo,
            "checks": checks["presets"],
            "large": checks["large"],
            "large_skipped": skipped,
            "kernels": [{**r, **last.get(r["kernel"], {})} for r in timed],
        },
    }
    if bad:
        out.update(status="failed", reason=f"inaccurate: {'; '.join(bad)}"[:300])
    return out


if __name__ == "__main__":
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=None, help="default: 130m 1.1b (dry: tiny)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--large", choices=["on", "off"], default="on", help="checks past 2^31")
    ap.add_argument("--large-limit", type=int, default=None, help="elements (default 2^31)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    sys.exit(run_row("triton_kernels", ap, body))
