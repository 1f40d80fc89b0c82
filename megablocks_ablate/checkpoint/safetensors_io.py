"""Reading and writing safetensors files without loading them whole.

- :func:`safetensors_header` parses and validates a header (a truncated or malformed
  file is refused before any tensor is touched);
- :class:`MappedSafetensors` memory-maps a file for zero-copy views of tensors, or of
  element ranges of them, and drops consumed pages again (streaming merges);
- :class:`SafetensorsStreamWriter` writes a file whose header is known up front, tensor
  by tensor and chunk by chunk, so an output never has to sit in memory whole.
"""

from __future__ import annotations

import json
import math
import os
from typing import BinaryIO

import torch

from megablocks_ablate.errors import DataFormatError

# safetensors dtype names -> torch dtypes (the ones model weights use)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def safetensors_header(path: str) -> dict:
    """Parse and validate a safetensors header: ``{name: {dtype, shape, data_offsets}}``
    (plus ``__metadata__``). Checks that the data section covers every tensor exactly
    as declared and that the file is not truncated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise DataFormatError(f"{path}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise DataFormatError(
                f"{path}: corrupt or truncated safetensors header "
                f"(header length {n}, file size {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataFormatError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise DataFormatError(f"{path}: corrupt safetensors header (not an object)")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            numel = math.prod(int(x) for x in info["shape"])
            ok = (
                0 <= begin <= end
                and info["dtype"] in SAFETENSORS_DTYPES
                and end - begin == numel * SAFETENSORS_DTYPES[info["dtype"]].itemsize
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise DataFormatError(
                f"{path}: tensor {name!r} has a malformed header entry ({info!r})"
            )
        if end > data_len:
            raise DataFormatError(
                f"{path}: truncated: tensor {name!r} needs bytes up to "
                f"{end} of the data section, the file has {data_len}"
            )
    return header


class MappedSafetensors:
    """A safetensors file memory-mapped for streaming: zero-copy views of tensors (or of
    element ranges of them) and release of consumed pages.

    The map is private copy-on-write, so writing to a view never changes the file.
    Pages are read from disk when first touched and count towards the process's
    resident memory until :meth:`release` drops them again, which is how a streaming
    merge over N large inputs keeps its resident set near one chunk per input.
    """

    def __init__(self, path: str):
        import mmap

        self.path = path
        self.header = safetensors_header(path)
        with open(path, "rb") as f:
            self._base = 8 + int.from_bytes(f.read(8), "little")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        entries = sorted(
            (v["data_offsets"][0], k) for k, v in self.header.items() if k != "__metadata__"
        )
        self.names = [k for _, k in entries]  # file order

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.header[name]["dtype"]]

    def shape(self, name: str) -> list[int]:
        return [int(x) for x in self.header[name]["shape"]]

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def flat(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements ``[start, start + count)`` of tensor ``name`` as a zero-copy 1-D view."""
        n = self.numel(name)
        count = n - start if count is None else count
        dtype = self.dtype(name)
        if not 0 <= start <= start + count <= n:
            raise IndexError(f"{self.path}: {name}: range {start}+{count} outside {n} elements")
        if count == 0:
            return torch.empty(0, dtype=dtype)
        offset = self._base + self.header[name]["data_offsets"][0] + start * dtype.itemsize
        return torch.frombuffer(self._mm, dtype=dtype, count=count, offset=offset)

    def tensor(self, name: str) -> torch.Tensor:
        return self.flat(name).view(self.shape(name))

    def release(self, name: str, start: int = 0, count: int | None = None) -> None:
        """Drop the resident pages wholly inside that element range (they stay in the
        page cache; a later access reads them back). A no-op where unsupported."""
        import mmap

        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        n = self.numel(name)
        count = n - start if count is None else count
        size = self.dtype(name).itemsize
        begin = self._base + self.header[name]["data_offsets"][0] + start * size
        end = begin + count * size
        page = mmap.PAGESIZE
        lo, hi = -(-begin // page) * page, end // page * page
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class SafetensorsStreamWriter:
    """Write a safetensors file in a declared order, chunk by chunk.

    The header (names, dtypes, shapes) is written first, so each tensor's bytes must
    then arrive in exactly that order and amount; :meth:`close` refuses a file whose
    data is short. Tensors are laid out largest element size first (then by name), as
    safetensors itself does, so every tensor stays aligned for zero-copy readers.
    """

    def __init__(self, f: BinaryIO, entries: list[tuple[str, torch.dtype, list[int]]]):
        self._f = f
        self.entries = sorted(entries, key=lambda e: (-e[1].itemsize, e[0]))
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._sizes: list[int] = []
        for name, dtype, shape in self.entries:
            nbytes = dtype.itemsize * math.prod(shape)
            header[name] = {
                "dtype": _DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._sizes.append(nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        self._total, self._written = offset, 0

    @property
    def order(self) -> list[str]:
        """Tensor names in the order their bytes must be written."""
        return [name for name, _, _ in self.entries]

    def write(self, chunk: torch.Tensor) -> None:
        """Append the bytes of ``chunk`` (the next elements in file order)."""
        data = memoryview(chunk.contiguous().view(torch.uint8).numpy())  # type: ignore[arg-type]
        if self._written + data.nbytes > self._total:
            raise ValueError("more tensor data written than the header declares")
        self._f.write(data)
        self._written += data.nbytes

    def close(self) -> None:
        if self._written != self._total:
            raise ValueError(
                f"safetensors data incomplete: {self._written} of {self._total} bytes written"
            )
