"""The paths of a study spec: resolved against the spec file, recorded relative to it.

A relative path in a study YAML is relative to **the directory of that YAML file**, not
to the working directory, so a study directory (its ``study.yaml``, data and outputs)
can be copied or moved as a whole and used from anywhere (a Slurm job, a notebook, a
``cd`` elsewhere). The paths are ``data``, ``out_dir``, ``seed.checkpoint``, the
``*.config`` and ``validation.model`` values that are YAML/JSON paths (preset names
are names), the path-valued ``key=value`` overrides of ``seed``, ``unit`` and
``validation.train`` (``out_dir``, ``init_from``, ``data.manifest``,
``data.cache_dir``, and ``model`` when it is a YAML path), ``eval.extra`` (a ``NAME=``
prefix kept) and ``eval.paloma.dir``. Absolute paths and ``~`` are taken as given.
``key=value`` overrides on the command line are paths as typed (relative to the working
directory): they do not come from the file.

Two cases keep the working directory, so nothing that worked before breaks:

* a spec shipped inside the package (``configs/studies/``): it cannot know where your
  data is, so its paths are relative to the working directory (run it where the demo
  ran, as its comments say);
* a spec written for the old rule: when its ``data`` is relative, does not exist beside
  the spec, but exists relative to the working directory, every relative path of the
  spec is read from the working directory, with a warning (one base for the whole spec,
  decided by its one required input, so an output never lands beside the spec while
  its data is read from elsewhere). When ``data`` exists in both places the spec's
  directory wins.

:func:`resolve_spec_paths` applies the rule to the mapping read from a file;
:func:`record_spec_paths` writes a spec the other way (the demo's ``study.yaml``, the
results store's copy of the spec).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable

from megablocks_ablate.utils.paths import record_path

logger = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")  # a config reference that is a file, not a preset
OVERRIDE_PATH_KEYS = ("out_dir", "init_from", "data.manifest", "data.cache_dir")
_TRAIN_REFS = (("seed",), ("unit",), ("validation", "train"))

PathFn = Callable[[str, str], str]  # (spec field, path) -> path


def _section(data: dict, keys: tuple[str, ...]) -> dict | None:
    node: object = data
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _map_value(node: dict | None, key: str, field: str, fn: PathFn, config_ref=False) -> None:
    if node is None:
        return
    v = node.get(key)
    if isinstance(v, str) and v and (not config_ref or v.endswith(CONFIG_SUFFIXES)):
        node[key] = fn(field, v)


def _map_override(text: object, field: str, fn: PathFn) -> object:
    if not isinstance(text, str) or "=" not in text:
        return text
    key, raw = text.split("=", 1)
    value = raw.strip()
    is_path = key.strip() in OVERRIDE_PATH_KEYS or (
        key.strip() == "model" and value.endswith(CONFIG_SUFFIXES)
    )
    if not is_path or not value or value in ("null", "~", "None", "''", '""'):
        return text
    return f"{key}={fn(f'{field} {key.strip()}', value)}"


def _map_extra(item: object, field: str, fn: PathFn, exists: Callable[[str], bool]) -> object:
    if not isinstance(item, str) or not item:
        return item
    name, sep, path = item.partition("=")
    if sep and name and "/" not in name and path and not exists(item):  # NAME=PATH
        return f"{name}={fn(field, path)}"
    return fn(field, item)


def map_spec_paths(data: dict, fn: PathFn, exists: Callable[[str], bool]) -> None:
    """Apply ``fn(field, path)`` to every path of the raw spec mapping ``data``, in
    place. ``exists(item)`` tells an ``eval.extra`` file named with ``=`` from a
    ``NAME=PATH`` item (as :func:`megablocks_ablate.evaluate.sets.resolve_sources` does)."""
    _map_value(data, "data", "data", fn)
    _map_value(data, "out_dir", "out_dir", fn)
    seed = _section(data, ("seed",))
    _map_value(seed, "checkpoint", "seed.checkpoint", fn)
    for keys in _TRAIN_REFS:
        node = _section(data, keys)
        where = ".".join(keys)
        _map_value(node, "config", f"{where}.config", fn, config_ref=True)
        if node is not None and isinstance(node.get("overrides"), list):
            node["overrides"] = [
                _map_override(o, f"{where}.overrides[{i}]", fn)
                for i, o in enumerate(node["overrides"])
            ]
    _map_value(_section(data, ("validation",)), "model", "validation.model", fn, config_ref=True)
    ev = _section(data, ("eval",))
    if ev is not None and isinstance(ev.get("extra"), list):
        ev["extra"] = [
            _map_extra(x, f"eval.extra[{i}]", fn, exists) for i, x in enumerate(ev["extra"])
        ]
    _map_value(_section(data, ("eval", "paloma")), "dir", "eval.paloma.dir", fn)


def _shipped(spec_dir: str) -> bool:
    from megablocks_ablate.config import shipped_preset_dir

    try:
        return os.path.samefile(spec_dir, shipped_preset_dir("studies"))
    except OSError:
        return False


def _legacy_cwd(data: dict, spec_file: str, spec_dir: str) -> bool:
    """Whether the spec was written for the old rule (see the module docstring)."""
    value = data.get("data")
    if not isinstance(value, str) or not value:
        return False
    value = os.path.expanduser(value)
    if os.path.isabs(value) or os.path.exists(os.path.join(spec_dir, value)):
        return False
    if not os.path.exists(value) or os.path.samefile(spec_dir or ".", "."):
        return False
    logger.warning(
        "%s: data: %s is not in the spec's directory %s but is in the working directory; "
        "reading every relative path of this spec from the working directory, as before "
        "(relative paths in a spec are relative to the spec file: write them so to use it "
        "from anywhere)",
        spec_file,
        value,
        os.path.abspath(spec_dir or "."),
    )
    return True


def resolve_spec_paths(data: dict, spec_file: str) -> None:
    """Make the relative paths of ``data`` (a spec mapping read from ``spec_file``) paths
    of this process: joined to the spec file's directory as it was given (a spec named
    by a relative path gives relative paths), in place. See the module docstring for the
    two cases that keep them relative to the working directory."""
    spec_dir = os.path.dirname(os.fspath(spec_file))
    if _shipped(spec_dir or ".") or _legacy_cwd(data, spec_file, spec_dir):
        return

    def resolve(field: str, value: str) -> str:
        value = os.path.expanduser(value)
        return value if os.path.isabs(value) else os.path.normpath(os.path.join(spec_dir, value))

    map_spec_paths(data, resolve, lambda item: os.path.exists(resolve("", item)))


def record_spec_paths(spec: dict, spec_file: str, inside: str | None = None) -> dict:
    """A copy of ``spec`` (paths of this process) to write to ``spec_file``: relative
    paths relative to its directory, absolute ones as given, except that a path under
    ``inside`` (a directory written together with the spec, e.g. the demo's output) is
    always recorded relative, so the whole directory can move."""
    out = copy.deepcopy(spec)
    root = os.path.abspath(inside) if inside is not None else None
    base = os.path.dirname(os.path.abspath(spec_file))

    def record(field: str, value: str) -> str:
        if value.startswith("~"):
            return value
        if root is not None and os.path.isabs(value):
            full = os.path.abspath(value)
            if full == root or full.startswith(root + os.sep):
                return os.path.relpath(full, base)
        return record_path(value, spec_file)

    map_spec_paths(out, record, os.path.exists)
    return out
