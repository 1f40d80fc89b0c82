"""Decontamination of training data against evaluation sets with a Bloom filter.

The rule follows Dolma's standard for Paloma (Soldaini et al. 2024; Magnusson et al.
2023), as the paper does for all seed and unit-model data: a TRAINING document is
dropped when at least one of its paragraphs of at least 13 tokens also occurs in an
evaluation set. Paragraph membership is tested against a Bloom filter built from
every qualifying paragraph of the evaluation sets, so a document is never kept
when it shares such a paragraph (no false negatives), and a clean document is
dropped only with the filter's false-positive probability per paragraph.

Decisions (also in ``docs/decontamination.md``):

* **Paragraph** -- a line of the document: the text is split on ``"\\n"``; blank
  lines are ignored.
* **Normalisation** before hashing -- Unicode NFC, lower-case, every run of
  whitespace collapsed to one space, stripped. Case and spacing changes therefore
  do not hide a copied paragraph.
* **Tokens** -- whitespace-separated words of the normalised paragraph. This is
  tokenizer-independent, so one filter serves every tokenizer; Paloma counts
  Unicode-segmented words, which whitespace words approximate.
* **Minimum length** -- paragraphs with fewer than ``min_words`` (default 13)
  words are never added to the filter nor looked up.

Filter file (``.bloom``, little-endian; no pickle): a fixed 72-byte header
``magic b"MBABLOOM" | u32 version=1 | u32 header size | u64 num_bits m |
u32 num_hashes k | u32 reserved=0 | u64 count | u64 capacity | f64 error_rate |
16s hash scheme b"blake2b128-edh"`` (NUL-padded) followed by ``ceil(m/8)`` raw
bytes of bits, bit ``j`` being bit ``j & 7`` (LSB first) of byte ``j >> 3``.

Hash scheme ``blake2b128-edh``: one 16-byte BLAKE2b digest of the item's UTF-8
bytes, read as two little-endian 64-bit ints ``h1`` (bytes 0-7) and ``h2`` (bytes
8-15); the ``k`` bit indices are ``x_i = (h1 + i*h2 + (i^3 - i)/6) mod m`` for
``i = 0..k-1``, i.e. enhanced double hashing (Dillinger & Manolios 2004), computed
incrementally as ``x += y; y += i`` (mod m). Plain double hashing
``h1 + i*h2`` degenerates when ``h2 mod m`` shares a large factor with ``m`` (the
k indices collapse onto a few bits), which measurably raised the false-positive
rate of small filters; the cubic term removes that. The scheme is deterministic
across processes and machines, unlike Python's salted ``hash()``.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import unicodedata
from collections.abc import Iterable, Iterator

import numpy as np

from megablocks_ablate.data.jsonl import BadLineCounter, OnBadLine, expand_inputs, iter_jsonl
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.utils.atomic import atomic_open
from megablocks_ablate.utils.progress import progress

DEFAULT_MIN_WORDS = 13

MAGIC = b"MBABLOOM"
VERSION = 1
HASH_SCHEME = b"blake2b128-edh"
_HEADER = struct.Struct("<8sIIQIIQQd16s")
HEADER_SIZE = _HEADER.size  # 72
MAX_HASHES = 64  # error rates down to ~1e-19; more would only slow every lookup
_MASK64 = (1 << 64) - 1
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


# --------------------------------------------------------------------------- paragraphs


def _iter_paragraphs(text: str, min_words: int) -> Iterator[str]:
    """Normalised paragraphs of ``text`` with at least ``min_words`` words, lazily."""
    if not unicodedata.is_normalized("NFC", text):  # fast check; most text already is
        text = unicodedata.normalize("NFC", text)
    # NFC never composes across "\n" (a starter that combines with nothing), so
    # normalising the whole text equals normalising each paragraph.
    for line in text.lower().split("\n"):
        words = line.split()
        if len(words) >= min_words:
            yield " ".join(words)


def paragraphs(text: str, min_words: int = DEFAULT_MIN_WORDS) -> list[str]:
    """The normalised paragraphs of ``text`` that have at least ``min_words`` words.

    >>> paragraphs("  One  TWO three\\n\\nshort line\\n", min_words=3)
    ['one two three']
    """
    return list(_iter_paragraphs(text, min_words))


# --------------------------------------------------------------------------- Bloom filter


MIN_BITS = 8192  # tiny filters (a handful of eval paragraphs) alias badly; 1 KiB costs nothing


def optimal_num_bits(capacity: int, error_rate: float) -> int:
    """m = ceil(-n ln p / (ln 2)^2), the size that reaches rate p with n items (>= MIN_BITS)."""
    return max(MIN_BITS, math.ceil(-capacity * math.log(error_rate) / (math.log(2) ** 2)))


def optimal_num_hashes(num_bits: int, capacity: int) -> int:
    """k = round((m / n) ln 2), the number of hashes that minimises the error rate."""
    return min(MAX_HASHES, max(1, round(num_bits / capacity * math.log(2))))


def _digest(item: str, m: int) -> tuple[int, int]:
    """(h1 mod m, h2 mod m) from one 128-bit BLAKE2b digest of the item's UTF-8 bytes."""
    d = int.from_bytes(hashlib.blake2b(item.encode("utf-8"), digest_size=16).digest(), "little")
    return (d & _MASK64) % m, (d >> 64) % m


