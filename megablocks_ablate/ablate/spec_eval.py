"""The study spec's evaluation domains and their roles (``eval:`` in a study YAML).

:func:`resolve_eval` turns :class:`EvalSpec` into ``eval_sets`` (domain -> a JSONL path,
or a ``paloma:`` reference to several shards) and ``domain_units`` (domain -> the
study units it is **in-domain** for). Roles decide how the report splits results
(in-domain vs out-of-domain, the paper's "ID" vs "Paloma" rows):

* a held-out set is in-domain for the study units of its manifest partition; with
  ``heldout_by: unit`` (automatic when ``unit_partitions: true``, the paper's §5.1)
  every unit has its own held-out set, in-domain for that unit alone;
* an ``extra`` domain named like a study partition, or mapped to one by
  ``in_domain``, is in-domain for that partition's units;
* everything else (Paloma domains included) is out-of-domain for every mixture.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.config import Config, doc
from megablocks_ablate.errors import ConfigError, MBAError

logger = logging.getLogger(__name__)


@dataclass
class PalomaSpec(Config):
    """Paloma's published suite from a local copy of allenai/paloma (no download)."""

    dir: str = doc(
        "local copy of the allenai/paloma dataset: <dir>/<source>/{val,test}/*.jsonl.gz", ""
    )
    split: Literal["val", "test"] = doc("which split to score", "val")
    split_by: Literal["source", "subdomain"] = doc(
        "one domain per source (named by its directory), or per (source, subdomain) "
        "named <source>/<subdomain> (a source without subdomains stays one domain)",
        "source",
    )
    sources: list[str] = doc(
        "only these source directories, e.g. [c4_en, m2d2_s2orc_unsplit] (default: all)",
        default_factory=list,
    )

    def validate(self) -> None:
        if not self.dir:
            raise ConfigError("dir: required (the directory of a local Paloma copy)")


@dataclass
class EvalSpec(Config):
    """Evaluation domains: held-out sets of the data's partitions plus other JSONL sets.

    Roles: a held-out set is in-domain for the units of its partition; an ``extra``
    domain named like a study partition, or mapped to one by ``in_domain``, is in-domain
    for that partition's units; every other domain (Paloma's included) is out-of-domain
    for every mixture.
    """

    heldout: bool | list[str] = doc(
        "true: the held-out set of every partition the study trains on; or a list of "
        "manifest partitions; false: none",
        True,
    )
    extra: list[str] = doc(
        "other JSONL files or directories (domain = file stem; NAME=PATH to name one); "
        "one named like a study partition is in-domain for that partition",
        default_factory=list,
    )
    paloma: PalomaSpec | None = doc(
        "Paloma domains from a local copy (out-of-domain for every mixture)", None
    )
    in_domain: dict[str, str] = doc(
        "extra domain -> study partition it is in-domain for (overrides the by-name rule)",
        default_factory=dict,
    )
    heldout_by: Literal["auto", "partition", "unit"] = doc(
        "held-out domains per manifest partition, or per base unit (each unit's own "
        "held-out documents, written by preprocess; the paper's §5.1, where units are the "
        "partitions); auto: per unit when unit_partitions is true, else per partition",
        "auto",
    )


def _eval_heldout_units(spec: EvalSpec, manifest, study_units: set[str]):
    """Per-unit held-out domains (named by unit): each in-domain for its own unit only."""
    chosen = (
        [u for u in manifest.units if u in study_units]
        if spec.heldout is True
        else [
            u
            for p in (spec.heldout or [])
            for u in manifest.partition_units().get(p, [])
            if u in study_units
        ]
    )
    eval_sets = {
        u: _heldout_file(
            manifest.unit_heldout_path(u),
            "eval.heldout_by",
            f"unit {u!r}",
            "has no held-out set of its own (its manifest predates per-unit held-out sets: "
            "rerun preprocess with --overwrite; or no held-out document fell in its range: "
            "raise --heldout-fraction); or set eval.heldout_by: partition",
        )
        for u in chosen
    }
    return eval_sets, {u: [u] for u in eval_sets}


