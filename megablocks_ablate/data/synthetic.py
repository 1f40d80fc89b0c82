"""Deterministic synthetic corpora with metadata, for tests, the demo and benchmarks.

Each field of study ("fos") draws words from its own topical vocabulary plus a shared
function-word list, so partitions differ in distribution the way S2ORC fields do and
a merged model's perplexity actually depends on the mixture. Documents carry ``text``,
``fos``, ``year`` and ``id``; paragraphs are separated by blank lines.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from typing import Iterator

FIELDS = {
    "biology": "cell gene protein enzyme tissue species organism membrane mutation cortex "
               "neuron receptor pathway genome sequence bacteria viral host immune signal",
    "physics": "quantum particle energy field photon electron lattice spin momentum wave "
               "plasma boson gravity thermal entropy vacuum laser magnetic crystal flux",
    "history": "empire war treaty dynasty king colonial revolution archive century trade "
               "church peasant parliament city border army reform chronicle merchant siege",
    "economics": "market price demand supply labor capital inflation tariff wage bank "
                 "credit firm household growth policy tax equilibrium auction risk asset",
}
FUNCTION_WORDS = ("the of and a to in is that for on with as by this we are from be an "
                  "at which it these our was were not or have has can its results data").split()


def _paragraph(rng: random.Random, topic: list[str], n_words: int) -> str:
    words = []
    for _ in range(n_words):
        words.append(rng.choice(topic) if rng.random() < 0.45 else rng.choice(FUNCTION_WORDS))
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


def iter_documents(
    n_docs: int,
    seed: int = 0,
    fields: list[str] | None = None,
    years: tuple[int, int] = (1990, 2022),
    mean_words: int = 120,
) -> Iterator[dict]:
    """Yield ``n_docs`` deterministic documents, cycling through ``fields``."""
    rng = random.Random(seed)
    fields = list(fields or FIELDS)
    for i in range(n_docs):
        fos = fields[i % len(fields)]
        topic = FIELDS[fos].split()
        n_par = rng.randint(1, 4)
        paragraphs = [
            _paragraph(rng, topic, max(8, int(rng.expovariate(1.0) * mean_words / n_par) + 8))
            for _ in range(n_par)
        ]
        yield {
            "id": f"doc-{seed}-{i}",
            "text": "\n\n".join(paragraphs),
            "fos": fos,
            "year": rng.randint(years[0], years[1]),
        }


def write_corpus(path: str, n_docs: int, seed: int = 0, **kwargs) -> str:
    """Write a JSONL corpus (gzip when ``path`` ends in .gz, zstd for .zst)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lines = (json.dumps(d) + "\n" for d in iter_documents(n_docs, seed=seed, **kwargs))
    if path.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(lines)
    elif path.endswith(".zst"):
        import zstandard

        with open(path, "wb") as fh, zstandard.ZstdCompressor().stream_writer(fh) as w:
            for line in lines:
                w.write(line.encode("utf-8"))
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines)
    return path
