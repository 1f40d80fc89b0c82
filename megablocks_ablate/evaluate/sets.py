"""Evaluation sets: JSONL text per domain, tokenized once per tokenizer and cached.

An evaluation *domain* is one JSONL file (Paloma style: one document per line, text
under ``text``; ``.gz`` and ``.zst`` accepted), or several shard files read in order,
optionally only the records whose field equals a value (an :class:`EvalSource` with
``files`` / ``where``; :mod:`.paloma` builds those for Paloma's published layout).
Sources:

* a directory: every ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst`` in it (not
  recursive), domain = file name without those suffixes;
* a list of files (or globs), domain = file stem, or ``name=path`` to name it;
* a preprocess output directory (it has ``manifest.json``): the held-out file of each
  partition, domain = partition name.

Rules (see docs/evaluation.md):

* **invalid lines** follow ``on_bad_line`` exactly as preprocess does: ``"error"``
  stops with ``file:line: reason``; ``"skip"`` counts them by reason;
* **documents with no tokens** (empty or all-whitespace text under SentencePiece) are
  skipped and counted in ``empty_documents``; every other document is scored in full
  (its first token is predicted from an EOD context, see :mod:`.windows`), so a
  one-token document contributes one prediction;
* **an empty domain** (no scorable document: empty file, or every line skipped) is left
  out of the suite with a warning and listed in :attr:`EvalSuite.skipped_domains`.

The cache holds, per (file content, tokenizer fingerprint, text key, bad-line policy;
for a sharded source every shard's content in order, and the record filter),
an indexed dataset of the documents' token ids (one sequence per document, no EOD), a
``.bytes.npy`` of their UTF-8 byte counts and a JSON record written last; no pickle.
Everything is loaded into memory once and stays there across :func:`evaluate` calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from megablocks_ablate.data.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
    data_file_path,
)
from megablocks_ablate.data.jsonl import BadLineCounter, OnBadLine, expand_inputs, iter_jsonl
from megablocks_ablate.errors import DataFormatError, TokenizerError
from megablocks_ablate.utils.atomic import atomic_open, atomic_write_json
from megablocks_ablate.utils.hashing import sha256_file, sha256_json

logger = logging.getLogger(__name__)

CACHE_FORMAT = "megablocks-ablate/eval-cache@1"
_SUFFIXES = (".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".jsonl", ".json.gz", ".json")
_ENCODE_BATCH = 512


def default_cache_dir() -> str:
    """``$MBA_CACHE_DIR/eval``, else ``~/.cache/megablocks_ablate/eval``."""
    root = os.environ.get("MBA_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "megablocks_ablate"
    )
    return os.path.join(root, "eval")


def domain_name(path: str) -> str:
    """File name without its JSONL/compression suffixes (``c4_en.jsonl.gz`` -> ``c4_en``)."""
    base = os.path.basename(path)
    for suffix in _SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return os.path.splitext(base)[0]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)[:80] or "domain"


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class EvalSource:
    """One domain's input: one file, or several shards read in order, maybe filtered.

    ``path`` is the file, or for a sharded source what the shards have in common (their
    directory): it names the source in messages and in :meth:`EvalSuite.describe`.
    ``files`` are the shards (empty: just ``path``). ``where = (field, value)`` keeps only
    the records whose ``field`` equals ``value`` (a record without the field is an error
    naming its file and line: a filter on a field the data does not have is a mistake).
    """

    domain: str
    path: str
    files: tuple[str, ...] = ()
    where: tuple[str, str] | None = None

    @property
    def shards(self) -> tuple[str, ...]:
        """The files read, in order."""
        return self.files or (self.path,)


def resolve_sources(eval_sets: str | Sequence[str | EvalSource]) -> list[EvalSource]:
    """Domains and files from a directory, a manifest directory, or a list of files.

    List entries may be globs, ``name=path`` or ready :class:`EvalSource` objects (kept
    as they are). Duplicate domain names are an error.
    """
    items = [eval_sets] if isinstance(eval_sets, (str, os.PathLike)) else list(eval_sets)
    if not items:
        raise DataFormatError("eval sets: no files given")
    sources: list[EvalSource] = []
    for entry in items:
        if isinstance(entry, EvalSource):
            sources.append(entry)
            continue
        item = os.fspath(entry)
        if os.path.isdir(item):
            sources.extend(_dir_sources(item))
            continue
        name, sep, path = item.partition("=")
        if sep and not os.path.exists(item) and name and "/" not in name:
            files = expand_inputs(path)
            if len(files) != 1:
                raise DataFormatError(
                    f"eval set {item!r}: {name}= must name exactly one file, "
                    f"{path!r} matches {len(files)}"
                )
            sources.append(EvalSource(name, files[0]))
            continue
        sources.extend(EvalSource(domain_name(f), f) for f in expand_inputs(item))
    seen: dict[str, str] = {}
    for s in sources:
        if s.domain in seen:
            raise DataFormatError(
                f"eval sets: domain {s.domain!r} comes from both {seen[s.domain]} "
                f"and {s.path}; name them apart with NAME=PATH"
            )
        seen[s.domain] = s.path
    return sources


def _dir_sources(directory: str) -> list[EvalSource]:
    if os.path.isfile(os.path.join(directory, "manifest.json")):
        return manifest_sources(directory)
    files = sorted(
        f
        for f in os.listdir(directory)
        if f.endswith(_SUFFIXES[:4]) and os.path.isfile(os.path.join(directory, f))
    )
    if not files:
        raise DataFormatError(
            f"{directory}: no evaluation files (*.jsonl, *.jsonl.gz, *.jsonl.zst) "
            "and no manifest.json"
        )
    return [EvalSource(domain_name(f), os.path.join(directory, f)) for f in files]


def manifest_sources(directory: str) -> list[EvalSource]:
    """The held-out file of every partition of a preprocess output (domain = partition).

    Partitions without a held-out file (``--heldout-fraction 0``) are left out.
    """
    from megablocks_ablate.data.manifest import Manifest

    m = Manifest.load(directory)
    out = []
    for partition in m.partitions:
        path = m.heldout_path(partition)
        if path is None:
            continue
        if not os.path.isfile(path):
            raise DataFormatError(
                f"{path}: held-out file of partition {partition!r} listed in "
                f"{m.root}/manifest.json is missing"
            )
        out.append(EvalSource(partition, path))
    if not out:
        raise DataFormatError(
            f"{m.root}/manifest.json: no partition has a held-out file "
            "(preprocess with --heldout-fraction > 0)"
        )
    return out


# ----------------------------------------------------------------------------- one set


@dataclass
class EvalSet:
    """One domain, tokenized and resident in memory.

    ``tokens`` is every document's ids concatenated (no EOD); document ``i`` is
    ``tokens[offsets[i]:offsets[i + 1]]`` and has ``doc_bytes[i]`` UTF-8 bytes of text.
    """

    domain: str
    path: str
    tokens: np.ndarray
    offsets: np.ndarray  # int64 [documents + 1]
    doc_bytes: np.ndarray  # int64 [documents]
    tokenizer_fingerprint: str
    bad_lines: dict[str, int] = field(default_factory=dict)
    empty_documents: int = 0

    @property
    def num_documents(self) -> int:
        return len(self.doc_bytes)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_bytes(self) -> int:
        return int(self.doc_bytes.sum())

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _cache_key(source: EvalSource, fingerprint: str, text_key: str, on_bad_line: str) -> dict:
    """What a cache entry depends on. A plain one-file source keeps the original key (so
    existing caches stay valid); a sharded source hashes every shard, in reading order
    (the order is the documents' order), and a filtered one adds the filter."""
    key: dict = {"format": CACHE_FORMAT}
    if source.files:
        key["shard_sha256"] = [sha256_file(f) for f in source.files]
    else:
        key["source_sha256"] = sha256_file(source.path)
    key.update(tokenizer_fingerprint=fingerprint, text_key=text_key, on_bad_line=on_bad_line)
    if source.where is not None:
        key["record_filter"] = {"field": source.where[0], "value": source.where[1]}
    return key


def _cache_prefix(cache_dir: str, domain: str, key: dict) -> str:
    digest = sha256_json(key)[:20]
    return os.path.join(cache_dir, f"{_safe(domain)}.{digest}")


def _iter_texts(
    source: EvalSource, text_key: str, on_bad_line: OnBadLine, bad: BadLineCounter
) -> Iterator[str]:
    for path in source.shards:
        for line_no, rec in iter_jsonl(
            path, text_key=text_key, on_bad_line=on_bad_line, bad_lines=bad
        ):
            if source.where is not None:
                name, value = source.where
                if rec.get(name) is None:
                    raise DataFormatError(
                        f"{path}:{line_no}: record has no {name!r} field (domain "
                        f"{source.domain!r} keeps the records whose {name} is {value!r})"
                    )
                if rec[name] != value:
                    continue
            yield rec[text_key]


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _build_cache(
    source: EvalSource, tokenizer, prefix: str, key: dict, text_key: str, on_bad_line: OnBadLine
) -> None:
    """Tokenize one source into ``prefix.{bin,idx,bytes.npy,json}`` (JSON last)."""
    bad = BadLineCounter()
    doc_bytes: list[int] = []
    empty = 0
    with IndexedDatasetWriter(prefix, best_dtype(tokenizer.vocab_size)) as writer:
        for texts in _batched(_iter_texts(source, text_key, on_bad_line, bad), _ENCODE_BATCH):
            for text, ids in zip(texts, tokenizer.encode_batch(texts)):
                if not ids:
                    empty += 1
                    continue
                writer.add_document(ids)
                doc_bytes.append(len(text.encode("utf-8")))
    with atomic_open(prefix + ".bytes.npy", "wb") as f:
        np.save(f, np.asarray(doc_bytes, dtype=np.int64), allow_pickle=False)
    files = {"files": [os.path.abspath(f) for f in source.files]} if source.files else {}
    atomic_write_json(
        prefix + ".json",
        {
            **key,
            "domain": source.domain,
            "source": os.path.abspath(source.path),
            **files,
            "tokenizer": tokenizer.describe(),
            "documents": len(doc_bytes),
            "tokens": int(writer.num_tokens),
            "bytes": int(sum(doc_bytes)),
            "empty_documents": empty,
            "bad_lines": dict(bad.counts),
        },
    )


def _load_cache(source: EvalSource, prefix: str, key: dict) -> EvalSet | None:
    """The cached set, or None when there is no complete cache entry for ``key``."""
    meta_path = prefix + ".json"
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # a damaged record is rebuilt
    if any(meta.get(k) != v for k, v in key.items()):
        return None
    with IndexedDataset(prefix) as ds:  # validates the index against the .bin
        n, dtype = len(ds), ds.dtype
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(ds.sequence_lengths, out=offsets[1:])
    # One sequence per document, written in order: the .bin is the documents back to
    # back. Read into memory (not mapped) so the set stays resident across calls.
    tokens = np.fromfile(data_file_path(prefix), dtype=dtype).astype(np.int32)
    doc_bytes = np.load(prefix + ".bytes.npy", allow_pickle=False)
    if (
        n != meta.get("documents")
        or doc_bytes.shape != (n,)
        or int(offsets[-1]) != meta.get("tokens")
    ):
        raise DataFormatError(
            f"{meta_path}: eval cache is inconsistent with {prefix}.idx / "
            f"{prefix}.bytes.npy; delete these files to rebuild"
        )
    return EvalSet(
        domain=source.domain,
        path=source.path,
        tokens=tokens,
        offsets=offsets,
        doc_bytes=doc_bytes.astype(np.int64),
        tokenizer_fingerprint=key["tokenizer_fingerprint"],
        bad_lines=dict(meta.get("bad_lines") or {}),
        empty_documents=int(meta.get("empty_documents", 0)),
    )


def load_eval_set(
    source: EvalSource,
    tokenizer,
    cache_dir: str,
    text_key: str = "text",
    on_bad_line: OnBadLine = "error",
) -> EvalSet:
    """Tokenize ``source`` with ``tokenizer`` (or reuse the cache) and load it into memory."""
    key = _cache_key(source, tokenizer.fingerprint, text_key, on_bad_line)
    prefix = _cache_prefix(cache_dir, source.domain, key)
    loaded = _load_cache(source, prefix, key)
    if loaded is None:
        os.makedirs(cache_dir, exist_ok=True)
        _build_cache(source, tokenizer, prefix, key, text_key, on_bad_line)
        loaded = _load_cache(source, prefix, key)
        assert loaded is not None
    if loaded.num_documents and int(loaded.tokens.max()) >= tokenizer.vocab_size:
        raise TokenizerError(
            f"{prefix}.bin: token id {int(loaded.tokens.max())} is outside the "
            f"tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    return loaded


# ----------------------------------------------------------------------------- the suite


@dataclass
class EvalSuite:
    """Every evaluation domain of a study, tokenized and resident in memory.

    Build it once (:meth:`load`) and pass it to :func:`~megablocks_ablate.evaluate.evaluate`
    model after model; window and batch plans are computed once per (max length,
    stride, batch size) and kept here too.
    """

    sets: dict[str, EvalSet]
    tokenizer_fingerprint: str
    eod_id: int
    skipped_domains: dict[str, str] = field(default_factory=dict)
    _plans: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(
        cls,
        eval_sets: str | Sequence[str | EvalSource],
        tokenizer,
        *,
        cache_dir: str | None = None,
        text_key: str = "text",
        on_bad_line: OnBadLine = "error",
        group=None,
    ) -> EvalSuite:
        """Resolve, tokenize (cached) and load every domain of ``eval_sets``.

        ``tokenizer`` is a :class:`~megablocks_ablate.data.tokenizer.Tokenizer` or a
        path to one. Under ``torch.distributed`` rank 0 fills the cache first and the
        other ranks then read it, so each file is tokenized once.
        """
        if isinstance(tokenizer, (str, os.PathLike)):
            from megablocks_ablate.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(os.fspath(tokenizer))
        if on_bad_line not in ("error", "skip"):
            raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
        cache_dir = cache_dir or default_cache_dir()
        sources = resolve_sources(eval_sets)

        def load_all() -> dict[str, EvalSet]:
            return {
                s.domain: load_eval_set(s, tokenizer, cache_dir, text_key, on_bad_line)
                for s in sources
            }

        from megablocks_ablate.evaluate.dist import barrier, rank_and_world

        rank, world = rank_and_world(group)
        if world > 1 and rank != 0:
            barrier(group)  # wait for rank 0 to fill the cache
        loaded = load_all()
        if world > 1 and rank == 0:
            barrier(group)
        sets, skipped = {}, {}
        for domain, s in loaded.items():
            if s.num_documents == 0:
                skipped[domain] = (
                    f"{s.path}: no scorable document (bad lines skipped: "
                    f"{sum(s.bad_lines.values())}, empty documents: {s.empty_documents})"
                )
                logger.warning("eval domain %r left out: %s", domain, skipped[domain])
                continue
            sets[domain] = s
        if not sets:
            raise DataFormatError(
                "eval sets: no domain has a scorable document; " + "; ".join(skipped.values())
            )
        return cls(
            sets=sets,
            tokenizer_fingerprint=tokenizer.fingerprint,
            eod_id=tokenizer.eod_id,
            skipped_domains=skipped,
        )

    @property
    def domains(self) -> list[str]:
        return list(self.sets)

    def describe(self) -> dict:
        """JSON-able summary: per domain, source file, documents, tokens, bytes."""
        return {
            d: {
                "path": s.path,
                "documents": s.num_documents,
                "tokens": s.num_tokens,
                "bytes": s.num_bytes,
                "empty_documents": s.empty_documents,
                "bad_lines": s.bad_lines,
            }
            for d, s in self.sets.items()
        }

    def subset(self, domains: Iterable[str]) -> EvalSuite:
        """A suite of only these domains (sharing the loaded arrays)."""
        domains = list(domains)
        missing = [d for d in domains if d not in self.sets]
        if missing:
            raise DataFormatError(f"eval suite: unknown domain(s) {missing}; known: {self.domains}")
        return dataclasses.replace(self, sets={d: self.sets[d] for d in domains}, _plans={})
