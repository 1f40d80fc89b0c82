"""`megablocks-ablate train` and `train-pool`: seed, unit and seq models.

::

    megablocks-ablate train --config configs/train/demo_seed.yaml data.manifest=data/ out_dir=runs/seed
    torchrun --nproc-per-node 8 -m megablocks_ablate train --config configs/train/130m_unit.yaml ...
    megablocks-ablate train --config unit.yaml --unit-index $SLURM_ARRAY_TASK_ID
    megablocks-ablate train-pool --config unit.yaml --devices auto

Settings: the YAML, then trailing ``key=value`` overrides (``optimizer.lr=3e-4``).
Every field is documented in ``megablocks_ablate/train/config.py``: ``--print-config``
shows the resolved values with each field's doc as a comment (the model preset resolved
too), as YAML that loads back to the same config; ``megablocks-ablate config describe
train`` lists every field, its type and default.
"""

from __future__ import annotations

import argparse

from megablocks_ablate.utils import cli_types as ct


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a seed, unit or seq model (resumes automatically)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        help="train YAML (e.g. configs/train/demo_unit.yaml) or a preset "
        "name (demo_unit); default: the built-in defaults",
    )
    p.add_argument(
        "--unit-index",
        type=ct.nonneg_int,
        help="train the i-th base unit of the manifest (sets data.unit; for Slurm job arrays)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config, documented, as YAML and exit",
    )
    from megablocks_ablate.utils.verify import VERIFY_MODES

    p.add_argument(
        "--verify",
        default="cached",
        choices=VERIFY_MODES,
        help="the seed (init_from) and unit data checked against their recorded sha256 by "
        "a cache keyed on size, mtime, ctime and inode (cached, default), or hashed in full",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=run)

    q = sub.add_parser(
        "train-pool",
        help="train every unit model on this machine's devices",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--config", required=True, help="unit-model YAML whose out_dir contains {unit}")
    q.add_argument(
        "--devices",
        default="auto",
        type=ct.devices,
        help="auto (every GPU, else one CPU slot), GPU indices like 0,1,2, or cpu:N (N CPU slots)",
    )
    q.add_argument(
        "--units",
        type=ct.nonempty_csv,
        help="comma-separated units (default: every unit of the manifest)",
    )
    q.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    q.set_defaults(func=run_pool)


def load_config(config: str, overrides: list[str], unit_index: int | None = None):
    from megablocks_ablate.errors import ConfigError
    from megablocks_ablate.train.config import TrainConfig

    def load(extra=(), report_no_ops=False):
        ov = list(overrides) + list(extra)
        if config:
            return TrainConfig.from_preset(config, ov, report_no_ops=report_no_ops)
        return TrainConfig.load(None, ov, report_no_ops=report_no_ops)

    cfg = load(report_no_ops=True)  # the user's overrides alone: report those that change nothing
    if unit_index is not None:
        from megablocks_ablate.data.manifest import Manifest
        from megablocks_ablate.train.launcher import pool_units

        units = pool_units(Manifest.load(cfg.data.manifest))
        if not 0 <= unit_index < len(units):
            raise ConfigError(
                f"--unit-index {unit_index}: the manifest has {len(units)} units "
                f"(0..{len(units) - 1})"
            )
        cfg = load([f"data.unit={units[unit_index]}"])
    return cfg


def run(args: argparse.Namespace) -> int:
    from megablocks_ablate.utils.verify import set_verify_mode

    set_verify_mode(args.verify)
    cfg = load_config(args.config, args.overrides, args.unit_index)
    if args.print_config:
        print(cfg.to_commented_yaml(), end="")
        return 0
    cfg.model_config()  # a seq_len beyond the model's max_seq_len: refused before any work
    from megablocks_ablate.train.trainer import train

    train(cfg)
    return 0


def run_pool(args: argparse.Namespace) -> int:
    from megablocks_ablate.train.launcher import parse_slots
    from megablocks_ablate.train.launcher import run_pool as pool

    units = [u for u in args.units.split(",") if u] if args.units else None
    result = pool(args.config, args.overrides, parse_slots(args.devices), units)
    failed = {u: r for u, r in result.items() if r.startswith("failed")}
    print(
        f"pool: {sum(r == 'done' for r in result.values())} trained, "
        f"{sum(r == 'skipped' for r in result.values())} already complete, {len(failed)} failed"
    )
    return 1 if failed else 0