def _heldout_file(path: str | None, field_name: str, what: str, none_why: str) -> str:
    """``path`` of the held-out set of ``what`` the manifest lists, checked to exist;
    errors name the spec field."""
    if path is None:
        raise ConfigError(f"{field_name}: {what} {none_why}")
    if not os.path.isfile(path):
        raise ConfigError(f"{field_name}: held-out file of {what} is missing: {path}")
    return path


def _eval_heldout(spec: EvalSpec, manifest, study_units: set[str], by_unit: bool = False):
    """Held-out domains (named by manifest partition, or by unit with ``by_unit``) and
    the study units trained on each."""
    if by_unit and spec.heldout is not False:
        if isinstance(spec.heldout, list):
            _check_heldout_names(spec.heldout, manifest)
        return _eval_heldout_units(spec, manifest, study_units)
    by_manifest = manifest.partition_units()
    eval_sets: dict[str, str] = {}
    domain_units: dict[str, list[str]] = {}
    if spec.heldout is True:
        chosen = [
            p
            for p, us in by_manifest.items()
            if set(us) & study_units and manifest.partitions[p].get("heldout")
        ]
    elif spec.heldout is False:
        chosen = []
    else:
        chosen = list(spec.heldout)
        _check_heldout_names(chosen, manifest)
    for p in chosen:
        eval_sets[p] = _heldout_file(
            manifest.heldout_path(p),
            "eval.heldout",
            f"partition {p!r}",
            f"has no held-out set ({manifest.heldout_missing(p)}); leave it out of eval.heldout",
        )
        domain_units[p] = [u for u in by_manifest.get(p, []) if u in study_units]
    return eval_sets, domain_units


def _has_unit_heldout(manifest) -> bool:
    """Whether preprocess wrote per-unit held-out sets (manifests before it did not:
    ``heldout_by: auto`` then keeps the partition's, with a warning)."""
    if any("heldout" in info for info in manifest.units.values()):
        return True
    logger.warning(
        "%s: the manifest has no per-unit held-out sets (written by preprocess since "
        "per-unit sets exist; rerun it with --overwrite to get them): each unit-partition "
        "is evaluated in-domain on its whole manifest partition's held-out set",
        manifest.root,
    )
    return False


def _check_heldout_names(names: list[str], manifest) -> None:
    for p in names:
        if p not in manifest.partitions:
            raise ConfigError(
                f"eval.heldout: unknown partition {p!r} (manifest partitions: "
                f"{', '.join(sorted(manifest.partitions))})"
            )


def _add_domain(eval_sets: dict[str, str], field_name: str, domain: str, ref: str, fix: str):
    """Add one domain; a name already taken or the reserved ID is an error naming the field."""
    if domain in eval_sets:
        raise ConfigError(
            f"{field_name}: domain {domain!r} is already taken (by {eval_sets[domain]}); {fix}"
        )
    if domain == mx.ID_DOMAIN:
        raise ConfigError(
            f"{field_name}: domain name {mx.ID_DOMAIN!r} is reserved for each mixture's "
            f"own held-out set; {fix}"
        )
    eval_sets[domain] = ref


def _eval_extra(spec: EvalSpec, eval_sets: dict[str, str]) -> list[str]:
    """Add ``eval.extra`` domains; returns their names."""
    from megablocks_ablate.evaluate.sets import resolve_sources

    added: list[str] = []
    for i, item in enumerate(spec.extra):
        target = item.partition("=")[2] if "=" in item and not os.path.exists(item) else item
        if not any(c in target for c in "*?[") and not os.path.exists(target):
            raise ConfigError(f"eval.extra[{i}]: no such file or directory: {target}")
        try:
            sources = resolve_sources([item])
        except MBAError as e:
            raise ConfigError(f"eval.extra[{i}]: {e}") from None
        for s in sources:
            _add_domain(eval_sets, f"eval.extra[{i}]", s.domain, s.path, "name it with NAME=PATH")
            added.append(s.domain)
    return added


