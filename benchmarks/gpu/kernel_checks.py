"""Correctness checks of the GPU suite's kernel rows, as plain functions (CPU-testable).

A kernel is compared with its PyTorch reference on the same inputs, forward and
backward, against the ground truth: the reference run on the inputs upcast (bf16 ->
fp32, fp32 -> fp64). Error = max |x - truth| / max |truth| per output and per input
gradient (the largest over the gradients). The kernel is **accurate** when its error
is at most twice the reference's own error plus a tolerance (fp32: 1e-5; bf16: 2^-8,
one bf16 rounding step of the largest value, so a kernel whose fp32 internals differ
slightly from the reference's may round the other way). A non-finite value, or an
output of another shape, is an infinite error.

Large shapes (past 2^31 elements, where a 32-bit offset wraps): the kernel runs on the
whole tensor, forward and backward (the upstream gradient in the kernel's dtype, so no
fp32 copy of a 4 GB tensor is made), and is judged on windows of rows -- the first
rows, the rows around each 2^31-element boundary, the last rows -- against the
reference and the truth run on those rows alone. Row-wise ops make that exact. Before
anything is allocated, :func:`plan_large` compares each case's memory need
(:class:`LargeSpec`, bytes computed from the shapes) with the free memory and skips it
with the reason when it does not fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

GIB = 1 << 30
INT32_LIMIT = 1 << 31  # elements: where a signed 32-bit offset wraps
LARGE_MARGIN = 1.15  # allocator slack over the computed need
LARGE_RESERVE = GIB  # left free beside it (CUDA context, cuBLAS workspaces)


def tolerance(dtype) -> float:
    """The accuracy tolerance of :func:`judge` for a kernel computing in ``dtype``."""
    import torch

    return 1e-5 if dtype in (torch.float32, torch.float64) else 2.0**-8


def truth_dtype(dtype):
    import torch

    return torch.float64 if dtype == torch.float32 else torch.float32


@dataclass
class Case:
    """One kernel check: ``kernel(*inputs)`` vs ``reference(*inputs)``. Inputs with
    ``requires_grad`` get their gradients compared. ``row_inputs``: indices of the
    inputs whose dim 0 is the row (sliced for a window); the rest are passed whole.
    Outputs are row-wise along dim 0 (large checks)."""

    name: str
    inputs: list
    kernel: Callable
    reference: Callable
    backward: bool = True
    row_inputs: tuple[int, ...] | None = None  # None: every input


@dataclass
class Result:
    """A forward output and the gradients of the inputs that require one (in order)."""

    out: object
    grads: list = field(default_factory=list)


def rel_err(got, truth) -> float:
    """max |got - truth| / max |truth|; inf for another shape or a non-finite value."""
    import torch

    if got is None or tuple(got.shape) != tuple(truth.shape):
        return math.inf
    g, t = got.double(), truth.double()
    if not bool(torch.isfinite(g).all()):
        return math.inf
    if g.numel() == 0:
        return 0.0
    scale = float(t.abs().max())
    return float((g - t).abs().max()) / (scale if scale > 0 else 1.0)


def make_upstream(shape, dtype, device, seed: int = 1):
    """The upstream gradient: normal values in the kernel's dtype (exact in fp32 too)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


def forward_backward(fn: Callable, inputs: Sequence, upstream) -> Result:
    """``fn(*inputs)`` on fresh leaves and, when ``upstream`` is given, the gradients of
    ``<fn(*inputs), upstream>`` with respect to the inputs that require one."""
    xs = [
        x.detach().requires_grad_(x.requires_grad) if hasattr(x, "requires_grad") else x
        for x in inputs
    ]
    want = [x for x in xs if getattr(x, "requires_grad", False)]
    y = fn(*xs)
    if upstream is None or not want:
        return Result(y.detach())
    y.backward(upstream.to(y.dtype))
    return Result(y.detach(), [x.grad for x in want])


def upcast(inputs: Sequence, dtype) -> list:
    """Floating inputs as ``dtype`` leaves (same ``requires_grad``); others as they are."""
    return [
        x.detach().to(dtype).requires_grad_(x.requires_grad) if x.is_floating_point() else x
        for x in inputs
    ]


def judge(kernel: Result, reference: Result, truth: Result, tol: float) -> dict:
    """Errors of the kernel's and the reference's results against the truth, and
    whether the kernel is accurate (see the module doc). Plain numbers, JSON-ready."""
    res = {
        "fwd_err_kernel": rel_err(kernel.out, truth.out),
        "fwd_err_reference": rel_err(reference.out, truth.out),
    }
    phases = ["fwd"]
    if truth.grads:
        if len(kernel.grads) != len(truth.grads):
            res["bwd_err_kernel"] = math.inf
        else:
            res["bwd_err_kernel"] = max(rel_err(a, b) for a, b in zip(kernel.grads, truth.grads))
        res["bwd_err_reference"] = max(rel_err(a, b) for a, b in zip(reference.grads, truth.grads))
        phases.append("bwd")
    res["accurate"] = all(
        res[f"{p}_err_kernel"] <= 2 * res[f"{p}_err_reference"] + tol for p in phases
    )
    return res


