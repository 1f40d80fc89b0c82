"""`megablocks-ablate config`: what every config field means, and what a preset resolves to.

::

    megablocks-ablate config describe train      # every field: type, default, doc
    megablocks-ablate config describe model
    megablocks-ablate config describe study
    megablocks-ablate config show train demo_unit optimizer.lr=1e-3
    megablocks-ablate config show model configs/model/130m.yaml

KIND is ``train`` (configs/train/), ``model`` (configs/model/) or ``study`` (the study
spec, configs/studies/). ``show`` prints a preset (a name or a YAML path) resolved, its
``base:`` chain and overrides applied, each field's doc a comment: the same text as
``train --print-config``, YAML that loads back to the same config.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

KINDS = ("train", "model", "study")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="describe config fields, or show a resolved preset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="config_command", metavar="ACTION")
    actions.required = True
    kinds = "|".join(KINDS)

    describe = actions.add_parser("describe", help="every field of a config: type, default, doc")
    describe.add_argument("kind", metavar=kinds, help="which config")
    describe.set_defaults(func=run_describe)

    show = actions.add_parser(
        "show", help="a preset resolved, with each field's doc (as train --print-config)"
    )
    show.add_argument("kind", metavar=kinds, help="which config")
    show.add_argument("name", help="preset name (e.g. demo_unit) or a YAML path")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    show.set_defaults(func=run_show)


def config_kind(kind: str) -> tuple[Any, Path, str]:
    """(config class, preset directory, what to call a preset) of ``kind``; imported only
    when asked for, so that ``--help`` stays instant."""
    from megablocks_ablate.errors import ConfigError

    if kind == "train":
        from megablocks_ablate.train.config import PRESET_DIR, TrainConfig

        return TrainConfig, PRESET_DIR, "train preset"
    if kind == "model":
        from megablocks_ablate.model.config import PRESET_DIR as MODEL_DIR
        from megablocks_ablate.model.config import ModelConfig

        return ModelConfig, MODEL_DIR, "model preset"
    if kind == "study":
        from megablocks_ablate.ablate.spec import StudySpec
        from megablocks_ablate.config import shipped_preset_dir

        return StudySpec, shipped_preset_dir("studies"), "study spec"
    raise ConfigError(f"config: unknown kind {kind!r} (known: {', '.join(KINDS)})")


def describe_text(cls: Any, width: int = 88) -> str:
    """Every field of ``cls``: ``name: type = default`` and its doc wrapped below it,
    nested configs indented under their section."""
    head = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
    lines = [f"{cls.__name__}: {head}" if head else cls.__name__, ""]
    for row in cls.describe():
        pad = "  " * row.name.count(".")
        sig = f"{pad}{row.name}: {row.type}" + (f" = {row.default}" if row.default else "")
        lines.append(sig)
        if row.help:
            lines.extend(
                textwrap.wrap(
                    row.help, width, initial_indent=pad + "    ", subsequent_indent=pad + "    "
                )
            )
    return "\n".join(lines) + "\n"


def run_describe(args: argparse.Namespace) -> int:
    cls, _, _ = config_kind(args.kind)
    print(describe_text(cls), end="")
    return 0


def run_show(args: argparse.Namespace) -> int:
    cls, preset_dir, what = config_kind(args.kind)
    cfg = cls.load_preset(preset_dir, args.name, args.overrides, what=what, report_no_ops=True)
    print(cfg.to_commented_yaml(), end="")
    return 0
