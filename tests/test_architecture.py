"""The package's shape: which subpackage may import which, no import cycles, short functions.

Every import is counted, module-level or inside a function, because the lazy imports
this package uses to keep start-up fast are still dependencies. The allowed
directions are the package map of docs/architecture.md.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "megablocks_ablate"
PKG = "megablocks_ablate"

# layer -> the layers it may import (itself always allowed). "." are top-level modules.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "utils": {"errors"},
    "_ext": {"errors"},
    "config": {"errors", "utils"},
    "checkpoint": {"errors", "utils"},
    "kernels": {"errors", "utils", "_ext"},
    "data": {"errors", "utils", "config", "_ext"},
    # the built-in demo corpora: JSONL writers, used by the demo (ablate) only
    "corpora": {"errors", "utils", "config"},
    "model": {"errors", "utils", "config", "kernels", "checkpoint", "data"},
    "merge": {"errors", "utils", "config", "_ext", "kernels", "checkpoint", "data", "model"},
    "evaluate": {"errors", "utils", "config", "kernels", "checkpoint", "data", "model"},
    "train": {"errors", "utils", "config", "kernels", "checkpoint", "data", "model"},
    "ablate": {
        "errors",
        "utils",
        "config",
        "kernels",
        "checkpoint",
        "data",
        "corpora",
        "model",
        "merge",
        "evaluate",
        "train",
    },
    # the notebook API (api.py): reads studies and builds mixtures; no model code
    "api": {"errors", "utils", "config", "data", "ablate"},
}
TOP = {"cli", "commands", "__main__"}  # entry points: may import anything
ROOT_INIT = "__init__"  # the package root holds only __version__: anyone may import it
COMPILED = {"_C": "_ext", "_C_cuda": "_ext"}  # extension modules, loaded only by _ext
# Only the study runner (and the entry points) reach into train/.
TRAIN_USERS = ("megablocks_ablate.ablate.runner",)


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (absolute names)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If)
        and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for n in ast.walk(block)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: not an import at run time
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PKG))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(PKG):
                continue
            # `from pkg import sub` imports the submodule pkg.sub when it exists
            for a in node.names:
                sub = f"{target}.{a.name}"
                sub_path = ROOT.parent / sub.replace(".", "/")
                if (
                    sub_path.with_suffix(".py").exists()
                    or sub_path.is_dir()
                    or (target == PKG and a.name in COMPILED)
                ):
                    found.add(sub)
                else:
                    found.add(target)
    return {f for f in found if f != mod}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return ROOT_INIT
    return COMPILED.get(parts[1], parts[1])


def test_every_module_belongs_to_a_known_layer():
    layers = {_layer(m) for m in _graph()}
    known = set(ALLOWED) | TOP | {ROOT_INIT}
    assert layers <= known, sorted(layers - known)


def test_imports_follow_the_package_map():
    bad = []
    for mod, deps in _graph().items():
        layer = _layer(mod)
        if layer in TOP:
            continue
        for dep in deps:
            target = _layer(dep)
            if target in (layer, ROOT_INIT):
                continue
            if target not in ALLOWED[layer]:
                bad.append(f"{mod} imports {dep} ({layer} may not import {target})")
            elif target == "train" and not mod.startswith(TRAIN_USERS):
                bad.append(f"{mod} imports {dep} (only the study runner imports train)")
    assert not bad, "\n".join(sorted(bad))


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a path that ends where it starts), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_modules():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle of concern
    edges = {
        m: {d for d in deps if d in graph and not (m.startswith(d + ".") and d != PKG)}
        for m, deps in graph.items()
    }
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_no_import_cycle_between_layers():
    layer_graph: dict[str, set[str]] = {}
    for mod, deps in _graph().items():
        if _layer(mod) in TOP:
            continue
        layer_graph.setdefault(_layer(mod), set()).update(
            _layer(d)
            for d in deps
            if _layer(d) not in (_layer(mod), ROOT_INIT) and _layer(d) not in TOP
        )
    assert _cycle(layer_graph) is None, " -> ".join(_cycle(layer_graph) or [])


@pytest.mark.parametrize(
    "graph,expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ],
)
def test_cycle_finder(graph, expected):
    assert _cycle(graph) == expected


MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n >= MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({n})")
    assert not long, "\n".join(long)
