"""Every Triton kernel computes its program-id-derived offsets in 64-bit.

``tl.program_id`` is an int32, and so is everything computed from it with other
int32 values (kernel int arguments are int32 unless their value needs 64 bits). An
offset such as ``X + row * stride`` therefore wraps once ``row * stride`` passes
2**31 elements -- at 1.1B-parameter shapes that is ~150K tokens per forward -- and
the kernel reads and writes out of bounds on a GPU. The CPU interpreter computes in
64-bit and cannot see it, so this test reads the kernels' *source*.

The rule, checked on every ``@triton.jit`` function of every module in
``megablocks_ablate/kernels/`` (parsed with :mod:`ast`, statements in source order):

* A value is *int32 program-id-derived* ("narrow") if it is a ``tl.program_id(...)``
  call, a name last assigned a narrow value, a ``for`` variable over a ``range`` with a
  narrow bound and no 64-bit one, or an arithmetic/unary/subscript expression with a
  narrow operand and no 64-bit one.
* A value is *64-bit* ("wide") if it is ``x.to(tl.int64)`` / ``x.to(tl.uint64)`` /
  ``tl.cast(x, tl.int64)`` (a cast to any other type keeps ``x``'s class), a name last assigned a wide value, or arithmetic with a
  wide operand (int32 op int64 promotes to int64 in Triton, ``for`` variables too).
* Anything else (arguments, ``tl.arange``, loads, other calls) is neither.
* **Violation:** any multiplication ``a * b`` (or ``a *= b``) where one operand is
  narrow and neither is wide. A row index times a stride or width, a block index
  times ``BLOCK`` over a flat tensor, a head index times a head size: all are
  flagged. Cast the program id (or the row index) first:
  ``row = tl.program_id(0).to(tl.int64)``.

The rule is deliberately stricter than "can this product overflow at the shapes we
run" (a column block index times ``BLOCK`` stays small): one cast per kernel is
cheaper than an argument about every operand's bound.
"""

from __future__ import annotations

import ast
import os
import re
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNEL_DIR = os.path.join(ROOT, "megablocks_ablate", "kernels")

NARROW, WIDE = "narrow", "wide"
_WIDE_DTYPES = {"int64", "uint64"}


def _is_jit(fn: ast.FunctionDef) -> bool:
    """``@triton.jit`` / ``@triton.jit(...)`` / ``@jit`` (any decorator ending in ``jit``)."""
    for dec in fn.decorator_list:
        node = dec.func if isinstance(dec, ast.Call) else dec
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
        if name == "jit":
            return True
    return False


def _is_wide_dtype(node: ast.AST) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
    return name in _WIDE_DTYPES


