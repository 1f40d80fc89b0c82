"""Paloma as published: evaluation domains from a local copy of ``allenai/paloma``.

Paloma (Magnusson et al. 2023, "Paloma: A Benchmark for Evaluating Language Model
Fit", https://arxiv.org/abs/2312.10523) is distributed as the Hugging Face dataset
``allenai/paloma`` (https://huggingface.co/datasets/allenai/paloma). Nothing is
downloaded here: point :func:`paloma_sources` at a local copy (e.g. made with
``huggingface-cli download --repo-type dataset allenai/paloma --local-dir DIR`` after
accepting the licence on the dataset page).

**The layout, as found** (and where)::

    DIR/<source>/val/*.jsonl.gz      DIR/<source>/test/*.jsonl.gz

* One directory per *source*: ``4chan_meta_sep``, ``c4_100_domains``, ``c4_en``,
  ``dolma-v1_5``, ``dolma_100_programing_languages``, ``dolma_100_subreddits``,
  ``falcon-refinedweb``, ``gab``, ``m2d2_s2orc_unsplit``, ``m2d2_wikipedia_unsplit``,
  ``manosphere_meta_sep``, ``mc4``, ``ptb``, ``redpajama``, ``twitterAAE_HELM_fixed``,
  ``wikitext_103`` (the dataset card's configs; the same 16 directory names are listed
  against the dataset, pinned at revision ``65cd6fc``, in marin-community/marin
  ``experiments/paloma.py``, which reads ``<source>/val/val*.jsonl.gz``).
* Split directories ``val/`` and ``test/`` (the dataset's split names; the card's
  ``load_dataset("allenai/paloma", "<source>")`` returns splits ``val`` and ``test``).
* Shard names, from the scripts that built the release (allenai/OLMo
  ``eval_data/format_conversion/perplexity-v3/subsetter.py``, ``m2d2_subsetter.py``,
  ``run_subsetter.sh``): a source whose records have a ``subdomain`` is written one
  file per subdomain, ``<split>/<split>_<subdomain>.jsonl.gz`` (e.g.
  ``c4_100_domains/val/val_www.ign.com.jsonl.gz``); M2D2 as ``<split>/<subdomain>.jsonl.gz``
  (one record per subdomain); any other source in byte-sized shards
  ``<split>/<split>-00000000.jsonl.gz``, ``-00000001``, ... (8 digits); ``ptb`` and
  ``wikitext_103`` as a single ``val/val.jsonl.gz`` / ``test/test.jsonl.gz``.
* Records (the card's ``dataset_info`` features; the subsetter asserts ``id``, ``text``,
  ``source`` and adds ``added``): ``text``, ``id``, ``source``, ``added``, ``subdomain``
  (in the sources that have domains; spaces replaced by ``_`` and parentheses dropped
  when it was built), and source-specific ``metadata`` (an object or a JSON string).

**Choices** (where the sources above leave room):

* Shards are every ``*.jsonl.gz`` (also ``*.jsonl`` and ``*.jsonl.zst``, for
  re-compressed copies) directly in the split directory, sorted by name, whatever
  their prefix: the naming differs between sources (above), so it is not relied on.
* A source is a non-hidden subdirectory of ``DIR`` holding ``val/`` or ``test/``;
  anything else in a download (``README.md``, ``.cache/``) is ignored.
* ``split_by="source"``: one domain per source, named by its directory, all its shards.
  ``split_by="subdomain"``: one domain per (source, subdomain), named
  ``<source>/<subdomain>``, holding the shards that contain that subdomain, filtered on
  the ``subdomain`` field (the records say which domain they are; file names are only a
  convention). A source none of whose records has a ``subdomain`` is one domain
  ``<source>`` (Paloma counts such a source as one of its domains); a source where
  some records have it and others do not is an error naming the first ``file:line``
  without it. The ``/`` in a domain name is made filesystem-safe by the cache
  (:mod:`.sets` names cache files by a sanitised domain plus a content digest).
* The ``source`` field of a record is not used: the directory is the source.

:func:`source_ref` / :func:`sources_from_refs` turn a domain into a one-line string
(``paloma:<split dir>`` or ``paloma:<split dir>#subdomain=<quoted value>``) and back, so
a study can keep ``eval_sets[domain]`` a string (stored in the results store, shown by
``study plan``) and the scorer can still load a multi-file domain.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal
from urllib.parse import quote, unquote

from megablocks_ablate.data.jsonl import iter_raw_lines
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.evaluate.sets import EvalSource

logger = logging.getLogger(__name__)

SPLITS = ("val", "test")
SplitBy = Literal["source", "subdomain"]
SUBDOMAIN_FIELD = "subdomain"
REF_PREFIX = "paloma:"
_REF_SUBDOMAIN = "#subdomain="
_SHARD_SUFFIXES = (".jsonl.gz", ".jsonl", ".jsonl.zst")


# ----------------------------------------------------------------------------- layout


def available_sources(directory: str) -> list[str]:
    """Source directory names of a local Paloma copy (sorted); errors if there are none."""
    if not os.path.isdir(directory):
        raise DataFormatError(
            f"{directory}: no such Paloma directory (a local copy of allenai/paloma: "
            "<dir>/<source>/val/*.jsonl.gz; nothing is downloaded)"
        )
    names = sorted(
        n
        for n in os.listdir(directory)
        if not n.startswith(".")
        and any(os.path.isdir(os.path.join(directory, n, s)) for s in SPLITS)
    )
    if not names:
        raise DataFormatError(
            f"{directory}: no Paloma source directories (expected <source>/val/ or "
            "<source>/test/ subdirectories, e.g. c4_en/val/val-00000000.jsonl.gz)"
        )
    return names


def shard_files(split_dir: str) -> list[str]:
    """The shards of one source's split directory, sorted by name; errors if none."""
    if not os.path.isdir(split_dir):
        raise DataFormatError(f"{split_dir}: no such directory")
    files = sorted(
        os.path.join(split_dir, f)
        for f in os.listdir(split_dir)
        if f.endswith(_SHARD_SUFFIXES) and os.path.isfile(os.path.join(split_dir, f))
    )
    if not files:
        raise DataFormatError(f"{split_dir}: no shard files (*.jsonl.gz, *.jsonl, *.jsonl.zst)")
    return files


