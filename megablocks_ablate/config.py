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
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import types
import typing
from typing import Any, Iterable, Literal, TypeVar, Union, get_args, get_origin

import yaml

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.atomic import atomic_write_text

C = TypeVar("C", bound="Config")

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtTbB]?)\s*$")
_SIZE_MULT = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}


def doc(help: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a help string (shown by ``--print-config``)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


def parse_count(value: Any, name: str = "value") -> int:
    """Parse a token/sample count: ``50000000``, ``"50M"``, ``"1.5B"``, ``"2k"``.

    Decimal multipliers (k=1e3, M=1e6, B/G=1e9, T=1e12) as used for token budgets.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a count such as 50000000 or '50M', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            n = float(m.group(1)) * _SIZE_MULT[m.group(2).lower()]
            if n.is_integer():
                return int(n)
    raise ConfigError(f"{name}: expected a count such as 50000000 or '50M', got {value!r}")


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
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
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
        return tp.from_dict(value, _path=path)
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


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


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a plain nested dict (in place)."""
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
        node[keys[-1]] = value
    return data


@dataclasses.dataclass
class Config:
    """Base of all configs: typed loading, YAML round trip, overrides."""

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
    def load(cls: type[C], path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> C:
        """Load from a YAML file (or defaults when ``path`` is None) plus overrides."""
        data: dict = {}
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    data = yaml.safe_load(f) or {}
            except FileNotFoundError:
                raise ConfigError(f"{path}: config file not found") from None
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {e}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a mapping at top level")
        apply_overrides(data, overrides)
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}" if path else str(e)) from None

    @classmethod
    def load_preset(cls: type[C], preset_dir: str | os.PathLike, name: str | os.PathLike,
                    overrides: Iterable[str] = (), what: str = "preset") -> C:
        """``<preset_dir>/<name>.yaml`` (or ``name`` itself when it is a YAML path) plus
        overrides; an unknown name lists the known presets."""
        path = os.fspath(name)
        if not path.endswith((".yaml", ".yml")):
            path = os.path.join(os.fspath(preset_dir), f"{path}.yaml")
            if not os.path.isfile(path):
                known = sorted(f[:-5] for f in os.listdir(preset_dir) if f.endswith(".yaml"))
                raise ConfigError(f"{what} {os.fspath(name)!r}: no {path} "
                                  f"(known presets: {', '.join(known)})")
        return cls.load(path, overrides)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_yaml())

    @classmethod
    def describe(cls, _prefix: str = "") -> list[tuple[str, str, str]]:
        """(dotted name, type, help) for every field, nested configs flattened."""
        out = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            name = _prefix + f.name
            if isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, Config):
                out.extend(tp.describe(name + "."))
            else:
                out.append((name, _type_name(tp), f.metadata.get("help", "")))
        return out
