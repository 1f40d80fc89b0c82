"""A miniature copy of ``allenai/paloma`` as published, built in a temporary directory.

Mirrors the layout documented in megablocks_ablate/evaluate/paloma.py: real source
directory names, ``val/`` and ``test/`` split directories, the release's shard names
(``<split>-00000000.jsonl.gz`` byte shards, ``<split>_<subdomain>.jsonl.gz`` per
subdomain, M2D2's ``<subdomain>.jsonl.gz``, PTB's single ``val.jsonl.gz``), Dolma-style
records (``text``, ``id``, ``source``, ``added``, ``subdomain``, ``metadata``), and the
clutter of a Hugging Face download (``README.md``, ``.gitattributes``, ``.cache/``).

Imported by tests/evaluate/test_paloma.py and tests/ablate/test_paloma_study.py.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator

ADDED = "2023-12-01T00:00:00.000000+00:00"

# source -> split -> {shard file name: [(subdomain or None, number of documents)]}
LAYOUT: dict[str, dict[str, dict[str, list[tuple[str | None, int]]]]] = {
    "c4_en": {
        "val": {"val-00000000.jsonl.gz": [(None, 3)], "val-00000001.jsonl.gz": [(None, 2)]},
        "test": {"test-00000000.jsonl.gz": [(None, 3)]},
    },
    "c4_100_domains": {
        "val": {
            "val_www.ign.com.jsonl.gz": [("www.ign.com", 2)],
            "val_www.nytimes.com.jsonl.gz": [("www.nytimes.com", 3)],
        },
        "test": {
            "test_www.ign.com.jsonl.gz": [("www.ign.com", 1)],
            "test_www.nytimes.com.jsonl.gz": [("www.nytimes.com", 2)],
        },
    },
    "m2d2_s2orc_unsplit": {
        "val": {"cs.CL.jsonl.gz": [("cs.CL", 1)], "math.AG.jsonl.gz": [("math.AG", 1)]},
        "test": {"cs.CL.jsonl.gz": [("cs.CL", 1)], "math.AG.jsonl.gz": [("math.AG", 1)]},
    },
    "ptb": {
        "val": {"val.jsonl.gz": [(None, 1)]},
        "test": {"test.jsonl.gz": [(None, 1)]},
    },
}


def _records(source: str, split: str, parts, texts: Iterator[str]) -> list[dict]:
    out = []
    for subdomain, n in parts:
        for _ in range(n):
            text = next(texts)
            rec: dict = {"text": text, "id": f"{source}-{split}-{len(out)}", "added": ADDED}
            rec["source"] = source
            if subdomain is not None:
                rec["subdomain"] = subdomain
            if source == "c4_en":
                rec["metadata"] = {"url": "https://example.com/a", "date": "2019-04-25"}
            out.append(rec)
    return out


def write_shard(path: str, records: list[dict]) -> str:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def write_paloma(root: str, texts: list[str]) -> str:
    """Write the miniature Paloma under ``root/paloma`` from ``texts`` (cycled); its path.

    Every shard gets its own texts, so domains differ in content.
    """
    d = os.path.join(root, "paloma")
    stream = iter(texts * 10)
    for source, splits in LAYOUT.items():
        for split, shards in splits.items():
            os.makedirs(os.path.join(d, source, split), exist_ok=True)
            for name, parts in shards.items():
                recs = _records(source, split, parts, stream)
                write_shard(os.path.join(d, source, split, name), recs)
    with open(os.path.join(d, "README.md"), "w", encoding="utf-8") as f:
        f.write("---\nextra_gated_prompt: ...\n---\n# Dataset Card for Paloma\n")
    with open(os.path.join(d, ".gitattributes"), "w", encoding="utf-8") as f:
        f.write("*.jsonl.gz filter=lfs diff=lfs merge=lfs -text\n")
    os.makedirs(os.path.join(d, ".cache", "huggingface", "download", "c4_en", "val"))
    return d


def corpus_texts(corpus: str, start: int = 0, count: int = 40) -> list[str]:
    """Short texts (60..~300 bytes) from a JSONL corpus."""
    with open(corpus, encoding="utf-8") as f:
        rows = [json.loads(line)["text"] for line in f][start : start + count]
    return [t[: 60 + 23 * (i % 10)] for i, t in enumerate(rows)]
