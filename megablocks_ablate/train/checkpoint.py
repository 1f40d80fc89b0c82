"""Model checkpoints: ``model.safetensors`` + ``config.json`` + ``lineage.json``.

A model checkpoint is a directory::

    ckpt/
      model.safetensors   # weights, no pickle anywhere
      config.json         # the model config (a plain dict, written by the model package)
      lineage.json        # where the weights came from (see :class:`Lineage`)

The lineage is what makes merging safe: unit models may only be averaged when they
continue from the same seed (``seed_hash``) with the same tokenizer
(``tokenizer_fingerprint``). ``seed_hash`` is :func:`model_hash` of the seed
checkpoint, i.e. the sha256 of its ``model.safetensors``.

Writes are atomic at directory level: everything is written into a temporary
directory beside the target, fsynced, then renamed into place, so a reader sees
either the old checkpoint or the complete new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.utils.hashing import sha256_file

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LINEAGE_FILE = "lineage.json"

LINEAGE_KINDS = ("seed", "unit", "seq", "merged", "imported")

# safetensors dtype names -> torch dtypes (the ones model weights use)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass
class Lineage:
    """Provenance of a model checkpoint (``lineage.json``).

    kind: "seed" (pretrained from scratch), "unit" (continued from the seed on one
        base unit), "seq" (trained on a mixture of units), "merged" (weighted parameter
        average of unit models) or "imported" (e.g. from Hugging Face).
    seed_hash: sha256 of the seed's ``model.safetensors`` (None for a seed itself).
    units: base units trained on (or merged).
    weights: weight per unit (training blend, or merge weights), same length as units.
    tokens_seen: tokens trained on (for merges: the total over the inputs).
    tokenizer_fingerprint: fingerprint of the tokenizer the model expects.
    parents: for merges, the input checkpoints (paths or hashes).
    extra: free-form JSON-serialisable details.
    """

    kind: str
    seed_hash: str | None = None
    units: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    tokenizer_fingerprint: str | None = None
    parents: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "lineage") -> None:
        """Raise DataFormatError (naming ``where`` and the field) if a field is invalid."""

        def bad(name: str, expected: str, got: Any) -> DataFormatError:
            return DataFormatError(f"{where}: field '{name}' must be {expected}, got {got!r}")

        if self.kind not in LINEAGE_KINDS:
            raise bad("kind", f"one of {', '.join(LINEAGE_KINDS)}", self.kind)
        for name in ("seed_hash", "tokenizer_fingerprint"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise bad(name, "a string or null", v)
        for name in ("units", "parents"):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise bad(name, "a list of strings", v)
        if not isinstance(self.weights, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            for x in self.weights
        ):
            raise bad("weights", "a list of finite numbers", self.weights)
        if self.weights and len(self.weights) != len(self.units):
            raise bad("weights", f"one weight per unit ({len(self.units)})", self.weights)
        if isinstance(self.tokens_seen, bool) or not isinstance(self.tokens_seen, int) \
                or self.tokens_seen < 0:
            raise bad("tokens_seen", "a non-negative integer", self.tokens_seen)
        if not isinstance(self.extra, dict):
            raise bad("extra", "an object", self.extra)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weights"] = [float(w) for w in self.weights]
        return d

    @classmethod
    def from_dict(cls, d: Any, path: str | None = None) -> "Lineage":
        """Build and validate; errors name ``path`` (the lineage file) when given."""
        where = path or "lineage"
        if not isinstance(d, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataFormatError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
        if "kind" not in d:
            raise DataFormatError(f"{where}: missing required field 'kind'")
        obj = cls.__new__(cls)  # bypass __post_init__ so errors can name the file
        for f in dataclasses.fields(cls):
            if f.name in d:
                value = d[f.name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                value = f.default_factory()  # type: ignore[misc]
            setattr(obj, f.name, value)
        if isinstance(obj.weights, list):  # JSON ints are fine as weights
            obj.weights = [float(w) if isinstance(w, int) and not isinstance(w, bool) else w
                           for w in obj.weights]
        obj.validate(where)
        return obj


# ----------------------------------------------------------------------------- writing


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; shared storages (tied weights) are cloned,
    because safetensors stores each tensor on its own."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


@contextlib.contextmanager
def staged_checkpoint_dir(directory: str):
    """Yield a temporary directory beside ``directory``; on success it is fsynced and
    renamed into place (an existing checkpoint is replaced only once the new one is
    complete). On error the temporary directory is removed."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(directory) + ".", suffix=".tmp",
                           dir=parent)
    try:
        yield tmp
        for name in os.listdir(tmp):
            _fsync_path(os.path.join(tmp, name))
        _fsync_path(tmp)
        old = None
        if os.path.lexists(directory):
            # Move the old checkpoint aside first: a crash now leaves the old one
            # under `old` and the new one complete under `tmp`, never a mixture.
            old = tempfile.mkdtemp(prefix="." + os.path.basename(directory) + ".",
                                   suffix=".old", dir=parent)
            os.rmdir(old)
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_path(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model_checkpoint(directory: str, state_dict: dict[str, torch.Tensor], config: dict,
                          lineage: Lineage) -> None:
    """Write ``model.safetensors``, ``config.json`` and ``lineage.json`` atomically."""
    from safetensors.torch import save_file

    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    lineage.validate()
    tensors = _plain_tensors(state_dict)
    with staged_checkpoint_dir(directory) as tmp:
        save_file(tensors, os.path.join(tmp, MODEL_FILE), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, CONFIG_FILE), config)
        _write_json(os.path.join(tmp, LINEAGE_FILE), lineage.to_dict())