class BloomFilter:
    """A set of strings with no false negatives and a bounded false-positive rate.

    Bits live in a numpy ``uint8`` array; :meth:`load` with ``mmap=True`` maps the
    file read-only so worker processes share one copy through the page cache.
    Lookups run a plain-Python loop over a ``memoryview`` of the bits (one digest,
    then ``k`` byte tests that stop at the first zero bit), which beats numpy
    indexing for the handful of indices one item needs.
    """

    def __init__(self, capacity: int, error_rate: float = 1e-6):
        if not 0.0 < error_rate < 1.0:
            raise ValueError(f"error_rate must be in (0, 1), got {error_rate!r}")
        capacity = max(1, int(capacity))
        m = optimal_num_bits(capacity, error_rate)
        self._init(
            m,
            optimal_num_hashes(m, capacity),
            0,
            capacity,
            error_rate,
            np.zeros((m + 7) // 8, dtype=np.uint8),
            path=None,
        )

    def _init(self, m, k, count, capacity, error_rate, bits: np.ndarray, path: str | None):
        self._m = int(m)
        self._k = int(k)
        self._count = int(count)
        self.capacity = int(capacity)
        self.error_rate = float(error_rate)
        self.bits = bits
        self._view = memoryview(bits)  # int indexing without numpy scalar overhead
        self._path = path  # set when the bits are a read-only map of this file

    @classmethod
    def for_items(cls, n: int, error_rate: float = 1e-6) -> BloomFilter:
        """A filter sized for ``n`` items (at least 1) at ``error_rate``."""
        return cls(max(1, int(n)), error_rate)

    # -- properties
    @property
    def num_bits(self) -> int:
        return self._m

    @property
    def num_hashes(self) -> int:
        return self._k

    @property
    def count(self) -> int:
        """Items added that set at least one new bit (about the distinct items added)."""
        return self._count

    @property
    def read_only(self) -> bool:
        return self._path is not None

    # -- membership
    def add(self, item: str) -> None:
        if self._path is not None:
            raise ValueError(
                f"Bloom filter {self._path} is mapped read-only; "
                "load it with mmap=False to add items"
            )
        m, bits, new = self._m, self._view, False
        x, y = _digest(item, m)
        for i in range(1, self._k + 1):
            byte, bit = x >> 3, 1 << (x & 7)
            if not bits[byte] & bit:
                bits[byte] |= bit
                new = True
            x = (x + y) % m  # enhanced double hashing: x_i = h1 + i h2 + (i^3 - i)/6
            y = (y + i) % m
        # Counting only items that changed a bit keeps duplicates (frequent in eval
        # sets: boilerplate lines) from inflating the estimated error rate.
        if new:
            self._count += 1

    def add_many(self, items: Iterable[str]) -> None:
        for item in items:
            self.add(item)

    def __contains__(self, item: str) -> bool:
        m, bits = self._m, self._view
        x, y = _digest(item, m)
        for i in range(1, self._k + 1):
            if not bits[x >> 3] & (1 << (x & 7)):
                return False
            x = (x + y) % m
            y = (y + i) % m
        return True

    # -- error rate
    def expected_false_positive_rate(self) -> float:
        """(1 - e^(-k n / m))^k for the current count n."""
        return (1.0 - math.exp(-self._k * self._count / self._m)) ** self._k

    def fill_ratio(self) -> float:
        """Fraction of bits set (reads the whole array; for reports, not hot loops)."""
        set_bits = 0
        for start in range(0, len(self.bits), 1 << 22):  # bounded temporary memory
            set_bits += int(_POPCOUNT[self.bits[start : start + (1 << 22)]].sum(dtype=np.int64))
        return set_bits / self._m

    # -- file I/O
    def save(self, path: str) -> None:
        """Write header + bits atomically (temp file, fsync, rename)."""
        header = _HEADER.pack(
            MAGIC,
            VERSION,
            HEADER_SIZE,
            self._m,
            self._k,
            0,
            self._count,
            self.capacity,
            self.error_rate,
            HASH_SCHEME,
        )
        with atomic_open(path, "wb") as f:
            f.write(header)
            f.write(self._view)

    @classmethod
    def load(cls, path: str, mmap: bool = True) -> BloomFilter:
        """Read a filter written by :meth:`save`; with ``mmap`` the bits map read-only."""
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(HEADER_SIZE)
        except FileNotFoundError:
            raise DataFormatError(f"Bloom filter {path}: no such file") from None
        if len(raw) < HEADER_SIZE:
            raise DataFormatError(
                f"Bloom filter {path}: {len(raw)} bytes, shorter than the "
                f"{HEADER_SIZE}-byte header (truncated or not a filter)"
            )
        magic, version, header_size, m, k, _, count, capacity, error_rate, scheme = _HEADER.unpack(
            raw
        )
        if magic != MAGIC:
            raise DataFormatError(f"Bloom filter {path}: bad magic {magic!r}, expected {MAGIC!r}")
        if version != VERSION or header_size != HEADER_SIZE:
            raise DataFormatError(
                f"Bloom filter {path}: unsupported version {version} "
                f"(header size {header_size}); this code reads version "
                f"{VERSION} ({HEADER_SIZE} bytes)"
            )
        if scheme.rstrip(b"\0") != HASH_SCHEME:
            raise DataFormatError(
                f"Bloom filter {path}: unknown hash scheme {scheme!r}, expected {HASH_SCHEME!r}"
            )
        if m < 1 or not 1 <= k <= MAX_HASHES:
            raise DataFormatError(
                f"Bloom filter {path}: invalid sizes num_bits={m} "
                f"num_hashes={k} (need num_bits >= 1, 1 <= k <= {MAX_HASHES})"
            )
        nbytes = (m + 7) // 8
        if size != HEADER_SIZE + nbytes:
            raise DataFormatError(
                f"Bloom filter {path}: file is {size} bytes, expected "
                f"{HEADER_SIZE + nbytes} ({HEADER_SIZE} header + {nbytes} "
                f"bytes for {m} bits); truncated or corrupt"
            )
        if mmap:
            bits = np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_SIZE, shape=(nbytes,))
        else:
            bits = np.fromfile(path, dtype=np.uint8, offset=HEADER_SIZE, count=nbytes)
        self = cls.__new__(cls)
        self._init(m, k, count, capacity, error_rate, bits, path=path if mmap else None)
        return self

    def __reduce__(self):
        # Sending a filter to worker processes: a mapped one re-maps its file (no copy
        # through the pipe); an in-memory one travels as raw bytes (never via pickle
        # files on disk: saved filters use the header format above).
        if self._path is not None:
            return (BloomFilter.load, (self._path, True))
        return (
            _from_state,
            (self._m, self._k, self._count, self.capacity, self.error_rate, self.bits.tobytes()),
        )

    def __repr__(self) -> str:
        where = f", file={self._path!r}" if self._path else ""
        return (
            f"BloomFilter(num_bits={self._m}, num_hashes={self._k}, count={self._count}, "
            f"expected_fpr={self.expected_false_positive_rate():.3g}{where})"
        )


