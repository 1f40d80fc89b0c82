"""Typed dataclass configs: YAML in, YAML out, `key=value` overrides.

Every config in the project is a dataclass deriving from :class:`Config`. Fields
carry their documentation in ``field(metadata={"help": ...})`` (see :func:`doc`) so
``megablocks-ablate <cmd> --print-config`` can show it. Loading validates types
field by field; every error names the dotted path of the bad field and, when it
came from a file, the file::

    cfg = PreprocessConfig.load("configs/data/s2orc.yaml", ["workers=8", "unit_tokens=50M"])
    cfg.save("run/preprocess.yaml")   # round-trips exactly

Supported field types: bool, int, float, str, Optional[T], list[T], tuple[T, ...],
dict[str, T], Literal[...], Enum subclasses and nested Config dataclasses.

A config file may start from another one: ``base: <preset name or YAML path>`` (see
:meth:`Config.load_preset`), and :meth:`Config.to_commented_yaml` writes a config
back with every field's doc as a comment (``--print-config``, ``config show``).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import enum
import importlib.resources
import logging
import math
import os
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import (
    Any,
    ClassVar,
    Literal,
    NamedTuple,
    TypeVar,
    Union,
    get_args,
    get_origin,
)

import yaml

from megablocks_ablate.errors import ConfigError, MBAError
from megablocks_ablate.utils.atomic import atomic_write_text
from megablocks_ablate.utils.cli_types import parse_count_text

C = TypeVar("C", bound="Config")
logger = logging.getLogger(__name__)
_REPORTED_NO_OPS: set[str] = set()  # overrides already reported as changing nothing


def doc(help: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a help string (shown by ``--print-config``)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


_COUNT_HINT = "expected a token count like 50M, 1.5B or 200000"


def parse_count(value: Any, name: str = "value") -> int:
    """Parse a non-negative token/sample count: ``50000000``, ``"50M"``, ``"1.5B"``, ``"2k"``.

    Decimal multipliers (k=1e3, M=1e6, B/G=1e9, T=1e12) as used for token budgets. Anything
    else (``"abc"``, ``-5``, ``"1.5x"``, ``True``) raises :class:`ConfigError` saying what a
    valid count looks like.
    """
    n: Any = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str):
        n = parse_count_text(value)  # the one count grammar (the CLI's too)
    if n is None or n < 0:
        raise ConfigError(f"{name}: {_COUNT_HINT}, got {value!r}")
    return n


class Count(int):
    """Marker type for int fields that also accept '50M'-style strings."""


def _type_name(tp: Any) -> str:
    if tp is Count:
        return "count (e.g. 50M)"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` (from YAML or an override) to type ``tp`` or raise ConfigError."""
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # Optional[T]: T's own message says what a valid value is
            raise errors[0]
        raise ConfigError(f"{path}: expected {_readable_type(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
    if origin in (list, tuple, Iterable) or tp in (list, tuple):
        if isinstance(value, str) and origin is not None:
            value = [value]  # a single item for a list field ("input=a.jsonl")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return tp.from_dict(value, _path=path)  # type: ignore[attr-defined]  # a Config
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(
                f"{path}: expected one of {[e.value for e in tp]}, got {value!r}"
            ) from None
    if tp is Count:
        return parse_count(value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        return _coerce_float(value, path)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def _coerce_float(value: Any, path: str) -> float:
    """A finite number (``nan``/``inf`` refused, naming the field)."""
    x: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        x = float(value)
    elif isinstance(value, str):  # YAML reads "1e-4" as a string
        with contextlib.suppress(ValueError):
            x = float(value)
    if x is None:
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if not math.isfinite(x):
        raise ConfigError(f"{path}: expected a finite number, got {value!r}")
    return x


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optimizer.lr=3e-4"`` -> (["optimizer", "lr"], 3e-4). Values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. model.n_layers=4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(
    data: dict,
    overrides: Iterable[str],
    *,
    report_no_ops: bool = False,
    reference: dict | None = None,
) -> dict:
    """Apply dotted ``key=value`` overrides to a plain nested dict (in place).

    An override whose value is already there (in ``reference``, e.g. ``data`` with the
    defaults filled in, else in ``data``) changes nothing; with ``report_no_ops`` (for
    overrides a user typed, not a program's own) that is logged as a warning, once per
    override text and process, so that it is not taken for one that did something."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
            node = child
        if report_no_ops:
            ref = _lookup(reference, keys) if reference is not None else _MISSING
            ref = _lookup(data, keys) if ref is _MISSING else ref
            if ref is not _MISSING and _same_value(ref, value):
                report_no_op(text, f"{'.'.join(keys)} is already {ref!r}")
        node[keys[-1]] = value
    return data


_MISSING = object()


def _lookup(tree: dict, keys: list[str]) -> Any:
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return _MISSING
        tree = tree[k]
    return tree


def _same_value(old: Any, new: Any) -> bool:
    # True == 1 in Python; an override of a flag by a number (or back) is not a no-op
    return type(old) is type(new) and old == new


def report_no_op(override: str, why: str) -> None:
    """Warn that the override ``override`` changes nothing, and why (once per process)."""
    if override in _REPORTED_NO_OPS:
        return
    _REPORTED_NO_OPS.add(override)
    logger.warning("override %s changes nothing: %s", override, why)


# ---- files, presets and `base:` inheritance --------------------------------------------

BASE_KEY = "base"  # a config file's "start from this other file" key (see Config.load_preset)

_PRESET_FILES = contextlib.ExitStack()  # presets extracted from a zipped install, if any
atexit.register(_PRESET_FILES.close)


def shipped_preset_dir(kind: str) -> Path:
    """The shipped presets of ``kind`` (``train``, ``model``, ``studies``): the package data
    ``megablocks_ablate/configs/<kind>/``, read through :mod:`importlib.resources` so that
    it is found in any install, not only next to a source checkout. In a normal install
    it is a real directory; from a zip it is extracted once, for the life of the process."""
    res = importlib.resources.files("megablocks_ablate") / "configs" / kind
    if isinstance(res, Path):
        return res
    return Path(_PRESET_FILES.enter_context(importlib.resources.as_file(res)))


def known_presets(preset_dir: str | os.PathLike) -> list[str]:
    """Preset names in ``preset_dir``; ``_``-prefixed files are shared bases, not presets."""
    try:
        names = os.listdir(preset_dir)
    except FileNotFoundError:
        return []
    return sorted(f[:-5] for f in names if f.endswith(".yaml") and not f.startswith("_"))


def yaml_error_line(e: yaml.YAMLError) -> str:
    """A YAML parse error in one line: ``invalid YAML at line 3, column 5: <problem>``."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    return f"invalid YAML{at}: {' '.join(str(problem).split())}"


def _read_mapping(path: str) -> dict:
    """The top-level mapping of one YAML file (errors name the file)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {yaml_error_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    return data


def merge_dicts(base: dict, delta: dict) -> dict:
    """``delta`` over ``base`` (a new dict): mappings merge key by key, recursively;
    anything else, lists and null included, replaces the base value."""
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def _find_base(name: Any, referrer: str, preset_dir: str | None) -> str:
    """The file a ``base:`` value names: a YAML path (relative to the file naming it), or
    a preset name looked up beside that file, then in ``preset_dir``."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"{referrer}: {BASE_KEY}: expected a preset name or a YAML path, got {name!r}"
        )
    here = os.path.dirname(os.path.abspath(referrer))
    if name.endswith((".yaml", ".yml")):
        candidates = [os.path.join(here, os.path.expanduser(name))]
    else:
        dirs = [here] + ([preset_dir] if preset_dir else [])
        candidates = list(dict.fromkeys(os.path.join(d, f"{name}.yaml") for d in dirs))
    for path in candidates:
        if os.path.isfile(path):
            return path
    known = f" (known presets: {', '.join(known_presets(preset_dir))})" if preset_dir else ""
    raise ConfigError(f"{referrer}: {BASE_KEY} {name!r}: no {' or '.join(candidates)}{known}")