def _eval_paloma(spec: EvalSpec, eval_sets: dict[str, str]) -> None:
    """Add the Paloma domains, stored as ``paloma:`` references (several shards each)."""
    if spec.paloma is None:
        return
    from megablocks_ablate.evaluate import paloma

    p = spec.paloma
    try:
        sources = paloma.paloma_sources(p.dir, p.split, p.split_by, p.sources or None)
    except MBAError as e:
        raise ConfigError(f"eval.paloma: {e}") from None
    for s in sources:
        _add_domain(
            eval_sets,
            "eval.paloma",
            s.domain,
            paloma.source_ref(s),
            "narrow eval.paloma.sources or rename the other domain",
        )


def _eval_roles(
    spec: EvalSpec,
    extra: list[str],
    parts: dict[str, list[str]],
    eval_sets: dict[str, str],
    domain_units: dict[str, list[str]],
) -> None:
    """In-domain roles of extra domains: named like a study partition, or ``in_domain``."""
    roles = {d: d for d in extra if d in parts}
    for domain, partition in spec.in_domain.items():
        if domain not in extra:
            why = (
                "a held-out set (in-domain for its own partition already)"
                if domain in domain_units
                else "a Paloma domain (out-of-domain for every mixture)"
                if domain in eval_sets
                else "not an evaluation domain"
            )
            raise ConfigError(
                f"eval.in_domain.{domain}: {domain!r} is {why}; keys must be eval.extra "
                f"domains ({', '.join(extra) or 'none'})"
            )
        if partition not in parts:
            raise ConfigError(
                f"eval.in_domain.{domain}: unknown partition {partition!r} "
                f"(partitions: {', '.join(parts)})"
            )
        roles[domain] = partition
    for domain, partition in roles.items():
        domain_units[domain] = list(parts[partition])


def resolve_eval(
    spec: EvalSpec,
    manifest,
    study_units: set[str],
    parts: dict[str, list[str]] | None = None,
    unit_partitions: bool = False,
):
    """``eval_sets`` (domain -> path or ``paloma:`` reference) and ``domain_units``
    (domain -> the study units it is in-domain for; ``parts`` are the study partitions;
    ``unit_partitions``: the study treats every unit as a partition)."""
    by_unit = spec.heldout_by == "unit" or (
        spec.heldout_by == "auto" and unit_partitions and _has_unit_heldout(manifest)
    )
    eval_sets, domain_units = _eval_heldout(spec, manifest, study_units, by_unit)
    extra = _eval_extra(spec, eval_sets)
    _eval_paloma(spec, eval_sets)
    _eval_roles(spec, extra, parts or {}, eval_sets, domain_units)
    if not eval_sets:
        raise ConfigError(
            "eval: no evaluation domain (set eval.heldout, eval.extra or eval.paloma)"
        )
    return eval_sets, domain_units


def partitions_without_heldout(
    spec: EvalSpec, manifest, parts: dict[str, list[str]], domain_units: dict[str, list[str]]
) -> dict[str, str]:
    """Study partition -> why it has no in-domain evaluation: no evaluation domain (its
    held-out set, or an ``extra`` domain in-domain for it) covers any of its units, so
    it has no in-domain row in the report and is no evaluation domain. The reason is
    the manifest's (``heldout_missing``, written by preprocess) or the spec's."""
    covered = {u for us in domain_units.values() for u in us}
    missing: dict[str, str] = {}
    for name, units in parts.items():
        if covered.intersection(units):
            continue
        keys = list(dict.fromkeys(manifest.units[u]["partition"] for u in units))
        whys = [_why_no_heldout(spec, manifest, k) for k in keys]
        missing[name] = (
            whys[0] if len(keys) == 1 else "; ".join(f"{k}: {w}" for k, w in zip(keys, whys))
        )
    return missing


def _why_no_heldout(spec: EvalSpec, manifest, key: str) -> str:
    """Why manifest partition ``key`` gives the study no held-out domain."""
    missing = manifest.heldout_missing(key)
    if missing:
        return missing
    if spec.heldout is False:
        return "eval.heldout is false"
    if isinstance(spec.heldout, list) and key not in spec.heldout:
        return "not listed in eval.heldout"
    return "its held-out set is not an evaluation domain"
