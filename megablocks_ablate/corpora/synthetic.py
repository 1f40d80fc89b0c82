"""Deterministic synthetic corpora with metadata, for tests, the demo and benchmarks.

Each field of study ("fos") draws words from its own topical vocabulary plus a shared
function-word list, so partitions differ in distribution the way S2ORC fields do and
a merged model's perplexity actually depends on the mixture. Documents carry ``text``,
``fos``, ``year`` and ``id``; paragraphs are separated by blank lines.
"""

from __future__ import annotations

import bisect
import gzip
import itertools
import json
import os
import random
from collections.abc import Iterator
from functools import lru_cache

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
FUNCTION_WORDS = [
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "that",
    "for",
    "on",
    "with",
    "as",
    "by",
    "this",
    "we",
    "are",
    "from",
    "be",
    "an",
    "at",
    "which",
    "it",
    "these",
    "our",
    "was",
    "were",
    "not",
    "or",
    "have",
    "has",
    "can",
    "its",
    "results",
    "data",
]


_ONSETS = [
    "",
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "br",
    "ch",
    "cl",
    "dr",
    "gr",
    "pl",
    "pr",
    "sh",
    "st",
    "th",
    "tr",
]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "x", "nd", "st"]


@lru_cache(maxsize=4)
def _lexicon(size: int, seed: int = 1234) -> tuple[list[str], list[float]]:
    """``size`` distinct pseudo-words and Zipf(1.1) cumulative weights over them."""
    rng = random.Random(seed)
    words, seen = [], set()
    while len(words) < size:
        w = "".join(
            rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
            for _ in range(rng.randint(1, 4))
        )
        if w not in seen:
            seen.add(w)
            words.append(w)
    cum = list(itertools.accumulate(1.0 / (r + 1) ** 1.1 for r in range(size)))
    return words, cum


def _paragraph(rng: random.Random, topic: list[str], n_words: int, rare_words: int = 0) -> str:
    lexicon = _lexicon(rare_words) if rare_words else None
    words = []
    for _ in range(n_words):
        u = rng.random()
        if lexicon is not None and u < 0.3:  # long-tailed vocabulary, like real text
            lex, cum = lexicon
            words.append(lex[bisect.bisect_left(cum, rng.random() * cum[-1])])
        else:
            words.append(
                rng.choice(topic)
                if u < 0.45 or (lexicon is not None and u < 0.6)
                else rng.choice(FUNCTION_WORDS)
            )
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


def iter_documents(
    n_docs: int,
    seed: int = 0,
    fields: list[str] | None = None,
    years: tuple[int, int] = (1990, 2022),
    mean_words: int = 120,
    rare_words: int = 0,
) -> Iterator[dict]:
    """Yield ``n_docs`` deterministic documents, cycling through ``fields``.

    ``rare_words > 0`` mixes in a Zipf-distributed lexicon of that many pseudo-words
    (realistic tokenizer load for benchmarks); 0 keeps the small topical vocabulary.
    """
    rng = random.Random(seed)
    fields = list(fields or FIELDS)
    for i in range(n_docs):
        fos = fields[i % len(fields)]
        topic = FIELDS[fos].split()
        n_par = rng.randint(1, 4)
        paragraphs = [
            _paragraph(
                rng, topic, max(8, int(rng.expovariate(1.0) * mean_words / n_par) + 8), rare_words
            )
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
