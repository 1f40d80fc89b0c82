"""Megatron-compatible indexed datasets: a streaming writer and a zero-copy mmap reader.

An indexed dataset is a pair of files sharing a prefix, byte-compatible with Megatron-LM
core ``IndexedDataset`` (little endian throughout)::

    PREFIX.bin   headerless concatenation of every sequence's tokens
    PREFIX.idx   magic b"MMIDIDX\\x00\\x00" (9 bytes) | u64 version = 1 | u8 dtype code
                 | u64 sequence count N | u64 document count D
                 | int32[N] sequence lengths (tokens)
                 | int64[N] sequence pointers (byte offset of each sequence in .bin)
                 | int64[D] document indices (first sequence of each document, then N)

A *document* is one or more consecutive sequences; ``document_indices`` starts at 0 and
ends at N, so D = documents + 1. Preprocessing writes one sequence per document.

The writer keeps bounded memory whatever the corpus size: tokens stream straight into the
``.bin`` temp file and the per-sequence lengths / document boundaries spill to temp files
in fixed-size blocks. Outputs appear only on :meth:`IndexedDatasetWriter.finalize`:
``.bin`` is renamed into place first and ``.idx`` last, so an ``.idx`` on disk marks a
complete dataset.
"""

from __future__ import annotations

import contextlib
import mmap
import operator
import os
import struct
from collections.abc import Iterator

import numpy as np

from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.utils.atomic import fsync_dir, tmp_path_for

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, sequence count, document count
_HEADER = struct.Struct("<9sQBQQ")
HEADER_SIZE = _HEADER.size  # 34

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("uint8"),
    2: np.dtype("int8"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f4"),
    8: np.dtype("<u2"),
}
CODE_OF_DTYPE: dict[np.dtype, int] = {dt: code for code, dt in DTYPE_CODES.items()}

# Rows per block when spilling or checking per-sequence arrays (bounds memory to ~MBs).
_BLOCK = 1 << 20
_COPY_CHUNK = 1 << 24
# Tokens per vectorised max/min when checking token ids against a vocabulary.
_TOKEN_CHUNK = 1 << 24