def _check_args(split: str, split_by: str) -> None:
    if split not in SPLITS:
        raise DataFormatError(f"Paloma split must be one of {list(SPLITS)}, got {split!r}")
    if split_by not in ("source", "subdomain"):
        raise DataFormatError(f"Paloma split_by must be 'source' or 'subdomain', got {split_by!r}")


def _chosen(directory: str, sources: Sequence[str] | None) -> list[str]:
    available = available_sources(directory)
    if not sources:
        return available
    unknown = [s for s in sources if s not in available]
    if unknown:
        raise DataFormatError(
            f"{directory}: unknown Paloma source {unknown[0]!r} (available: {', '.join(available)})"
        )
    if len(set(sources)) != len(sources):
        raise DataFormatError(f"Paloma sources: listed twice in {list(sources)}")
    return list(sources)


# ----------------------------------------------------------------------------- subdomains


def _parse(path: str, line_no: int, raw: bytes) -> dict:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataFormatError(f"{path}:{line_no}: invalid JSON (not a Paloma record)") from None
    if not isinstance(rec, dict):
        raise DataFormatError(f"{path}:{line_no}: expected a JSON object")
    return rec


def scan_subdomains(files: Iterable[str]) -> dict[str, list[str]] | None:
    """``{subdomain: [files holding it]}`` in order of first appearance, or None when no
    record has a ``subdomain`` (the source is one domain).

    A source where some records have it and others do not raises DataFormatError naming
    the first ``file:line`` of the minority kind.
    """
    found: dict[str, list[str]] = {}
    first_with: str | None = None
    first_without: str | None = None
    for path in files:
        for line_no, raw in iter_raw_lines(path):
            value = _parse(path, line_no, raw).get(SUBDOMAIN_FIELD)
            if value is None:
                first_without = first_without or f"{path}:{line_no}"
            elif not isinstance(value, str) or not value:
                raise DataFormatError(
                    f"{path}:{line_no}: {SUBDOMAIN_FIELD!r} must be a non-empty string, "
                    f"got {value!r}"
                )
            else:
                first_with = first_with or f"{path}:{line_no}"
                holders = found.setdefault(value, [])
                if not holders or holders[-1] != path:
                    holders.append(path)
    if first_with is None:
        return None
    if first_without is not None:
        raise DataFormatError(
            f"{first_without}: record has no {SUBDOMAIN_FIELD!r} field, although other "
            f"records of this source have one (e.g. {first_with}); split_by=subdomain "
            "needs it on every record"
        )
    return found