class _Checker:
    def __init__(self, fn: ast.FunctionDef):
        self.fn = fn
        self.env: dict[str, str | None] = {}
        self.violations: list[str] = []

    # -- expression classification -----------------------------------------------------
    def kind(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "program_id":
                return NARROW
            if isinstance(func, ast.Attribute) and func.attr == "to":
                if node.args and _is_wide_dtype(node.args[0]):
                    return WIDE
                return self.kind(func.value)  # .to(tl.int32) etc. keep it narrow
            if isinstance(func, ast.Attribute) and func.attr == "cast" and len(node.args) > 1:
                return WIDE if _is_wide_dtype(node.args[1]) else self.kind(node.args[0])
            return None
        if isinstance(node, ast.BinOp):
            return self.combine(self.kind(node.left), self.kind(node.right))
        if isinstance(node, ast.UnaryOp):
            return self.kind(node.operand)
        if isinstance(node, ast.Subscript):
            return self.kind(node.value)
        return None

    @staticmethod
    def combine(*kinds: str | None) -> str | None:
        if WIDE in kinds:
            return WIDE
        if NARROW in kinds:
            return NARROW
        return None

    def check_mult(self, node: ast.AST, left: ast.AST, right: ast.AST) -> None:
        kinds = (self.kind(left), self.kind(right))
        if NARROW in kinds and WIDE not in kinds:
            self.violations.append(
                f"{self.fn.name}:{node.lineno}: int32 program-id value in "
                f"`{ast.unparse(node)}` (cast with .to(tl.int64) first)"
            )

    def scan_expr(self, node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Mult):
                self.check_mult(sub, sub.left, sub.right)

    # -- statements, in source order -----------------------------------------------------
    def run(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.Assign):
                self.scan_expr(stmt.value)
                k = self.kind(stmt.value)
                for target in stmt.targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            self.env[name.id] = k if isinstance(target, ast.Name) else None
            elif isinstance(stmt, ast.AnnAssign):
                if stmt.value is not None:
                    self.scan_expr(stmt.value)
                    if isinstance(stmt.target, ast.Name):
                        self.env[stmt.target.id] = self.kind(stmt.value)
            elif isinstance(stmt, ast.AugAssign):
                self.scan_expr(stmt.value)
                if isinstance(stmt.op, ast.Mult):
                    self.check_mult(stmt, stmt.target, stmt.value)
                if isinstance(stmt.target, ast.Name):
                    self.env[stmt.target.id] = self.combine(
                        self.kind(stmt.target), self.kind(stmt.value)
                    )
            elif isinstance(stmt, ast.For):
                self.scan_expr(stmt.iter)
                k = None
                it = stmt.iter
                if isinstance(it, ast.Call):  # range / tl.range / tl.static_range
                    k = self.combine(*(self.kind(a) for a in it.args))
                for name in ast.walk(stmt.target):
                    if isinstance(name, ast.Name):
                        self.env[name.id] = k
                self.run(stmt.body)
                self.run(stmt.orelse)
            elif isinstance(stmt, (ast.If, ast.While)):
                self.scan_expr(stmt.test)
                self.run(stmt.body)
                self.run(stmt.orelse)
            elif isinstance(stmt, ast.With):
                for item in stmt.items:
                    self.scan_expr(item.context_expr)
                self.run(stmt.body)
            else:  # Expr (tl.store ...), Return, Assert, ...
                self.scan_expr(stmt)


def violations_in_source(source: str) -> list[str]:
    """Violations of the module-doc rule in every jit function of ``source``."""
    tree = ast.parse(textwrap.dedent(source))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and _is_jit(node):
            checker = _Checker(node)
            checker.run(node.body)
            found += checker.violations
    return found


def _kernel_modules() -> list[str]:
    return sorted(f for f in os.listdir(KERNEL_DIR) if f.endswith(".py"))


def _jit_names(source: str) -> set[str]:
    return {
        n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and _is_jit(n)
    }


@pytest.mark.parametrize("module", _kernel_modules())
def test_kernel_offsets_are_64bit(module):
    with open(os.path.join(KERNEL_DIR, module)) as f:
        source = f.read()
    found = violations_in_source(source)
    assert not found, f"{module}: int32 offsets that can overflow:\n" + "\n".join(found)


def test_scan_sees_every_jit_function():
    """The AST scan finds every JITFunction the kernel package defines (none are
    made another way, e.g. ``triton.jit(fn)`` called on a function from elsewhere)."""
    triton = pytest.importorskip("triton")
    import importlib

    for module in _kernel_modules():
        with open(os.path.join(KERNEL_DIR, module)) as f:
            scanned = _jit_names(f.read())
        mod = importlib.import_module(f"megablocks_ablate.kernels.{module[:-3]}")
        jitted = {
            name
            for name, obj in vars(mod).items()
            if isinstance(obj, triton.runtime.JITFunction) and obj.fn.__module__ == mod.__name__
        }
        assert jitted <= scanned, f"{module}: jit functions not scanned: {jitted - scanned}"
    assert _jit_names(open(os.path.join(KERNEL_DIR, "swiglu.py")).read())  # scan is not vacuous


BAD_KERNELS = {
    "row_times_stride": """
        @triton.jit
        def k(X, Y, stride_row, N, BLOCK: tl.constexpr):
            row = tl.program_id(0)
            cols = tl.arange(0, BLOCK)
            x = tl.load(X + row * stride_row + cols, mask=cols < N)
            tl.store(Y + row * N + cols, x, mask=cols < N)
    """,
    "inline_block_start": """
        @triton.jit
        def k(X, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(X + offs, 0.0, mask=offs < n)
    """,
    "derived_index": """
        @triton.jit
        def k(X, T, stride_b, stride_t):
            pid = tl.program_id(0)
            b = pid // T
            t = pid % T
            tl.store(X + b * stride_b + t * stride_t, 0.0)
    """,
    "loop_over_rows": """
        @triton.jit
        def k(X, n_rows, N, n_programs):
            pid = tl.program_id(0)
            for row in range(pid, n_rows, n_programs):
                tl.store(X + row * N, 0.0)
    """,
    "cast_to_int32_is_not_64bit": """
        @triton.jit
        def k(X, N):
            row = tl.program_id(0).to(tl.int32)
            tl.store(X + row * N, 0.0)
    """,
    "augmented_multiply": """
        @triton.jit
        def k(X, N):
            off = tl.program_id(0)
            off *= N
            tl.store(X + off, 0.0)
    """,
}

GOOD_KERNEL = """
    @triton.jit
    def k(X, Y, T, n_rows, N, n_programs, stride_row, stride_b, stride_t, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + row * stride_row + offs, tl.load(X + row * N + offs))
        pid = tl.cast(tl.program_id(2), tl.int64)
        b = pid // T
        t = pid % T
        tl.store(X + b * stride_b + t * stride_t, 0.0)
        for r in range(pid, n_rows, n_programs):
            tl.store(X + r * N + tl.arange(0, BLOCK) * 2, 0.0)
        tl.store(Y + tl.program_id(0), 0.0)  # an index with no multiply is fine

    def not_a_kernel(i, n):
        return i * n
"""


@pytest.mark.parametrize("name", sorted(BAD_KERNELS))
def test_check_catches_synthetic_bad_kernel(name):
    assert violations_in_source(BAD_KERNELS[name]), name


def test_check_accepts_64bit_kernel():
    assert violations_in_source(GOOD_KERNEL) == []


def _cuda_sources() -> list[str]:
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "csrc")):
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".cu")]
    return sorted(out)


def restrict_in_kernel_signatures(source: str) -> list[str]:
    """``__global__`` signatures (up to their ``{``) that mark a pointer ``__restrict__``."""
    return [
        " ".join(m.group(0).split())
        for m in re.finditer(r"__global__[^{;]*[{;]", source)
        if "restrict" in m.group(0)
    ]


def test_cuda_kernels_take_no_restrict_pointers():
    """A merge's ``out`` may alias an input (merge/kernels.py contract), so no CUDA
    kernel parameter may be ``__restrict__`` (see the comment above merge_kernel)."""
    sources = _cuda_sources()
    assert any(s.endswith("merge.cu") for s in sources)
    for path in sources:
        with open(path) as f:
            found = restrict_in_kernel_signatures(f.read())
        assert not found, f"{os.path.relpath(path, ROOT)}: {found}"
    bad = "__global__ void __launch_bounds__(256)\nk(void* __restrict__ out, int n) {}"
    assert restrict_in_kernel_signatures(bad)