def best_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron uses: uint16 below 65500 ids, int32 above."""
    return DTYPE_CODES[8] if vocab_size < 65500 else DTYPE_CODES[4]


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def strip_suffix(path: str) -> str:
    """``data/u0.idx`` / ``data/u0.bin`` / ``data/u0`` -> ``data/u0`` (for CLI arguments)."""
    for suffix in (".idx", ".bin"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _token_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype).newbyteorder("<")
    except TypeError as e:
        raise DataFormatError(f"token dtype {dtype!r} is not a numpy dtype") from e
    if dt not in CODE_OF_DTYPE:
        names = ", ".join(d.name for d in DTYPE_CODES.values())
        raise DataFormatError(f"token dtype {dt.name} is not supported; expected one of {names}")
    return dt


class _Spool:
    """An append-only column of integers holding at most one block in memory.

    Full blocks spill to a temp file beside the dataset, so millions of documents cost
    a few MB of RAM. :meth:`blocks` replays the column in order.
    """

    def __init__(self, dtype, spill_name: str, block: int | None = None):
        self.dtype = np.dtype(dtype)
        self._buf = np.empty(block or _BLOCK, self.dtype)
        self._n = 0
        self._spill_name = spill_name
        self.spill_path: str | None = None
        self._spill = None
        self._spilled = 0

    def __len__(self) -> int:
        return self._spilled + self._n

    def append(self, value: int) -> None:
        self._buf[self._n] = value
        self._n += 1
        if self._n == self._buf.size:
            self._flush()

    def extend(self, values: np.ndarray) -> None:
        for start in range(0, len(values), self._buf.size):
            part = np.asarray(values[start : start + self._buf.size], dtype=self.dtype)
            room = self._buf.size - self._n
            head = part[:room]
            self._buf[self._n : self._n + head.size] = head
            self._n += head.size
            if self._n == self._buf.size:
                self._flush()
            tail = part[room:]
            if tail.size:
                self._buf[: tail.size] = tail
                self._n = tail.size

    def _flush(self) -> None:
        if self._spill is None:
            self.spill_path = tmp_path_for(self._spill_name)
            self._spill = open(self.spill_path, "wb")
        self._spill.write(self._buf[: self._n].data)
        self._spilled += self._n
        self._n = 0

    def blocks(self) -> Iterator[np.ndarray]:
        if self._spill is not None:
            self._spill.flush()
            with open(self.spill_path, "rb") as f:
                while True:
                    part = np.fromfile(f, self.dtype, count=self._buf.size)
                    if part.size == 0:
                        break
                    yield part
        if self._n:
            yield self._buf[: self._n]

    def remove(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self.spill_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spill_path)
            self.spill_path = None


class IndexedDatasetWriter:
    """Stream documents into ``prefix.bin`` / ``prefix.idx`` with bounded memory.

    >>> with IndexedDatasetWriter("data/unit0", best_dtype(vocab)) as w:
    ...     for ids in tokenized_docs:
    ...         w.add_document(ids)

    Leaving the ``with`` block normally finalizes; leaving it by an exception aborts
    (temp files removed, nothing at the targets).
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.dtype = _token_dtype(dtype)
        self._code = CODE_OF_DTYPE[self.dtype]
        kind = self.dtype.kind
        self._limits = (
            (np.iinfo(self.dtype).min, np.iinfo(self.dtype).max) if kind in "iu" else None
        )
        self._safe_cast: dict[np.dtype, bool] = {self.dtype: True}
        d = os.path.dirname(prefix)
        if d:
            os.makedirs(d, exist_ok=True)
        self._bin_path = tmp_path_for(data_file_path(prefix))
        self._bin = open(self._bin_path, "wb", buffering=1 << 20)
        self._lengths = _Spool(np.int32, prefix + ".lengths")
        self._doc_starts = _Spool(np.int64, prefix + ".docs")
        self._doc_starts.append(0)
        self._num_sequences = 0
        self._num_tokens = 0
        self._open_items = 0  # sequences added by add_item since the last document end
        self._idx_tmp: str | None = None
        self._done = False

    # -- properties ----------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return self._num_sequences

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def num_documents(self) -> int:
        """Completed documents (an open multi-item document is not counted yet)."""
        return len(self._doc_starts) - 1

    # -- adding data ---------------------------------------------------------------
    def _as_tokens(self, tokens) -> np.ndarray:
        arr = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        if arr.ndim != 1:
            raise DataFormatError(
                f"{data_file_path(self.prefix)}: sequence {self._num_sequences} has shape "
                f"{arr.shape}; expected a 1-D sequence of token ids"
            )
        if arr.dtype is not self.dtype and arr.dtype != self.dtype:
            safe = self._safe_cast.get(arr.dtype)
            if safe is None:
                safe = bool(np.can_cast(arr.dtype, self.dtype, "safe"))
                self._safe_cast[arr.dtype] = safe
            if not safe and arr.size:
                self._check_values(arr)
            arr = arr.astype(self.dtype)
        return arr

    def _check_values(self, arr: np.ndarray) -> None:
        where = f"{data_file_path(self.prefix)}: sequence {self._num_sequences}"
        if self._limits is None:  # float dataset: any real number fits
            if arr.dtype.kind not in "biuf":
                raise DataFormatError(f"{where} has dtype {arr.dtype}; expected numbers")
            return
        if arr.dtype.kind not in "biu":
            raise DataFormatError(
                f"{where} has dtype {arr.dtype}; expected integer token ids for {self.dtype.name}"
            )
        if self._limits[0] == 0:
            # Unsigned target: all values lie in [0, 2**bits) iff their bitwise OR does (a
            # negative value sets the sign bit). One reduction, ~2x cheaper than min + max.
            r = int(np.bitwise_or.reduce(arr))
            if 0 <= r <= self._limits[1]:
                return
        lo, hi = int(arr.min()), int(arr.max())
        if lo < self._limits[0] or hi > self._limits[1]:
            bad = lo if lo < self._limits[0] else hi
            hint = (
                " (use int32 for vocabularies of 65500 ids or more)"
                if hi > self._limits[1] and self.dtype.itemsize < 4
                else ""
            )
            raise DataFormatError(
                f"{where} has token id {bad} outside the {self.dtype.name} range "
                f"[{self._limits[0]}, {self._limits[1]}]{hint}"
            )

    def add_item(self, tokens) -> None:
        """Append one sequence to the current document (close it with :meth:`end_document`)."""
        arr = self._as_tokens(tokens)
        self._bin.write(arr.data if arr.flags.c_contiguous else arr.tobytes())
        self._lengths.append(arr.size)
        self._num_sequences += 1
        self._num_tokens += arr.size
        self._open_items += 1

    def end_document(self) -> None:
        """Close the current document (a document of zero sequences is allowed)."""
        self._doc_starts.append(self._num_sequences)
        self._open_items = 0

    def add_document(self, tokens) -> None:
        """Append one sequence that is a whole document (the preprocessing case)."""
        if self._open_items:
            raise RuntimeError(
                f"{self.prefix}: add_document() while a document from "
                "add_item() is open; call end_document() first"
            )
        arr = self._as_tokens(tokens)
        self._bin.write(arr.data if arr.flags.c_contiguous else arr.tobytes())
        self._lengths.append(arr.size)
        self._num_sequences += 1
        self._num_tokens += arr.size
        self._doc_starts.append(self._num_sequences)

    def add_index(self, prefix: str) -> None:
        """Append every sequence and document of the dataset at ``prefix`` (same dtype)."""
        if self._open_items:
            raise RuntimeError(
                f"{self.prefix}: add_index() while a document from "
                "add_item() is open; call end_document() first"
            )
        with IndexedDataset(prefix) as other:
            if other.dtype != self.dtype:
                raise DataFormatError(
                    f"{index_file_path(prefix)} has dtype {other.dtype.name}; expected "
                    f"{self.dtype.name} to append it to {self.prefix}"
                )
            nbytes = other.num_tokens * self.dtype.itemsize
            with open(data_file_path(prefix), "rb") as src:
                _copy_exact(src, self._bin, nbytes)
            for start in range(0, len(other), _BLOCK):
                self._lengths.extend(other.sequence_lengths[start : start + _BLOCK])
            docs = other.document_indices
            for start in range(1, len(docs), _BLOCK):
                self._doc_starts.extend(docs[start : start + _BLOCK] + self._num_sequences)
            self._num_sequences += len(other)
            self._num_tokens += other.num_tokens

    # -- finishing -----------------------------------------------------------------
    def finalize(self) -> None:
        """Write ``.idx``, fsync both files and rename ``.bin`` then ``.idx`` into place.

        A document left open by :meth:`add_item` is closed first.
        """
        if self._done:
            raise RuntimeError(f"{self.prefix}: writer already finalized or aborted")
        try:
            if self._open_items:
                self.end_document()
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            self._idx_tmp = idx_tmp = tmp_path_for(index_file_path(self.prefix))
            with open(idx_tmp, "wb", buffering=1 << 20) as f:
                f.write(
                    _HEADER.pack(
                        MAGIC, VERSION, self._code, self._num_sequences, len(self._doc_starts)
                    )
                )
                for block in self._lengths.blocks():
                    f.write(block.data)
                carry = 0
                for block in self._lengths.blocks():
                    nbytes = block.astype(np.int64) * self.dtype.itemsize
                    pointers = np.cumsum(nbytes)
                    pointers -= nbytes
                    pointers += carry
                    carry += int(nbytes.sum())
                    f.write(pointers.data)
                for block in self._doc_starts.blocks():
                    f.write(block.data)
                f.flush()
                os.fsync(f.fileno())
            # Drop a stale .idx first: until the new .idx lands the dataset reads as missing,
            # never as an old index paired with a new .bin.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(index_file_path(self.prefix))
            os.replace(self._bin_path, data_file_path(self.prefix))
            os.replace(idx_tmp, index_file_path(self.prefix))
            fsync_dir(os.path.dirname(self.prefix) or ".")
        except BaseException:
            self.abort()
            raise
        self._cleanup_spools()
        self._done = True

    def abort(self) -> None:
        """Discard everything written so far; the targets are left untouched."""
        self._done = True
        with contextlib.suppress(Exception):
            self._bin.close()
        for path in (self._bin_path, self._idx_tmp):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self._cleanup_spools()

    def _cleanup_spools(self) -> None:
        self._lengths.remove()
        self._doc_starts.remove()

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _copy_exact(src, dst, nbytes: int) -> None:
    """Copy exactly ``nbytes`` from ``src`` to ``dst`` in bounded chunks."""
    left = nbytes
    while left:
        chunk = src.read(min(left, _COPY_CHUNK))
        if not chunk:
            raise DataFormatError(f"{src.name} ended {left} bytes early while copying")
        dst.write(chunk)
        left -= len(chunk)


