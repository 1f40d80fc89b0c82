"""Reading and writing safetensors files without loading them whole.

- :func:`safetensors_header` parses and validates a header (:func:`validate_header`:
  the one set of rules every reader of weights here applies, the safetensors library's:
  known dtypes, offsets contiguous, non-overlapping and covering the data section
  exactly), so a truncated, padded or malformed file is refused before any tensor is
  touched, naming the file and the tensor;
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
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
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
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
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


# A header longer than this is refused before it is read (safetensors' own limit).
MAX_HEADER_BYTES = 100 << 20


def _int(x: Any) -> int | None:
    """``x`` as a non-negative JSON integer (not a bool or float), else None."""
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None


def _bad(path: str, name: str, info: Any, why: str) -> DataFormatError:
    shown = repr(info)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    return DataFormatError(f"{path}: tensor {name!r}: {why} ({shown})")


def _span(path: str, name: str, info: Any) -> tuple[int, int]:
    """``(begin, end)`` of one header entry, checked on its own (``__metadata__``: 0, 0)."""
    if name == "__metadata__":
        return 0, 0
    if not isinstance(info, dict):
        raise _bad(path, name, info, "header entry is not an object")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
        raise _bad(path, name, dtype, "unknown dtype")
    shape = info.get("shape")
    dims = [_int(x) for x in shape] if isinstance(shape, list) else [None]
    numel = 1
    for d in dims:
        if d is None:
            raise _bad(path, name, shape, "shape is not a list of non-negative integers")
        numel *= d
    offsets = info.get("data_offsets")
    pair = [_int(x) for x in offsets] if isinstance(offsets, list) else []
    begin, end = (pair[0], pair[1]) if len(pair) == 2 else (None, None)
    if begin is None or end is None or begin > end:
        raise _bad(path, name, offsets, "data_offsets is not [begin, end] with begin <= end")
    need = numel * SAFETENSORS_ITEMSIZE[dtype]
    if end - begin != need:
        raise _bad(
            path,
            name,
            offsets,
            f"data_offsets span {end - begin} bytes, {dtype} {shape} needs {need}",
        )
    return begin, end


def validate_header(header: Any, header_len: int, file_size: int, path: str) -> dict:
    """Check a parsed safetensors header against its file; returns it.

    The one set of rules every reader of weights applies (the safetensors library's, so
    a file our memory-mapping readers accept is one ``safe_open`` accepts too): a JSON
    object of tensors, each with a known ``dtype``, a ``shape`` of non-negative integers
    and ``data_offsets`` ``[begin, end]`` of exactly ``numel * itemsize`` bytes; sorted by
    offset the tensors are contiguous and non-overlapping, start at 0 and cover the data
    section exactly (file size == 8 + header length + last end). ``__metadata__``, when
    present, maps strings to strings. Errors (DataFormatError) name the file and tensor.
    """
    if not isinstance(header, dict):
        raise DataFormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise DataFormatError(f"{path}: __metadata__ must map strings to strings")
    spans = [(*_span(path, name, info), name) for name, info in header.items()]
    spans = [x for x in spans if x[2] != "__metadata__"]
    spans.sort()
    at, prev = 0, None
    for begin, end, name in spans:
        if begin != at:
            what = (
                f"overlaps tensor {prev!r} (which ends at {at})"
                if begin < at
                else f"leaves a gap: bytes {at}-{begin} belong to no tensor"
            )
            raise DataFormatError(
                f"{path}: tensor {name!r} starts at byte {begin} of the data section and "
                f"{what}; tensors must be contiguous and not overlap"
            )
        at, prev = end, name
    data_len = file_size - 8 - header_len
    if at > data_len:
        raise DataFormatError(
            f"{path}: truncated: tensor {prev!r} needs bytes up to {at} of the data section, "
            f"the file has {data_len}"
        )
    if at < data_len:
        raise DataFormatError(
            f"{path}: {data_len - at} bytes after the end of the last tensor"
            + (f" ({prev!r})" if prev is not None else "")
            + ": the data section must hold the tensors exactly"
        )
    return header


def read_header(f: BinaryIO, path: str) -> tuple[dict, int]:
    """``(header, header length)`` of the open safetensors file ``f`` (read from its
    start), validated against its size (:func:`validate_header`)."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    raw = f.read(8)
    if len(raw) < 8:
        raise DataFormatError(f"{path}: truncated safetensors file ({size} bytes)")
    n = int.from_bytes(raw, "little")
    if n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise DataFormatError(
            f"{path}: corrupt or truncated safetensors header (header length {n}, file size {size})"
        )
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataFormatError(f"{path}: corrupt safetensors header ({e})") from None
    return validate_header(header, n, size, path), n


def safetensors_header(path: str) -> dict:
    """Parse and validate a safetensors header: ``{name: {dtype, shape, data_offsets}}``
    (plus ``__metadata__``); see :func:`validate_header` for what is checked. A
    truncated, padded or malformed file is refused before any tensor is touched."""
    with open(path, "rb") as f:
        return read_header(f, path)[0]


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
        with open(path, "rb") as f:  # one open: the header checked is the file mapped
            self.header, n = read_header(f, path)
            self._base = 8 + n
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        ends = [v["data_offsets"][1] for k, v in self.header.items() if k != "__metadata__"]
        if len(self._mm) != self._base + max(ends, default=0):
            self._mm.close()
            raise DataFormatError(f"{path}: changed size while it was being opened")
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
