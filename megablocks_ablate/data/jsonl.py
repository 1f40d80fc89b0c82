"""Streaming JSONL reading: plain, .gz and .zst, with line numbers and a bad-line policy.

Bad lines are invalid JSON, a non-object value, a missing/non-string text key, or
bytes that are not UTF-8. With ``on_bad_line="error"`` the first one raises a
:class:`DataFormatError` naming the file and line; with ``"skip"`` it is counted in
:class:`BadLineCounter` and skipped.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Literal

import zstandard

from megablocks_ablate.errors import DataFormatError

OnBadLine = Literal["error", "skip"]

# What a damaged compressed stream raises: EOFError (gzip/zstd cut short), zlib.error
# (corrupt deflate data), ZstdError (corrupt zstd data); gzip.BadGzipFile is an OSError.
_STREAM_ERRORS = (EOFError, zlib.error, zstandard.ZstdError)


class _ZstdReader(io.RawIOBase):
    """Multi-frame zstd decompression that raises EOFError on a truncated last frame.

    ``ZstdDecompressor().stream_reader`` ends silently when the input stops in the
    middle of a frame, which would turn a truncated corpus into a shorter one; here a
    decompression object per frame tells us whether the frame was complete.
    """

    def __init__(self, fh: IO[bytes], chunk_size: int = 1 << 20):
        self._fh = fh
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # decompression object of the current frame
        self._buf = memoryview(b"")
        self._chunk_size = chunk_size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            if not self._fill():
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def _fill(self) -> bool:
        data = self._fh.read(self._chunk_size)
        if not data:
            if self._frame is not None and not self._frame.eof:
                raise EOFError("zstd stream ended in the middle of a frame (truncated file)")
            return False
        out = []
        while data:
            if self._frame is None or self._frame.eof:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(data))
            data = self._frame.unused_data if self._frame.eof else b""
        self._buf = memoryview(b"".join(out))
        return True

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()


def open_binary(path: str) -> IO[bytes]:
    """Open a possibly compressed file for reading bytes (by extension)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst") or path.endswith(".zstd"):
        return io.BufferedReader(_ZstdReader(open(path, "rb")), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def expand_inputs(patterns: list[str] | str) -> list[str]:
    """Expand globs in order given, sorted within each glob; error on no match."""
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    for pat in patterns:
        matches = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataFormatError(f"input {pat!r}: no such file")
        files.extend(matches)
    seen = set()
    unique = []
    for f in files:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    return unique


@dataclass
class BadLineCounter:
    """Counts skipped lines by reason (recorded in manifests)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def parse_line(raw: bytes, text_key: str) -> tuple[dict | None, str | None]:
    """Parse one JSONL line. Returns (record, None) or (None, reason)."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "bad_utf8"
    try:
        rec = json.loads(s)
    except json.JSONDecodeError:
        return None, "invalid_json"
    if not isinstance(rec, dict):
        return None, "not_an_object"
    text = rec.get(text_key)
    if text is None:
        return None, "missing_text"
    if not isinstance(text, str):
        return None, "text_not_a_string"
    return rec, None


_REASON_TEXT = {
    "bad_utf8": "bytes are not valid UTF-8",
    "invalid_json": "invalid JSON",
    "not_an_object": "expected a JSON object",
    "missing_text": "missing text key {key!r}",
    "text_not_a_string": "text key {key!r} is not a string",
}


def bad_line_error(path: str, line_no: int, reason: str, text_key: str) -> DataFormatError:
    msg = _REASON_TEXT.get(reason, reason).format(key=text_key)
    return DataFormatError(f"{path}:{line_no}: {msg} (use --on-bad-line skip to skip such lines)")


def iter_raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without newline) for non-blank lines.

    A missing file, a truncated or corrupt ``.gz`` / ``.zst`` stream, or a read error
    raises :class:`DataFormatError` naming ``path`` (never EOFError / zlib / zstd errors).
    """
    try:
        with open_binary(path) as fh:
            for line_no, raw in enumerate(fh, start=1):
                raw = raw.rstrip(b"\r\n")
                if raw.strip():
                    yield line_no, raw
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except _STREAM_ERRORS as e:
        raise DataFormatError(
            f"{path}: truncated or corrupt compressed stream ({e}); recompress or "
            "re-download the file"
        ) from None
    except OSError as e:  # includes gzip.BadGzipFile (not a gzip file / bad CRC)
        raise DataFormatError(f"{path}: cannot read: {e}") from None


def iter_jsonl(
    path: str,
    text_key: str = "text",
    on_bad_line: OnBadLine = "error",
    bad_lines: BadLineCounter | None = None,
) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each good line of one JSONL file."""
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    for line_no, raw in iter_raw_lines(path):  # stream errors: DataFormatError naming path
        rec, reason = parse_line(raw, text_key)
        if reason is not None:
            if on_bad_line == "error":
                raise bad_line_error(path, line_no, reason, text_key)
            if bad_lines is not None:
                bad_lines.add(reason)
            continue
        yield line_no, rec