def _read_header(idx_path: str) -> tuple[np.dtype, int, int]:
    """O(1) checks of the ``.idx`` header and size; returns (dtype, N, D)."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if head[: len(MAGIC)] != MAGIC and not (len(head) < len(MAGIC) and MAGIC.startswith(head)):
        raise DataFormatError(
            f"index file {idx_path} has bad magic {head[: len(MAGIC)]!r}; expected {MAGIC!r} "
            "(not a Megatron indexed dataset .idx)"
        )
    if len(head) < HEADER_SIZE:
        raise DataFormatError(
            f"index file {idx_path} is truncated: {size} bytes, shorter than the "
            f"{HEADER_SIZE}-byte header"
        )
    _magic, version, code, n, d = _HEADER.unpack(head)
    if version != VERSION:
        raise DataFormatError(
            f"index file {idx_path} has unsupported version {version}; expected {VERSION}"
        )
    if code not in DTYPE_CODES:
        codes = ", ".join(f"{c}={dt.name}" for c, dt in DTYPE_CODES.items())
        raise DataFormatError(
            f"index file {idx_path} has unknown dtype code {code}; expected one of {codes}"
        )
    expected = HEADER_SIZE + 12 * n + 8 * d
    if size < expected:
        raise DataFormatError(
            f"index file {idx_path} is truncated: it declares {n} sequences and {d} document "
            f"indices, which need {expected} bytes, but the file has {size} bytes"
        )
    if size > expected:
        raise DataFormatError(
            f"index file {idx_path} has {size - expected} trailing bytes: it declares {n} "
            f"sequences and {d} document indices, which need exactly {expected} bytes"
        )
    return DTYPE_CODES[code], n, d


def _open_mmap(path: str):
    """A read-only mmap of ``path`` (None for an empty file, which mmap cannot map)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class IndexedDataset:
    """Zero-copy reader of ``prefix.idx`` / ``prefix.bin``; ``ds[i]`` is sequence i.

    Opening validates the header, every per-sequence array (vectorised, in blocks) and
    the ``.bin`` size; any inconsistency raises :class:`DataFormatError` naming the file.
    Returned arrays are read-only views into the memory map.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path, what in ((idx_path, "index"), (bin_path, "data")):
            if not os.path.isfile(path):
                raise DataFormatError(
                    f"{what} file {path} not found: an indexed dataset needs both "
                    f"{idx_path} and {bin_path}"
                )
        self.dtype, n, d = _read_header(idx_path)
        self._idx_mmap = _open_mmap(idx_path)
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(self._idx_mmap, np.dtype("<i4"), n, off)
        off += 4 * n
        self.sequence_pointers = np.frombuffer(self._idx_mmap, np.dtype("<i8"), n, off)
        off += 8 * n
        self.document_indices = np.frombuffer(self._idx_mmap, np.dtype("<i8"), d, off)
        self.num_tokens = self._check_arrays(idx_path)

        expected = self.num_tokens * self.dtype.itemsize
        size = os.path.getsize(bin_path)
        if size != expected:
            state = "truncated" if size < expected else "longer than its index"
            raise DataFormatError(
                f"data file {bin_path} has {size} bytes; expected {expected} "
                f"({self.num_tokens} {self.dtype.name} tokens per {idx_path}): the .bin is {state}"
            )
        self._bin_mmap = _open_mmap(bin_path)
        self._tokens = (
            np.frombuffer(self._bin_mmap, self.dtype)
            if self._bin_mmap is not None
            else np.empty(0, self.dtype)
        )
        self._tokens.flags.writeable = False

    def _check_arrays(self, idx_path: str) -> int:
        """Vectorised consistency checks; returns the total token count."""
        lengths, pointers, docs = (
            self.sequence_lengths,
            self.sequence_pointers,
            self.document_indices,
        )
        n = len(lengths)
        if len(docs) == 0:
            raise DataFormatError(
                f"index file {idx_path} has no document indices; expected at least [0, {n}]"
            )
        if docs[0] != 0:
            raise DataFormatError(
                f"index file {idx_path}: document indices start at {docs[0]}; expected 0"
            )
        if docs[-1] != n:
            raise DataFormatError(
                f"index file {idx_path}: document indices end at {docs[-1]}; expected {n} "
                "(the sequence count)"
            )
        for start in range(0, len(docs) - 1, _BLOCK):
            part = docs[start : start + _BLOCK + 1]
            bad = np.flatnonzero(part[1:] < part[:-1])
            if bad.size:
                i = start + int(bad[0])
                raise DataFormatError(
                    f"index file {idx_path}: document indices decrease at position {i + 1} "
                    f"({docs[i]} then {docs[i + 1]}); expected a non-decreasing sequence"
                )
        itemsize = self.dtype.itemsize
        carry = 0  # byte offset where the next block's first sequence must start
        for start in range(0, n, _BLOCK):
            lens = lengths[start : start + _BLOCK]
            neg = np.flatnonzero(lens < 0)
            if neg.size:
                i = start + int(neg[0])
                raise DataFormatError(
                    f"index file {idx_path}: sequence {i} has negative length {lengths[i]}"
                )
            nbytes = lens.astype(np.int64) * itemsize
            expected = np.cumsum(nbytes)
            expected -= nbytes
            expected += carry
            bad = np.flatnonzero(pointers[start : start + _BLOCK] != expected)
            if bad.size:
                j = int(bad[0])
                raise DataFormatError(
                    f"index file {idx_path}: sequence {start + j} has pointer "
                    f"{pointers[start + j]}; expected byte offset {expected[j]} (the sum of "
                    "the lengths before it times the item size)"
                )
            carry += int(nbytes.sum())
        return carry // itemsize

    # -- access --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        i = operator.index(i)
        n = len(self.sequence_lengths)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self._tokens[start : start + int(self.sequence_lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (to its end if no length)."""
        seq = self[i]
        if not 0 <= offset <= seq.size:
            raise IndexError(f"offset {offset} out of range for sequence {i} of length {seq.size}")
        if length is None:
            return seq[offset:]
        if length < 0 or offset + length > seq.size:
            raise IndexError(
                f"offset {offset} + length {length} exceeds sequence {i} of length {seq.size}"
            )
        return seq[offset : offset + length]

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    # -- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        """Drop this object's views and unmap; views still held elsewhere keep the map alive."""
        self._tokens = np.empty(0, self.dtype)
        self.sequence_lengths = np.empty(0, np.int32)
        self.sequence_pointers = np.empty(0, np.int64)
        self.document_indices = np.zeros(1, np.int64)
        for mm in (self._idx_mmap, self._bin_mmap):
            if mm is not None:
                with contextlib.suppress(BufferError):  # a caller still holds a view
                    mm.close()
        self._idx_mmap = self._bin_mmap = None

    def __enter__(self) -> IndexedDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        # mmaps do not pickle; a DataLoader worker reopens (and revalidates) by prefix.
        return (type(self), (self.prefix,))

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, sequences={len(self)}, "
            f"documents={self.num_documents}, tokens={self.num_tokens}, "
            f"dtype={self.dtype.name})"
        )