def _from_state(m, k, count, capacity, error_rate, data: bytes) -> BloomFilter:
    self = BloomFilter.__new__(BloomFilter)
    self._init(
        m, k, count, capacity, error_rate, np.frombuffer(bytearray(data), dtype=np.uint8), path=None
    )
    return self


# --------------------------------------------------------------------------- decontaminator


class Decontaminator:
    """Flags training documents sharing a qualifying paragraph with evaluation sets."""

    def __init__(self, bloom: BloomFilter, min_words: int = DEFAULT_MIN_WORDS):
        if min_words < 1:
            raise ValueError(f"min_words must be >= 1, got {min_words}")
        self.bloom = bloom
        self.min_words = int(min_words)

    @classmethod
    def from_eval_files(
        cls,
        patterns: list[str] | str,
        text_key: str = "text",
        min_words: int = DEFAULT_MIN_WORDS,
        error_rate: float = 1e-6,
        on_bad_line: OnBadLine = "error",
        bad_lines: BadLineCounter | None = None,
    ) -> Decontaminator:
        """Build the filter from JSONL evaluation sets (plain, .gz, .zst).

        Two streaming passes keep memory at the filter's size: the first counts
        qualifying paragraphs to size the filter (duplicates included, which only
        over-sizes it), the second adds them. Skipped bad lines (``on_bad_line=
        "skip"``) are counted once, in ``bad_lines`` when given.
        """
        files = expand_inputs(patterns)
        n_docs = n_paragraphs = 0
        with progress(desc="decontam: counting eval paragraphs", unit="doc") as bar:
            for path in files:
                for _, rec in iter_jsonl(path, text_key, on_bad_line, bad_lines):
                    n_paragraphs += sum(1 for _ in _iter_paragraphs(rec[text_key], min_words))
                    n_docs += 1
                    bar.update()
        bloom = BloomFilter.for_items(n_paragraphs, error_rate)
        with progress(total=n_docs, desc="decontam: building Bloom filter", unit="doc") as bar:
            for path in files:
                for _, rec in iter_jsonl(path, text_key, on_bad_line, None):
                    bloom.add_many(_iter_paragraphs(rec[text_key], min_words))
                    bar.update()
        return cls(bloom, min_words)

    def is_contaminated(self, text: str) -> bool:
        """True when a paragraph of ``text`` with >= ``min_words`` words is in the filter."""
        bloom = self.bloom
        return any(p in bloom for p in _iter_paragraphs(text, self.min_words))

    def stats(self) -> dict:
        """Figures for the manifest: filter size and its expected false-positive rate."""
        return {
            "eval_paragraphs": self.bloom.count,
            "num_bits": self.bloom.num_bits,
            "num_hashes": self.bloom.num_hashes,
            "false_positive_rate": self.bloom.expected_false_positive_rate(),
        }
