from dataclasses import dataclass, field
from typing import Literal

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
    path: str | None = doc("optional path", None)
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


@dataclass
class WithOptionalCount(Config):
    budget: Count | None = doc("optional token budget", None)


@pytest.mark.parametrize("raw", ["abc", "-5", "1.5x", "1.5", "true"])
def test_bad_count_says_what_a_count_looks_like(raw):
    hint = r"expected a token count like 50M, 1\.5B or 200000, got"
    with pytest.raises(ConfigError, match=rf"^tokens: {hint}"):
        Outer.load(None, [f"tokens={raw}"])
    # Optional[Count] gives the same message, not "expected Optional[...]"
    with pytest.raises(ConfigError, match=rf"^budget: {hint}") as exc:
        WithOptionalCount.load(None, [f"budget={raw}"])
    assert "Optional" not in str(exc.value)


def test_count_rejects_negative_numbers_from_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("budget: -5\n")
    with pytest.raises(ConfigError, match=r"budget: expected a token count like 50M.*got -5"):
        WithOptionalCount.load(p)
    assert WithOptionalCount.load(None, ["budget=null"]).budget is None
    assert WithOptionalCount.load(None, ["budget=1.5B"]).budget == 1_500_000_000


def test_describe_lists_nested_help():
    rows = {r.name: r for r in Outer.describe()}
    assert rows["inner.lr"].help == "learning rate"
    assert rows["tokens"] == ("tokens", "count (e.g. 50M)", "1000", "token budget")
    assert rows["mode"].type == "a|b" and rows["path"][1:3] == ("str | null", "null")
    assert rows["inner.betas"][1:3] == ("list[float]", "[0.9, 0.95]")
    assert rows["inner"] == ("inner", "Inner", "", "")  # a section; no doc, no docstring


def test_commented_yaml_round_trips_and_shows_docs(tmp_path):
    cfg = Outer.load(None, ["tokens=50M", "inner.lr=3e-4", "path='a: b # c'", "name=''"])
    text = cfg.to_commented_yaml()
    assert "# token budget\ntokens: 50000000\n" in text
    assert "inner:\n  # learning rate\n  lr: 0.0003\n" in text
    (tmp_path / "c.yaml").write_text(text)
    assert Outer.load(tmp_path / "c.yaml") == cfg


@dataclass
class Named(Config):
    """Refers to an Inner by name, as a train config refers to its model preset."""

    ref: str = doc("which inner", "fast")

    def references(self):
        if self.ref == "missing":
            raise ConfigError("no such inner")
        return {"ref": ("resolved:", Inner(lr=0.5))}


def test_commented_yaml_shows_references_as_comments(tmp_path):
    text = Named().to_commented_yaml()
    assert "ref: fast\n# resolved:\n#   lr: 0.5" in text and "# learning rate" in text
    (tmp_path / "n.yaml").write_text(text)
    assert Named.load(tmp_path / "n.yaml") == Named()
    assert "not resolved: no such inner" in Named(ref="missing").to_commented_yaml()


# ---- `base:` inheritance --------------------------------------------------------------


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_delta_overrides_and_nested_merge(tmp_path):
    _write(tmp_path / "a.yaml", "name: a\ntokens: 5k\ninner: {lr: 0.1, betas: [0.1, 0.2]}\n")
    _write(tmp_path / "b.yaml", "base: a\nmode: b\ninner: {betas: [0.5]}\n")  # name from a
    _write(tmp_path / "c.yaml", "base: b.yaml\nname: c\npath: /p\ninner: {lr: 0.3}\n")
    cfg = Outer.load(tmp_path / "c.yaml", ["inner.lr=0.4"])  # overrides apply last
    assert (cfg.name, cfg.tokens, cfg.mode, cfg.path) == ("c", 5000, "b", "/p")
    assert cfg.inner == Inner(lr=0.4, betas=[0.5])  # key by key; the list replaced
    assert Outer.load(tmp_path / "b.yaml").inner == Inner(lr=0.1, betas=[0.5])
    _write(tmp_path / "d.yaml", "base: a\npath: null\ninner: null\n")
    with pytest.raises(ConfigError, match="expected a mapping for Inner"):
        Outer.load(tmp_path / "d.yaml")  # null replaces, a mapping included


def test_merge_dicts():
    from megablocks_ablate.config import merge_dicts

    base = {"a": 1, "n": {"x": 1, "y": [1, 2], "z": {"q": 1}}, "l": [1]}
    delta = {"n": {"y": [3], "z": {"r": 2}}, "l": [], "b": None}
    assert merge_dicts(base, delta) == {
        "a": 1,
        "n": {"x": 1, "y": [3], "z": {"q": 1, "r": 2}},
        "l": [],
        "b": None,
    }
    assert base["n"]["z"] == {"q": 1}  # inputs are not modified


def test_base_by_name_falls_back_to_the_preset_dir(tmp_path):
    presets = tmp_path / "presets"
    _write(presets / "_shared.yaml", "inner: {lr: 0.2}\n")
    _write(presets / "p.yaml", "base: _shared\nname: p\n")
    mine = _write(tmp_path / "mine" / "run.yaml", "base: p\nmode: b\n")
    cfg = Outer.load(mine, preset_dir=presets)
    assert (cfg.name, cfg.mode, cfg.inner.lr) == ("p", "b", 0.2)
    assert Outer.load_preset(presets, "p").name == "p"
    with pytest.raises(ConfigError, match=r"run\.yaml: base 'p': no .*mine/p\.yaml\b"):
        Outer.load(mine)  # no preset dir: looked up beside the file only
    with pytest.raises(ConfigError, match=r"known presets: p\)") as e:
        Outer.load_preset(presets, "q")
    assert "_shared" not in str(e.value)  # `_` files are bases, not presets


def test_base_cycle_and_bad_base_name_the_file(tmp_path):
    _write(tmp_path / "x.yaml", "base: y\n")
    _write(tmp_path / "y.yaml", "base: z.yaml\n")
    _write(tmp_path / "z.yaml", "base: x\n")
    with pytest.raises(
        ConfigError,
        match=r"x\.yaml: base cycle: x\.yaml -> y\.yaml -> z\.yaml "
        r"-> x\.yaml",
    ):
        Outer.load(tmp_path / "x.yaml")
    _write(tmp_path / "self.yaml", "base: self\n")
    with pytest.raises(ConfigError, match=r"base cycle: self\.yaml -> self\.yaml"):
        Outer.load(tmp_path / "self.yaml")
    _write(tmp_path / "bad.yaml", "base: [a, b]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: base: expected a preset name"):
        Outer.load(tmp_path / "bad.yaml")
    _write(tmp_path / "t0.yaml", "naem: 1\n")  # a typo in a base...
    _write(tmp_path / "t1.yaml", "base: t0\nname: t\n")
    with pytest.raises(ConfigError, match=r"t1\.yaml: unknown field naem"):
        Outer.load(tmp_path / "t1.yaml")  # ...named with the file loaded


@dataclass
class HasBase(Config):
    base: str = doc("a real field named base", "")


def test_a_field_named_base_is_not_inheritance(tmp_path):
    assert HasBase.load(_write(tmp_path / "h.yaml", "base: other\n")).base == "other"
