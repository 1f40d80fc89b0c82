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
                 "documents_contaminated", "bad_lines": {reason: n},
                 "tokens_train", "tokens_in_units", "tokens_leftover"},
      "partitions": {name: {"key", "documents", "tokens", "contaminated",
                            "heldout": {"path", "documents", "sha256"},
                            "units": [unit, ...], "leftover_documents", "leftover_tokens"}},
      "units": {name: {"partition", "index", "prefix", "documents", "tokens",
                       "order_first", "order_last", "partial",
                       "bin": {"bytes", "sha256"}, "idx": {"bytes", "sha256"}}}
    }

Paths inside are relative to the manifest's directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.utils.atomic import atomic_write_json
from megablocks_ablate.utils.verify import verify_sha256

MANIFEST_FORMAT = "megablocks-ablate/manifest@1"
MANIFEST_NAME = "manifest.json"


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
        info = self.partitions[partition].get("heldout")
        return os.path.join(self.root, info["path"]) if info else None

    def verify(self, check_hashes: bool = True, units: list[str] | None = None) -> None:
        """Check every unit file (or those of ``units``) exists with the recorded size and
        sha256. Hashes are remembered by size and mtime (:mod:`~megablocks_ablate.utils.verify`),
        so verifying again before every run costs a ``stat`` per file."""
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
