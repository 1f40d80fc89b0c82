"""`manifest.json`: what preprocess produced, for every later stage to trust and check.

Layout (``format: megablocks-ablate/manifest@1``)::

    {
      "format": "megablocks-ablate/manifest@1",
      "config": {...resolved PreprocessConfig...}, "config_hash": "<sha256>",
      "tokenizer": {"kind", "path", "vocab_size", "eod_id", "fingerprint"},
      "dtype": "uint16",
      "inputs": [{"path", "bytes"}], "eval_sets": [{"path", "bytes"}],
      "decontamination": {"eval_paragraphs", "min_words", "false_positive_rate", ...},
      "totals": {"documents_read", "documents_train", "documents_heldout",
                 "tokens_heldout", "documents_contaminated", "bad_lines": {reason: n},
                 "tokens_train", "tokens_in_units", "tokens_leftover"},
      "heldout": {"fraction", "min_documents", "salt",
                  "partitions_without": {key: reason}},
      "partitions": {key: {"name", "documents", "tokens", "contaminated",
                           "heldout": {"path", "documents", "tokens", "minimum_added",
                                       "sha256"} | null,
                           "heldout_missing": reason | null,
                           "units": [unit, ...], "leftover_documents", "leftover_tokens",
                           "heldout_leftover_documents"}},
      "units": {name: {"partition", "index", "prefix", "documents", "tokens",
                       "order_first", "order_last", "partial",
                       "bin": {"bytes", "sha256"}, "idx": {"bytes", "sha256"},
                       "heldout": {"path", "documents", "sha256"} | null}}
    }

Paths inside are relative to the manifest's directory (:mod:`megablocks_ablate.utils.paths`):
the files preprocess wrote always; the tokenizer, ``inputs`` and ``eval_sets`` when they
were given relative (an absolute path is kept as given), so a manifest copied elsewhere
with its tokenizer still finds it, from any working directory. Manifests written before
recorded the tokenizer as typed (relative to preprocess's working directory); such a
path is still found there when it is not beside the manifest (:attr:`Manifest.tokenizer_file`).
``config`` is the settings as typed (their hash decides whether a rerun is the same
run), never read for a path. A partition's ``heldout`` counts
its held-out documents and their tokens (EOD included) and how many of them the
held-out minimum (``heldout_min_docs``, :mod:`~megablocks_ablate.data.preprocess_minimum`)
added; a partition without one says why in ``heldout_missing``, and the top-level
``heldout`` records the settings and every such partition. A unit's ``heldout`` is its share
of its partition's held-out set (the documents in its stretch of the unit order, see
:mod:`~megablocks_ablate.data.preprocess_heldout`); ``heldout_leftover_documents`` counts
those in a dropped remainder's stretch, in no unit's file. Manifests written before
per-unit held-out sets lack both fields: :meth:`Manifest.unit_heldout_path` is then None;
those written before the held-out minimum lack ``heldout``, ``heldout_missing`` and the
held-out ``tokens`` and ``minimum_added``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.utils.atomic import atomic_write_json
from megablocks_ablate.utils.paths import record_path, recorded_as_given, resolve_recorded
from megablocks_ablate.utils.verify import verify_sha256

MANIFEST_FORMAT = "megablocks-ablate/manifest@1"
MANIFEST_NAME = "manifest.json"


def record_in_manifest(path: str, out: str) -> str:
    """``path`` (absolute, or relative to the working directory) as the manifest of the
    preprocess output ``out`` records it: relative to ``out`` when given relative."""
    return record_path(path, os.path.join(out, MANIFEST_NAME))


@dataclass
class Manifest:
    """A loaded manifest; ``data`` is the JSON object, ``root`` its directory."""

    data: dict
    root: str

    @classmethod
    def load(cls, path: str) -> Manifest:
        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DataFormatError(
                f"{path}: manifest not found (run `megablocks-ablate preprocess`)"
            ) from None
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: invalid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise DataFormatError(
                f"{path}: not a megablocks-ablate manifest (expected format {MANIFEST_FORMAT!r})"
            )
        for key in ("tokenizer", "partitions", "units"):
            if key not in data:
                raise DataFormatError(f"{path}: manifest lacks {key!r}")
        return cls(data=data, root=os.path.dirname(os.path.abspath(path)))

    def save(self, path: str | None = None) -> None:
        atomic_write_json(path or os.path.join(self.root, MANIFEST_NAME), self.data)

    @property
    def units(self) -> dict[str, dict]:
        return self.data["units"]

    @property
    def partitions(self) -> dict[str, dict]:
        return self.data["partitions"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.data["tokenizer"]["fingerprint"]

    @property
    def path(self) -> str:
        """The manifest file (absolute)."""
        return os.path.join(self.root, MANIFEST_NAME)

    @property
    def tokenizer_file(self) -> str:
        """Absolute path of the tokenizer file preprocess used: the recorded path
        resolved against the manifest's directory (an older manifest's path relative to
        the working directory is still found there when it is not beside the manifest)."""
        return resolve_recorded(self.data["tokenizer"]["path"], self.path, cwd_fallback=True)

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer file in the form it was recorded: absolute when it was given
        absolute, else relative to the working directory, so that a checkpoint records
        it relative to itself in turn (see :mod:`megablocks_ablate.utils.paths`)."""
        return recorded_as_given(self.data["tokenizer"]["path"], self.path, cwd_fallback=True)

    def tokenizer_record(self) -> dict:
        """The ``lineage.extra["tokenizer"]`` record of a model trained on this data:
        ``{"path", "fingerprint"}``, the path as :attr:`tokenizer_path` gives it."""
        return {"path": self.tokenizer_path, "fingerprint": self.tokenizer_fingerprint}

    def partition_units(self) -> dict[str, list[str]]:
        """partition -> its unit names, in unit order."""
        return {p: list(info["units"]) for p, info in self.partitions.items() if info["units"]}

    def unit_prefix(self, unit: str) -> str:
        """Absolute path prefix of a unit's .bin/.idx."""
        try:
            rel = self.units[unit]["prefix"]
        except KeyError:
            known = ", ".join(sorted(self.units)[:10])
            raise DataFormatError(
                f"unknown unit {unit!r} in {self.root}/{MANIFEST_NAME} "
                f"(known: {known}{', ...' if len(self.units) > 10 else ''})"
            ) from None
        return os.path.join(self.root, rel)

    def heldout_path(self, partition: str) -> str | None:
        """Absolute path of ``partition``'s held-out JSONL (None: it has none)."""
        info = self.partitions[partition].get("heldout")
        return os.path.join(self.root, info["path"]) if info else None

    def heldout_missing(self, partition: str) -> str | None:
        """Why ``partition`` has no held-out set (None: it has one). Manifests written
        before preprocess recorded the reason get a generic one."""
        info = self.partitions[partition]
        if info.get("heldout"):
            return None
        return info.get("heldout_missing") or "preprocess held out none of its documents"

    def unit_heldout_path(self, unit: str) -> str | None:
        """Absolute path of ``unit``'s own held-out JSONL: the held-out documents of its
        partition that fall in its stretch of the unit order. None when it got none, or
        the manifest predates per-unit held-out sets."""
        self.unit_prefix(unit)  # an unknown unit raises, naming the known ones
        info = self.units[unit].get("heldout")
        return os.path.join(self.root, info["path"]) if info else None

    def heldout_files(self, units: list[str] | None = None) -> list[tuple[str, dict]]:
        """(what, record) of each held-out file the manifest lists: every partition's and
        unit's, or only those of ``units``."""
        found = []
        if units is None:
            for p, info in self.partitions.items():
                if info.get("heldout"):
                    found.append((f"held-out set of partition {p!r}", info["heldout"]))
        for u in self.units if units is None else units:
            if self.units[u].get("heldout"):
                found.append((f"held-out set of unit {u!r}", self.units[u]["heldout"]))
        return found

    def verify(
        self, check_hashes: bool = True, units: list[str] | None = None, heldout: bool | None = None
    ) -> None:
        """Check every unit file (or those of ``units``) exists with the recorded size and
        sha256. Hashes are remembered by size and mtime (:mod:`~megablocks_ablate.utils.verify`),
        so verifying again before every run costs a ``stat`` per file. ``heldout`` (default:
        when checking the whole manifest) also checks the held-out files (of ``units``, or
        every partition's and unit's) against their recorded sha256; training needs only
        the units, so a subset check leaves them out unless asked."""
        if units is None if heldout is None else heldout:
            for what, rec in self.heldout_files(units):
                path = os.path.join(self.root, rec["path"])
                where = f"{what} in {self.root}/{MANIFEST_NAME}"
                if not os.path.isfile(path):
                    raise DataFormatError(f"{path}: missing ({where})")
                if check_hashes:
                    verify_sha256(path, rec["sha256"], where, "preprocess the data again")
        for name in self.units if units is None else units:
            info = self.units[name]
            for ext in ("bin", "idx"):
                path = os.path.join(self.root, info["prefix"] + "." + ext)
                if not os.path.exists(path):
                    raise DataFormatError(f"{path}: missing (unit {name!r} of the manifest)")
                size = os.path.getsize(path)
                if size != info[ext]["bytes"]:
                    raise DataFormatError(
                        f"{path}: {size} bytes, manifest records {info[ext]['bytes']}"
                    )
                if check_hashes:
                    verify_sha256(
                        path,
                        info[ext]["sha256"],
                        f"unit {name!r} in {self.root}/{MANIFEST_NAME}",
                        "preprocess the data again",
                    )