def read_config_file(
    path: str | os.PathLike,
    preset_dir: str | os.PathLike | None = None,
    base_key: str | None = BASE_KEY,
    _chain: tuple[str, ...] = (),
) -> dict:
    """A config file's plain data with its ``base:`` chain merged in, base first.

    The chain is followed recursively; a file met twice is a cycle, an error naming the
    file and the chain. ``base_key=None`` reads the file as it is.
    """
    path = os.fspath(path)
    real = os.path.realpath(path)
    if real in _chain:
        cycle = " -> ".join(os.path.basename(p) for p in (*_chain[_chain.index(real) :], real))
        raise ConfigError(f"{path}: {BASE_KEY} cycle: {cycle}")
    data = _read_mapping(path)
    if base_key is None or base_key not in data:
        return data
    pdir = os.fspath(preset_dir) if preset_dir is not None else None
    base_path = _find_base(data.pop(base_key), path, pdir)
    return merge_dicts(read_config_file(base_path, pdir, base_key, (*_chain, real)), data)


# ---- describing and printing -------------------------------------------------------------


class FieldDoc(NamedTuple):
    """One row of :meth:`Config.describe`."""

    name: str  # dotted path, e.g. optimizer.lr
    type: str  # readable type, e.g. "int | null"
    default: str  # the default as inline YAML; "(required)"; "" for a section
    help: str  # the field's doc (a section without one: its class docstring)


