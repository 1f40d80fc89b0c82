from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from megablocks_ablate.config import Config, Count, doc, parse_count
from megablocks_ablate.errors import ConfigError


@dataclass
class Inner(Config):
    lr: float = doc("learning rate", 1e-3)
    betas: list[float] = doc("AdamW betas", default_factory=lambda: [0.9, 0.95])


@dataclass
class Outer(Config):
    name: str = doc("run name", "x")
    tokens: Count = doc("token budget", 1000)
    mode: Literal["a", "b"] = doc("mode", "a")
    path: Optional[str] = doc("optional path", None)
    inner: Inner = field(default_factory=Inner)

    def validate(self):
        if self.tokens <= 0:
            raise ConfigError(f"tokens: must be positive, got {self.tokens}")


def test_yaml_round_trip(tmp_path):
    cfg = Outer.load(None, ["tokens=50M", "inner.lr=3e-4", "mode=b", "path=/x"])
    assert cfg.tokens == 50_000_000 and cfg.inner.lr == 3e-4 and cfg.mode == "b"
    cfg.save(tmp_path / "c.yaml")
    again = Outer.load(tmp_path / "c.yaml")
    assert again == cfg


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"inner\.lr: expected a number"):
        Outer.load(None, ["inner.lr=fast"])
    with pytest.raises(ConfigError, match=r"unknown field inner\.lrr"):
        Outer.load(None, ["inner.lrr=1"])
    with pytest.raises(ConfigError, match=r"mode: expected one of \['a', 'b'\]"):
        Outer.load(None, ["mode=c"])
    with pytest.raises(ConfigError, match=r"tokens: must be positive"):
        Outer.load(None, ["tokens=0"])
    p = tmp_path / "bad.yaml"
    p.write_text("inner:\n  betas: [0.9, nope]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: inner\.betas\[1\]: expected a number"):
        Outer.load(p)
    with pytest.raises(ConfigError, match="expected key=value"):
        Outer.load(None, ["tokens"])


def test_parse_count():
    assert parse_count("50M") == 50_000_000
    assert parse_count("1.5B") == 1_500_000_000
    assert parse_count("2k") == 2000
    assert parse_count(7) == 7
    with pytest.raises(ConfigError):
        parse_count("lots")


def test_describe_lists_nested_help():
    names = {n: h for n, _, h in Outer.describe()}
    assert names["inner.lr"] == "learning rate"
    assert names["tokens"] == "token budget"