# ----------------------------------------------------------------------------- reading


def _require_file(directory: str, name: str) -> str:
    if not os.path.isdir(directory):
        raise DataFormatError(f"{directory}: checkpoint directory does not exist")
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: missing checkpoint file (expected {MODEL_FILE}, "
                              f"{CONFIG_FILE} and {LINEAGE_FILE})")
    return path


def model_file(directory: str) -> str:
    """Path of the checkpoint's ``model.safetensors`` (DataFormatError if absent)."""
    return _require_file(directory, MODEL_FILE)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: invalid JSON ({e})") from None


def read_checkpoint_meta(directory: str) -> tuple[dict, Lineage]:
    """The model config and lineage of a checkpoint, without touching its weights."""
    cfg_path = _require_file(directory, CONFIG_FILE)
    config = _read_json(cfg_path)
    if not isinstance(config, dict):
        raise DataFormatError(f"{cfg_path}: expected a JSON object")
    lin_path = _require_file(directory, LINEAGE_FILE)
    return config, Lineage.from_dict(_read_json(lin_path), path=lin_path)


def open_model_weights(directory: str):
    """A memory-mapped ``safetensors.safe_open`` handle (framework "pt") on the weights,
    after checking that every tensor's byte range lies inside the file (safetensors
    maps lazily, so a truncated file would otherwise fail late or not at all)."""
    from safetensors import SafetensorError, safe_open

    path = _require_file(directory, MODEL_FILE)
    safetensors_header(path)
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise DataFormatError(f"{path}: cannot read safetensors file ({e})") from None


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
            raise DataFormatError(f"{path}: corrupt or truncated safetensors header "
                                  f"(header length {n}, file size {size})")
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
            ok = 0 <= begin <= end and info["dtype"] in SAFETENSORS_DTYPES and \
                end - begin == numel * SAFETENSORS_DTYPES[info["dtype"]].itemsize
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise DataFormatError(f"{path}: tensor {name!r} has a malformed header entry "
                                  f"({info!r})")
        if end > data_len:
            raise DataFormatError(f"{path}: truncated: tensor {name!r} needs bytes up to "
                                  f"{end} of the data section, the file has {data_len}")
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
        entries = sorted((v["data_offsets"][0], k) for k, v in self.header.items()
                         if k != "__metadata__")
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


def map_model_weights(directory: str) -> dict[str, torch.Tensor]:
    """Zero-copy tensors over a memory map of ``model.safetensors``, in file order.

    Pages are read from disk only when touched; the tensors keep the map alive (see
    :class:`MappedSafetensors` for streaming with bounded resident memory).
    """
    mapped = MappedSafetensors(_require_file(directory, MODEL_FILE))
    return {name: mapped.tensor(name) for name in mapped.names}


def load_model_checkpoint(directory: str, device: str | torch.device = "cpu"
                          ) -> tuple[dict[str, torch.Tensor], dict, Lineage]:
    """``(state_dict, config, lineage)`` of a checkpoint directory."""
    config, lineage = read_checkpoint_meta(directory)
    path = os.path.join(directory, MODEL_FILE)
    with open_model_weights(directory) as f:
        try:
            state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise DataFormatError(f"{path}: cannot read tensors ({e})") from None
    if str(device) != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
    return state, config, lineage


def model_hash(directory: str) -> str:
    """sha256 of the checkpoint's ``model.safetensors`` (what ``Lineage.seed_hash`` records)."""
    return sha256_file(_require_file(directory, MODEL_FILE))