def concat_indexed(prefixes: list[str], out_prefix: str) -> None:
    """Concatenate datasets (all the same dtype) into ``out_prefix``, streaming."""
    if not prefixes:
        raise DataFormatError(f"nothing to concatenate into {out_prefix}: no input datasets")
    # Validate every input before writing anything.
    dtypes = [validate_indexed(p)["dtype"] for p in prefixes]
    for p, name in zip(prefixes, dtypes):
        if name != dtypes[0]:
            raise DataFormatError(
                f"{index_file_path(p)} has dtype {name}; expected {dtypes[0]} like "
                f"{index_file_path(prefixes[0])} (all inputs of a concatenation share one dtype)"
            )
    dtype = np.dtype(dtypes[0])
    with IndexedDatasetWriter(out_prefix, dtype) as w:
        for p in prefixes:
            w.add_index(p)


def _first_bad_token(part: np.ndarray, vocab_size: int) -> int | None:
    """Position in ``part`` of its first id outside ``[0, vocab_size)``, or None.

    One max (and, for signed or float ids, one min) per call; the mask is built only
    when a bad id is present."""
    if part.dtype.kind == "f":
        ok = bool(np.isfinite(part).all()) and part.min() >= 0 and part.max() < vocab_size
    else:
        ok = int(part.max()) < vocab_size and (part.dtype.kind == "u" or int(part.min()) >= 0)
    if ok:
        return None
    bad = ~((part >= 0) & (part < vocab_size))  # NaN compares False: counted as bad
    return int(np.flatnonzero(bad)[0])


