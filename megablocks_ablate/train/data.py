"""From a TrainConfig's data spec to the blended stream of training samples.

The spec names one base unit, explicit unit weights, or a mixture of partitions and
units (``"*"`` = every partition) weighted by :attr:`DataConfig.balance`. The mixture
is sized to exactly the samples the run reads (``train_steps * global_batch``), so a
unit smaller than its share is upsampled (repeated for more epochs) and a larger one
is read partly.
"""

from __future__ import annotations

from megablocks_ablate.data.indexed import check_token_range
from megablocks_ablate.data.manifest import Manifest
from megablocks_ablate.data.mixture import (
    MixtureDataset,
    partition_balanced_weights,
    token_weighted,
)
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.train.config import DataConfig, TrainConfig


def resolve_unit_weights(spec: DataConfig, manifest: Manifest) -> dict[str, float]:
    """``{unit: weight}`` (normalised to sum 1) described by ``spec``."""
    if spec.unit:
        manifest.unit_prefix(spec.unit)  # unknown unit -> DataFormatError naming the manifest
        return {spec.unit: 1.0}
    if spec.weights:
        for u in spec.weights:
            manifest.unit_prefix(u)
        total = sum(spec.weights.values())
        return {u: w / total for u, w in spec.weights.items()}
    if not spec.mixture:
        raise ConfigError("data: give one of data.unit, data.weights or data.mixture")
    parts = manifest.partition_units()
    unit_partition = {u: info["partition"] for u, info in manifest.units.items()}
    groups: dict[str, list[str]] = {}
    for item in spec.mixture:
        if item == "*":
            for p, us in parts.items():
                groups.setdefault(p, []).extend(u for u in us if u not in groups.get(p, []))
        elif item in parts:
            groups.setdefault(item, []).extend(
                u for u in parts[item] if u not in groups.get(item, [])
            )
        elif item in unit_partition:
            g = groups.setdefault(unit_partition[item], [])
            if item not in g:
                g.append(item)
        else:
            raise ConfigError(
                f"data.mixture: {item!r} is neither a partition nor a unit of "
                f"{manifest.root} (partitions: {', '.join(sorted(parts))})"
            )
    if spec.balance == "partition":
        return partition_balanced_weights(groups)
    units = [u for us in groups.values() for u in us]
    if spec.balance == "tokens":
        return token_weighted({u: int(manifest.units[u]["tokens"]) for u in units})
    return {u: 1.0 / len(units) for u in units}


def check_unit_data(manifest: Manifest, units: list[str], vocab_size: int) -> None:
    """Refuse (:class:`DataFormatError` naming the file) a unit whose ``.bin``/``.idx``
    differ from the manifest's size or sha256 (hashes cached by size, mtime and inode,
    so a rerun costs a ``stat``), or whose ``.bin`` holds a token id ``>= vocab_size``
    (one vectorised max per chunk of the memory map)."""
    manifest.verify(units=list(units))
    for unit in units:
        check_token_range(manifest.unit_prefix(unit), vocab_size)


def build_mixture(
    cfg: TrainConfig, manifest: Manifest | None = None
) -> tuple[MixtureDataset, dict[str, float], Manifest]:
    """The run's :class:`MixtureDataset`, its unit weights, and the manifest."""
    if not cfg.data.manifest:
        raise ConfigError(
            "data.manifest: required (a directory written by `megablocks-ablate preprocess`)"
        )
    manifest = manifest or Manifest.load(cfg.data.manifest)
    weights = resolve_unit_weights(cfg.data, manifest)
    live = {u: w for u, w in weights.items() if w > 0}
    seed = cfg.seed if cfg.data.seed is None else cfg.data.seed
    mix = MixtureDataset(
        {u: manifest.unit_prefix(u) for u in live},
        live,
        size=cfg.train_samples,
        seq_len=cfg.seq_len,
        seed=seed,
        cache_dir=cfg.data.cache_dir,
    )
    return mix, weights, manifest
