"""Reading and writing safetensors files without loading them whole.

- :func:`safetensors_header` parses and validates a header (a truncated or malformed
  file is refused before any tensor is touched);
- :class:`MappedSafetensors` memory-maps a file for zero-copy views of tensors, or of
  element ranges of them, and drops consumed pages again (streaming merges);
- :class:`SafetensorsStreamWriter` writes a file whose header is known up front, tensor
  by tensor and chunk by chunk, so an output never has to sit in memory whole.

Nothing here imports torch until a torch tensor or dtype is asked for: a file merge
works on dtype names, byte ranges and raw addresses (see :mod:`megablocks_ablate.merge.
file_merge`) and so starts without torch's second of import time.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from typing import TYPE_CHECKING, Any, BinaryIO

from megablocks_ablate.errors import DataFormatError

if TYPE_CHECKING:
    import torch

# safetensors dtype names (the ones model weights use) -> bytes per element
SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _torch_dtypes() -> dict[str, torch.dtype]:
    table = globals().get("SAFETENSORS_DTYPES")
    if table is None:
        import torch

        table = {k: getattr(torch, v) for k, v in _TORCH_NAMES.items()}
        globals()["SAFETENSORS_DTYPES"] = table
    return table


def __getattr__(name: str) -> Any:
    # SAFETENSORS_DTYPES (safetensors name -> torch dtype) is built on first use, so
    # importing this module does not import torch.
    if name == "SAFETENSORS_DTYPES":
        return _torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: Any) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``"F32"``); a
    safetensors name is returned as it is."""
    if isinstance(dtype, str):
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise ValueError(f"unknown safetensors dtype {dtype!r}")
        return dtype
    for k, v in _TORCH_NAMES.items():
        if str(dtype) == f"torch.{v}":
            return k
    raise ValueError(f"dtype {dtype} has no safetensors name")


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
                and info["dtype"] in SAFETENSORS_ITEMSIZE
                and end - begin == numel * SAFETENSORS_ITEMSIZE[info["dtype"]]
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

    Besides torch views (:meth:`flat`, :meth:`tensor`) it gives what a caller without
    torch needs: dtype names (:meth:`dtype_name`), absolute byte ranges
    (:meth:`byte_range`), zero-copy memoryviews (:meth:`view`) and the raw address of
    an element (:meth:`address`, valid while this object is alive).
    """

    def __init__(self, path: str):
        self.path = path
        self.header = safetensors_header(path)
        with open(path, "rb") as f:
            self._base = 8 + int.from_bytes(f.read(8), "little")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        entries = sorted(
            (v["data_offsets"][0], k) for k, v in self.header.items() if k != "__metadata__"
        )
        self.names = [k for _, k in entries]  # file order
        self._address: int | None = None

    def dtype(self, name: str) -> torch.dtype:
        return _torch_dtypes()[self.header[name]["dtype"]]

    def dtype_name(self, name: str) -> str:
        """The tensor's safetensors dtype name (``"F32"``, ``"BF16"``, ...)."""
        return self.header[name]["dtype"]

    def itemsize(self, name: str) -> int:
        return SAFETENSORS_ITEMSIZE[self.header[name]["dtype"]]

    def shape(self, name: str) -> list[int]:
        return [int(x) for x in self.header[name]["shape"]]

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def byte_range(self, name: str, start: int = 0, count: int | None = None) -> tuple[int, int]:
        """``[begin, end)`` in the file of elements ``[start, start + count)`` of ``name``."""
        n = self.numel(name)
        count = n - start if count is None else count
        if not 0 <= start <= start + count <= n:
            raise IndexError(f"{self.path}: {name}: range {start}+{count} outside {n} elements")
        size = self.itemsize(name)
        begin = self._base + self.header[name]["data_offsets"][0] + start * size
        return begin, begin + count * size

    def view(self, name: str, start: int = 0, count: int | None = None) -> memoryview:
        """Those elements' bytes as a zero-copy memoryview (release it before close)."""
        begin, end = self.byte_range(name, start, count)
        return memoryview(self._mm)[begin:end]

    def address(self, name: str, start: int = 0) -> int:
        """The raw address of element ``start`` of ``name`` in the mapping (for C
        kernels); valid as long as this object is alive and not closed."""
        if self._address is None:
            import ctypes

            # The map never moves, so its address can be read once; the ctypes view
            # that reveals it is dropped right away so that it pins no buffer export.
            probe = ctypes.c_char.from_buffer(self._mm)
            self._address = ctypes.addressof(probe)
            del probe
        return self._address + self.byte_range(name, start, 0)[0]

    def close(self) -> None:
        """Unmap the file (refused while torch views or memoryviews of it are alive)."""
        self._address = None
        self._mm.close()

    def flat(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements ``[start, start + count)`` of tensor ``name`` as a zero-copy 1-D view."""
        import torch

        begin, end = self.byte_range(name, start, count)
        dtype = self.dtype(name)
        if end == begin:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(
            self._mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin
        )

    def tensor(self, name: str) -> torch.Tensor:
        return self.flat(name).view(self.shape(name))

    def release(self, name: str, start: int = 0, count: int | None = None) -> None:
        """Drop the resident pages wholly inside that element range (they stay in the
        page cache; a later access reads them back). A no-op where unsupported."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = self.byte_range(name, start, count)
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

    An entry's dtype is a torch dtype or a safetensors name (``"F32"``); data arrives
    as torch tensors (:meth:`write`) or as any bytes-like buffer (:meth:`write_bytes`).
    """

    def __init__(self, f: BinaryIO, entries: list[tuple[str, Any, list[int]]]):
        self._f = f
        named = [(name, dtype_name(dtype), list(shape)) for name, dtype, shape in entries]
        self.entries = sorted(named, key=lambda e: (-SAFETENSORS_ITEMSIZE[e[1]], e[0]))
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._sizes: list[int] = []
        for name, dtype, shape in self.entries:
            nbytes = SAFETENSORS_ITEMSIZE[dtype] * math.prod(shape)
            header[name] = {
                "dtype": dtype,
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
        import torch

        self.write_bytes(memoryview(chunk.contiguous().view(torch.uint8).numpy()))  # type: ignore[arg-type]

    def write_bytes(self, data: Any) -> None:
        """Append a bytes-like buffer (the next elements' bytes in file order), whole:
        a short write by the OS is continued, so a raw (unbuffered) file works too."""
        view = memoryview(data).cast("B")
        if self._written + view.nbytes > self._total:
            raise ValueError("more tensor data written than the header declares")
        done = 0
        while done < view.nbytes:
            n = self._f.write(view[done:])
            done = view.nbytes if n is None else done + n
        self._written += view.nbytes

    def close(self) -> None:
        if self._written != self._total:
            raise ValueError(
                f"safetensors data incomplete: {self._written} of {self._total} bytes written"
            )