def check_token_range(
    prefix_or_dataset: str | os.PathLike | IndexedDataset, vocab_size: int
) -> None:
    """Raise :class:`DataFormatError` unless every token id lies in ``[0, vocab_size)``.

    ``prefix_or_dataset`` is an open :class:`IndexedDataset` (left open) or a prefix
    (opened, validated and closed here). The ``.bin`` is scanned through its memory map in
    chunks of ``_TOKEN_CHUNK`` tokens with a vectorised max/min each, so memory stays
    bounded whatever its size. The message names the ``.bin``, the first offending
    sequence and its document, the token id and ``vocab_size``, e.g.::

        data/u0.bin: sequence 12 (document 12) has token id 70000 at offset 5; the
        tokenizer's vocabulary has 50304 ids (valid ids are 0..50303) ...
    """
    if isinstance(prefix_or_dataset, IndexedDataset):
        _check_token_range(prefix_or_dataset, vocab_size)
        return
    with IndexedDataset(os.fspath(prefix_or_dataset)) as ds:
        _check_token_range(ds, vocab_size)


def _check_token_range(ds: IndexedDataset, vocab_size: int) -> None:
    vocab_size = operator.index(vocab_size)
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size}")
    tokens = ds._tokens
    for start in range(0, tokens.size, _TOKEN_CHUNK):
        j = _first_bad_token(tokens[start : start + _TOKEN_CHUNK], vocab_size)
        if j is None:
            continue
        pos = start + j
        seq = int(np.searchsorted(ds.sequence_pointers, pos * ds.dtype.itemsize, "right")) - 1
        doc = int(np.searchsorted(ds.document_indices, seq, "right")) - 1
        offset = pos - int(ds.sequence_pointers[seq]) // ds.dtype.itemsize
        value = tokens[pos].item()
        raise DataFormatError(
            f"{data_file_path(ds.prefix)}: sequence {seq} (document {doc}) has token id "
            f"{value} at offset {offset}; the tokenizer's vocabulary has {vocab_size} ids "
            f"(valid ids are 0..{vocab_size - 1}): was it tokenized with another tokenizer?"
        )


def validate_indexed(prefix: str, vocab_size: int | None = None) -> dict:
    """Check ``prefix.idx``/``prefix.bin`` fully (and, given ``vocab_size``, every token id
    with :func:`check_token_range`); return a summary or raise DataFormatError."""
    with IndexedDataset(prefix) as ds:
        if vocab_size is not None:
            check_token_range(ds, vocab_size)
        return {
            "sequences": len(ds),
            "documents": ds.num_documents,
            "tokens": ds.num_tokens,
            "dtype": ds.dtype.name,
        }