def _source_domains(name: str, split_dir: str, split_by: str) -> list[EvalSource]:
    files = shard_files(split_dir)
    if split_by == "source":
        return [EvalSource(name, split_dir, tuple(files))]
    subdomains = scan_subdomains(files)
    if subdomains is None:
        logger.info("Paloma source %s has no subdomains: scored as one domain", name)
        return [EvalSource(name, split_dir, tuple(files))]
    return [
        EvalSource(f"{name}/{sub}", split_dir, tuple(holders), (SUBDOMAIN_FIELD, sub))
        for sub, holders in subdomains.items()
    ]


def paloma_sources(
    directory: str,
    split: str = "val",
    split_by: SplitBy | str = "source",
    sources: Sequence[str] | None = None,
) -> list[EvalSource]:
    """The evaluation domains of a local Paloma copy (see the module docstring).

    ``sources`` keeps only these source directories, in the order given (an unknown one
    is an error listing the available ones); by default every source, sorted. Raises
    :class:`DataFormatError` for a missing directory, a source without ``split``, a
    split directory with no shards, and records missing ``subdomain``
    (``split_by="subdomain"``).
    """
    _check_args(split, split_by)
    directory = os.path.abspath(directory)
    out: list[EvalSource] = []
    for name in _chosen(directory, sources):
        split_dir = os.path.join(directory, name, split)
        if not os.path.isdir(split_dir):
            have = [s for s in SPLITS if os.path.isdir(os.path.join(directory, name, s))]
            raise DataFormatError(
                f"{split_dir}: Paloma source {name!r} has no {split!r} split "
                f"(it has: {', '.join(have)})"
            )
        out.extend(_source_domains(name, split_dir, split_by))
    return out


# ----------------------------------------------------------------------------- refs


def source_ref(source: EvalSource) -> str:
    """The one-line string a study stores for a Paloma domain (see :func:`sources_from_refs`)."""
    ref = REF_PREFIX + os.path.abspath(source.path)
    if source.where is not None:
        ref += _REF_SUBDOMAIN + quote(source.where[1], safe="")
    return ref


def is_ref(text: str) -> bool:
    return text.startswith(REF_PREFIX)


def _parse_ref(domain: str, ref: str) -> tuple[str, str | None]:
    if not is_ref(ref):
        raise DataFormatError(f"eval domain {domain!r}: {ref!r} is not a {REF_PREFIX} reference")
    body = ref[len(REF_PREFIX) :]
    split_dir, sep, sub = body.rpartition(_REF_SUBDOMAIN)
    if not sep:
        return body, None
    return split_dir, unquote(sub)


def sources_from_refs(refs: Mapping[str, str]) -> dict[str, EvalSource]:
    """``{domain: EvalSource}`` for ``{domain: ref}`` made by :func:`source_ref`.

    The shards are listed again (and, for subdomain domains, each split directory is
    scanned once for all its subdomains), so the sources describe the files as they are
    now; a subdomain no record carries any more is an error naming the domain.
    """
    scans: dict[str, dict[str, list[str]] | None] = {}
    out: dict[str, EvalSource] = {}
    for domain, ref in refs.items():
        split_dir, sub = _parse_ref(domain, ref)
        files = shard_files(split_dir)
        if sub is None:
            out[domain] = EvalSource(domain, split_dir, tuple(files))
            continue
        if split_dir not in scans:
            scans[split_dir] = scan_subdomains(files)
        holders = (scans[split_dir] or {}).get(sub)
        if not holders:
            raise DataFormatError(
                f"eval domain {domain!r}: no record of {split_dir} has "
                f"{SUBDOMAIN_FIELD} {sub!r} any more"
            )
        out[domain] = EvalSource(domain, split_dir, tuple(holders), (SUBDOMAIN_FIELD, sub))
    return out