def _inline(value: Any) -> str:
    """``value`` as one line of flow-style YAML (``null``, ``[0.9, 0.95]``, ``auto``)."""
    text = yaml.safe_dump([_to_plain(value)], default_flow_style=True, width=float("inf"))
    return text.strip()[1:-1]


def _readable_type(tp: Any) -> str:
    """A short type name for people: ``int | null``, ``seed|unit|seq``, ``list[str]``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        return " | ".join("null" if a is type(None) else _readable_type(a) for a in args)
    if origin in (list, tuple):
        return f"list[{_readable_type(args[0]) if args else 'any'}]"
    if origin is dict:
        return f"dict[str, {_readable_type(args[1]) if len(args) == 2 else 'any'}]"
    return _type_name(tp)


def _field_help(f: dataclasses.Field, tp: Any) -> str:
    """A field's doc; an undocumented nested config falls back to its class docstring."""
    text = f.metadata.get("help", "")
    if not text and isinstance(tp, type) and dataclasses.is_dataclass(tp):
        text = (tp.__doc__ or "").strip().split("\n\n")[0]
        text = "" if text.startswith(f"{tp.__name__}(") else " ".join(text.split())
    return text


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _comment(text: str, indent: str, width: int = 88) -> list[str]:
    """``text`` as ``# `` comment lines wrapped to ``width`` columns."""
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(indent) + 2 + len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return [f"{indent}# {ln}" for ln in lines]


def _dump_field(name: str, value: Any) -> list[str]:
    """``name: value`` as YAML lines: a short collection on one line (flow style)."""
    plain = _to_plain(value)
    if isinstance(plain, (list, dict)):
        line = f"{name}: {_inline(plain)}"
        if len(line) <= 88 or not plain:
            return [line]
    text = yaml.safe_dump(
        {name: plain},
        sort_keys=False,
        default_flow_style=False,
        width=float("inf"),
        allow_unicode=True,
    )
    return text.rstrip("\n").split("\n")


def _commented_lines(cfg: Config, indent: str, trailing: bool = False) -> list[str]:
    """YAML lines of ``cfg``, each field's doc a comment above it (``trailing``: after
    it), followed by the configs ``cfg`` refers to (commented, never read back)."""
    hints = typing.get_type_hints(type(cfg))
    lines: list[str] = []
    refs, ref_error = cfg._safe_references()
    after_section = False
    for f in dataclasses.fields(cfg):
        value, text = getattr(cfg, f.name), _field_help(f, hints[f.name])
        section = isinstance(value, Config) and bool(dataclasses.fields(value))
        if not trailing and lines and (section or after_section):
            lines.append("")  # a blank line around each section
        after_section = section
        if section:
            body = _commented_lines(value, indent + "  ", trailing)
            head = [f"{indent}{f.name}:"]
        else:
            body, head = [], [indent + ln for ln in _dump_field(f.name, value)]
        if trailing and text:
            head[0] = f"{head[0].ljust(len(indent) + 24)}  # {text}"
        elif text:
            lines.extend(_comment(text, indent))
        lines.extend(head + body)
        if f.name in refs:
            title, ref = refs[f.name]
            lines.extend(_comment(title, indent))
            lines.extend(
                f"{indent}#   {ln[len(indent) :]}"
                for ln in _commented_lines(ref, indent, trailing=True)
            )
    if ref_error:
        lines.extend(_comment(f"(referenced configs not resolved: {ref_error})", indent))
    return lines