def check(case: Case, dtype, tol: float | None = None) -> dict:
    """Kernel vs reference vs truth on the whole of ``case``'s inputs."""
    tol = tolerance(dtype) if tol is None else tol
    probe = case.reference(*[x.detach() for x in case.inputs])
    up = make_upstream(probe.shape, probe.dtype, probe.device) if case.backward else None
    del probe
    truth = forward_backward(case.reference, upcast(case.inputs, truth_dtype(dtype)), up)
    kernel = forward_backward(case.kernel, case.inputs, up)
    reference = forward_backward(case.reference, case.inputs, up)
    return {**judge(kernel, reference, truth, tol), "tolerance": tol}


# ---- large shapes ------------------------------------------------------------------------


@dataclass
class LargeSpec:
    """A check past 2^31 elements, before anything is allocated: ``need_bytes`` (from
    the shapes), ``rows`` along dim 0, the dim-0 rows where a tensor the kernel indexes
    passes ``limit`` elements, and ``build()`` making the :class:`Case`."""

    name: str
    need_bytes: int
    rows: int
    boundaries: list[int]
    build: Callable[[], Case]
    window: int = 8  # rows per window
    elements: int = 0  # of the largest tensor the kernel indexes


def boundary_rows(rows: int, per_row_elements: Sequence[int], limit: int = INT32_LIMIT) -> list:
    """For each tensor of ``per_row_elements`` elements per dim-0 row: the row holding
    its element number ``limit`` (when it has that many)."""
    return sorted({limit // e for e in per_row_elements if e > 0 and limit // e < rows})


def windows(spec: LargeSpec) -> list[slice]:
    """Rows judged: the first, around each boundary, the last (merged, in order)."""
    w, n = spec.window, spec.rows
    spans = [(0, min(w, n))]
    spans += [(max(0, b - w // 2), min(n, b + w - w // 2)) for b in spec.boundaries]
    spans.append((max(0, n - w), n))
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [slice(a, b) for a, b in out]


def plan_large(specs: Sequence[LargeSpec], free_bytes: int | None) -> list[dict]:
    """Run or skip each large check: it runs when ``need x 1.15 + 1 GiB`` fits the free
    memory (``None``: unknown, skipped). One spec at a time is resident (each is freed
    before the next), so each is compared with the whole free memory."""
    out = []
    for s in specs:
        want = int(s.need_bytes * LARGE_MARGIN) + LARGE_RESERVE
        rec = {"kernel": s.name, "need_gib": round(want / GIB, 2), "elements": s.elements}
        if free_bytes is None:
            rec.update(run=False, reason="free memory unknown")
        elif want > free_bytes:
            rec.update(
                run=False,
                reason=f"needs {want / GIB:.1f} GiB, {free_bytes / GIB:.1f} GiB free",
            )
        else:
            rec.update(run=True, reason=None)
        out.append(rec)
    return out


def _rows(case: Case, sl: slice) -> list:
    idx = range(len(case.inputs)) if case.row_inputs is None else case.row_inputs
    return [x[sl] if i in idx else x for i, x in enumerate(case.inputs)]


def check_large(case: Case, spec: LargeSpec, dtype, tol: float | None = None) -> dict:
    """The kernel on the whole of ``case``'s inputs, judged on :func:`windows` against
    the reference and the truth run on those rows (see the module doc)."""
    tol = tolerance(dtype) if tol is None else tol
    idx = range(len(case.inputs)) if case.row_inputs is None else case.row_inputs
    graded = [i for i, x in enumerate(case.inputs) if getattr(x, "requires_grad", False)]
    if any(i not in idx for i in graded):
        raise ValueError(f"{case.name}: a large check compares row inputs' gradients only")
    xs = [
        x.detach().requires_grad_(x.requires_grad) if hasattr(x, "requires_grad") else x
        for x in case.inputs
    ]
    y = case.kernel(*xs)
    up = make_upstream(y.shape, y.dtype, y.device) if case.backward and graded else None
    if up is not None:
        y.backward(up)
    y = y.detach()
    grads = [xs[i].grad for i in graded] if up is not None else []
    parts = []
    for sl in windows(spec):
        sub = Case(case.name, _rows(case, sl), case.kernel, case.reference, case.backward)
        sub_up = up[sl] if up is not None else None
        kernel = Result(y[sl], [g[sl] for g in grads])
        truth = forward_backward(case.reference, upcast(sub.inputs, truth_dtype(dtype)), sub_up)
        reference = forward_backward(case.reference, sub.inputs, sub_up)
        parts.append({"rows": [sl.start, sl.stop], **judge(kernel, reference, truth, tol)})
    worst = {
        k: max(p[k] for p in parts)
        for k in ("fwd_err_kernel", "fwd_err_reference", "bwd_err_kernel", "bwd_err_reference")
        if k in parts[0]
    }
    return {
        **worst,
        "accurate": all(p["accurate"] for p in parts),
        "tolerance": tol,
        "rows": spec.rows,
        "elements": spec.elements,
        "windows": parts,
    }