@dataclasses.dataclass
class Config:
    """Base of all configs: typed loading, YAML round trip, overrides."""

    # where ``base: <name>`` also looks for presets (a subclass with presets sets it)
    preset_dir: ClassVar[str | os.PathLike | None] = None

    @classmethod
    def from_dict(cls: type[C], data: dict, _path: str = "") -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{_path or cls.__name__}: expected a mapping, got {data!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            where = f"{_path}." if _path else ""
            raise ConfigError(
                f"unknown field {where}{unknown[0]} for {cls.__name__} "
                f"(known: {', '.join(sorted(fields))})"
            )
        kwargs = {}
        for name, f in fields.items():
            fpath = f"{_path}.{name}" if _path else name
            if name in data:
                kwargs[name] = _coerce(data[name], hints[name], fpath)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required field {fpath} ({cls.__name__})")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{_path + ': ' if _path else ''}{e}") from None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise ConfigError naming the field. Override as needed."""

    def to_dict(self) -> dict:
        return _to_plain(self)

    def replace(self: C, overrides: Iterable[str]) -> C:
        return type(self).from_dict(apply_overrides(self.to_dict(), overrides))

    @classmethod
    def _file_loaded(cls, data: dict, path: str) -> None:
        """Hook: adjust the data read from ``path`` (its ``base:`` chain merged) before
        the overrides apply; nothing by default (a study spec resolves its paths)."""

    @classmethod
    def load(
        cls: type[C],
        path: str | os.PathLike | None = None,
        overrides: Iterable[str] = (),
        preset_dir: str | os.PathLike | None = None,
        *,
        report_no_ops: bool = False,
    ) -> C:
        """Load from a YAML file (or defaults when ``path`` is None) plus overrides
        (``report_no_ops``: warn of those that change nothing, see :func:`apply_overrides`).

        The file's ``base:`` chain is merged in first (see :meth:`load_preset`); a base
        given by name is looked up beside the file, then in ``preset_dir`` (default: the
        class's :attr:`preset_dir`), so a YAML of one's own may start from a preset.
        """
        data: dict = {}
        if path is not None:
            own = {f.name for f in dataclasses.fields(cls)}
            data = read_config_file(
                path,
                preset_dir if preset_dir is not None else cls.preset_dir,
                base_key=None if BASE_KEY in own else BASE_KEY,
            )
            cls._file_loaded(data, os.fspath(path))
        overrides = list(overrides)
        reference = cls.filled(data, overrides) if report_no_ops else None
        apply_overrides(data, overrides, report_no_ops=report_no_ops, reference=reference)
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}" if path else str(e)) from None

    @classmethod
    def filled(cls, data: dict, overrides: Iterable[str] = ()) -> dict | None:
        """``data`` with the defaults filled in, as plain data, to tell which overrides
        change nothing; None when there are no overrides or ``data`` alone is no valid
        config (overrides may complete it)."""
        if not overrides:
            return None
        try:
            return cls.from_dict(copy.deepcopy(data)).to_dict()
        except MBAError:
            return None

    @classmethod
    def load_preset(
        cls: type[C],
        preset_dir: str | os.PathLike,
        name: str | os.PathLike,
        overrides: Iterable[str] = (),
        what: str = "preset",
        *,
        report_no_ops: bool = False,
    ) -> C:
        """``<preset_dir>/<name>.yaml`` (or ``name`` itself when it is a YAML path, or a
        JSON one such as a checkpoint's ``config.json``: JSON is YAML) plus overrides; an
        unknown name lists the known presets.

        Presets derive from one another: ``base: <preset name or YAML path>`` at the top
        of a file starts it from that file's resolved data, and the file says only what
        differs. Resolved recursively (cycles are an error naming the file); nested
        mappings merge key by key, lists and scalars replace (``null`` too), and
        ``key=value`` overrides apply last, to the merged result. Decision for
        ``configs/train/``: ``_common.yaml`` holds what every preset shares (``_`` files
        are bases only, never listed); ``<model>_seed`` is ``base: _common`` plus the
        model's recipe, ``<model>_unit`` is ``base: <model>_seed`` plus the continued-
        pretraining deltas, ``<model>_seq`` is ``base: <model>_unit`` plus the mixture.
        """
        path = os.fspath(name)
        if not path.endswith((".yaml", ".yml", ".json")):
            path = os.path.join(os.fspath(preset_dir), f"{path}.yaml")
            if not os.path.isfile(path):
                raise ConfigError(
                    f"{what} {os.fspath(name)!r}: no {path} "
                    f"(known presets: {', '.join(known_presets(preset_dir))})"
                )
        return cls.load(path, overrides, preset_dir=preset_dir, report_no_ops=report_no_ops)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_yaml())

    def references(self) -> dict[str, tuple[str, Config]]:
        """Configs this one names rather than holds (a train config's model preset), to
        show resolved after a field: ``{field: (title, config)}``; none by default."""
        return {}

    def _safe_references(self) -> tuple[dict[str, tuple[str, Config]], str]:
        """:meth:`references`, or ``({}, why)`` when one does not resolve: printing a
        config must not fail on, say, a model YAML that is not there yet."""
        try:
            return self.references(), ""
        except MBAError as e:
            return {}, str(e)

    def to_commented_yaml(self) -> str:
        """YAML with each field's doc as a comment above it; loads back to an equal config.

        :meth:`references` follow their field as a commented block, resolved: shown to be
        read by people, never read back (the config keeps its preset name).
        """
        return "\n".join(_commented_lines(self, "")) + "\n"

    @classmethod
    def describe(cls, _prefix: str = "") -> list[FieldDoc]:
        """(dotted name, type, default, help) of every field; a nested config is a
        section row (empty default) followed by its own fields."""
        out: list[FieldDoc] = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, name = hints[f.name], _prefix + f.name
            text = _field_help(f, tp)
            if isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, Config):
                out.append(FieldDoc(name, tp.__name__, "", text))
                out.extend(tp.describe(name + "."))
                continue
            default = _default_of(f)
            shown = "(required)" if default is dataclasses.MISSING else _inline(default)
            out.append(FieldDoc(name, _readable_type(tp), shown, text))
        return out
