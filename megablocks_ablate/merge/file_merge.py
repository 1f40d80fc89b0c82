"""Streaming checkpoint-to-checkpoint merge (``megablocks-ablate merge``).

Memory stays near a few chunks, never N models: the inputs are memory-mapped
safetensors files, the output is written tensor by tensor, chunk by chunk, each chunk
computed by one C++ kernel call straight from the mapped input bytes into an output
buffer (each input read once), and the pages of consumed input chunks are dropped
from the resident set right away. The output checkpoint (weights, config, lineage)
appears atomically.

Speed: the merge is memory traffic, so the path is kept free of everything else. It
imports neither torch nor numpy (dtypes are safetensors names, tensors are byte
ranges and raw addresses, :func:`.kernels.merge_raw`); the kernel fuses the NaN/inf
check into its store; a second thread writes each merged chunk to the file while the
next one is computed, and asks the OS to start writing it back to disk, so that the
one fsync at the end has little left to wait for. Only when ``MBA_KERNELS`` selects
another backend (or the C++ extension is missing) are chunks merged as torch views.

Everything that can be checked without reading weights is checked first: the
tensors' names and shapes, the model configs, the seed lineage (refused unless
``allow_different_seed``) and the tokenizer fingerprint.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from megablocks_ablate.checkpoint import (
    CONFIG_FILE,
    LINEAGE_FILE,
    MODEL_FILE,
    Lineage,
    MappedSafetensors,
    SafetensorsStreamWriter,
    merged_seq_len,
    model_file,
    model_hash,
    read_checkpoint_meta,
    staged_checkpoint_dir,
    write_checkpoint_meta,
)
from megablocks_ablate.errors import ConfigError, DataFormatError, NonFiniteError
from megablocks_ablate.merge.kernels import CODES, merge_raw, select_backend
from megablocks_ablate.merge.spec import MergeSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# --dtype option -> safetensors dtype name
DTYPE_OPTIONS = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
_LABELS = {v: k for k, v in DTYPE_OPTIONS.items()}
_MAX_FINITE = {"F32": 3.4028234663852886e38, "BF16": 3.3895313892515355e38, "F16": 65504.0}
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}

# Elements per kernel call: 2M (8 MiB of fp32 output). Resident input pages are
# released after every chunk and the writer holds at most _BUFFERS output chunks, so
# the merge adds about (N + _BUFFERS) chunks to the process (~100 MiB for 8 fp32
# inputs), while chunks stay large enough that per-call costs vanish.
CHUNK = 1 << 21
_BUFFERS = 3
# Start the disk write-back of the output every this many bytes (see _Writer).
_WRITEBACK_EVERY = 64 << 20


def kernel_threads() -> int:
    """Kernel threads for a file merge: one core is left to the writer thread, the
    rest merge, up to 8 (enough to saturate memory bandwidth). On 2 cores that is one
    thread, which also avoids an OpenMP region per chunk: on a busy machine waking a
    second thread cost more than it gained (5-9 GB/s with two, 12-14 with one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


def __getattr__(name: str) -> Any:
    # The torch-dtype tables other modules use (pool.py), built on first use so that
    # importing this module does not import torch.
    if name in ("DTYPE_NAMES", "DTYPE_LABELS"):
        import torch

        names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        globals().update(DTYPE_NAMES=names, DTYPE_LABELS={v: k for k, v in names.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class MergeInput:
    unit: str
    path: str
    weight: float
    config: dict
    lineage: Lineage


def _seed_identity(inp: MergeInput) -> str | None:
    """The seed a checkpoint descends from: its lineage's seed_hash, or its own hash
    when it is the seed."""
    if inp.lineage.seed_hash:
        return inp.lineage.seed_hash
    if inp.lineage.kind == "seed":
        return model_hash(inp.path)
    return None


def _first_difference(a: dict, b: dict) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<missing>") != b.get(k, "<missing>"):
            return f"{k}: {a.get(k, '<missing>')!r} vs {b.get(k, '<missing>')!r}"
    return ""


def check_compatible(inputs: list[MergeInput], allow_different_seed: bool = False) -> str | None:
    """Refuse inputs that must not be averaged; returns the common seed hash."""
    first = inputs[0]
    for inp in inputs[1:]:
        diff = _first_difference(first.config, inp.config)
        if diff:
            raise ConfigError(
                f"{os.path.join(inp.path, CONFIG_FILE)}: model config differs from "
                f"{os.path.join(first.path, CONFIG_FILE)} ({diff})"
            )
        if inp.lineage.tokenizer_fingerprint != first.lineage.tokenizer_fingerprint:
            raise ConfigError(
                f"{os.path.join(inp.path, LINEAGE_FILE)}: tokenizer fingerprint "
                f"{inp.lineage.tokenizer_fingerprint!r} differs from "
                f"{first.lineage.tokenizer_fingerprint!r} in {first.path}; models with "
                "different tokenizers cannot be averaged"
            )
    seeds = {inp.unit: _seed_identity(inp) for inp in inputs}
    distinct = set(seeds.values())
    if len(distinct) != 1 or None in distinct:
        if not allow_different_seed:
            shown = ", ".join(f"{u}: {(s or 'unknown')[:12]}" for u, s in seeds.items())
            raise ConfigError(
                f"the checkpoints do not all continue from the same seed ({shown}); "
                "averaging models from different seeds is usually meaningless "
                "(pass --allow-different-seed to merge anyway)"
            )
        return None
    return distinct.pop()


def check_tensors(
    maps: list[Any], same_bytes: Callable[[Any, Any, str], bool] | None = None
) -> None:
    """Same tensor names and shapes in every input; float tensors (F32/BF16/F16) may
    differ in dtype, others must be identical (compared byte for byte by ``same_bytes``).
    Errors name the input and the tensor. ``maps`` are :class:`MappedSafetensors` or
    anything with the same ``path``, ``names``, ``shape`` and ``dtype_name`` (the
    Hugging Face inputs of :mod:`.hf_inputs`, with their own ``same_bytes``)."""
    same = same_bytes or _same_bytes
    ref = maps[0]
    names = set(ref.names)
    for m in maps[1:]:
        other = set(m.names)
        if other != names:
            missing, extra = sorted(names - other), sorted(other - names)
            what = (
                f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
            )
            raise DataFormatError(f"{m.path}: {what} (compared with {ref.path})")
        for name in ref.names:
            if m.shape(name) != ref.shape(name):
                raise DataFormatError(
                    f"{m.path}: tensor {name!r} has shape {m.shape(name)}, "
                    f"{ref.path} has {ref.shape(name)}"
                )
            a, b = ref.dtype_name(name), m.dtype_name(name)
            if (a in CODES) != (b in CODES) or (
                a not in CODES and (a != b or not same(ref, m, name))
            ):
                raise DataFormatError(
                    f"{m.path}: tensor {name!r} ({b}) differs from {ref.path}'s ({a}): only "
                    f"{'/'.join(CODES)} tensors are averaged, others must be identical"
                )


def _same_bytes(a: MappedSafetensors, b: MappedSafetensors, name: str) -> bool:
    with a.view(name) as x, b.view(name) as y:
        return x == y


def _read_inputs(
    spec: MergeSpec, allow_different_seed: bool
) -> tuple[list[MergeInput], str | None]:
    """The non-zero-weight inputs with their configs and lineages, checked compatible;
    returns them and their common seed hash."""
    metas = {u: read_checkpoint_meta(p) for u, p in spec.checkpoints.items()}
    tokens = {u: lin.tokens_seen for u, (_, lin) in metas.items()}
    weights = spec.weights(tokens if spec.needs_tokens() else None)
    inputs = [
        MergeInput(u, spec.checkpoints[u], w, *metas[u]) for u, w in weights.items() if w != 0.0
    ]
    return inputs, check_compatible(inputs, allow_different_seed)


def _merged_lineage(
    spec: MergeSpec, inputs: list[MergeInput], seed: str | None, dtype: str | None
) -> Lineage:
    from megablocks_ablate.data.tokenizer import inherited_tokenizer_record

    fingerprint = inputs[0].lineage.tokenizer_fingerprint  # the same for all (checked)
    extra: dict[str, object] = {
        "merge_spec": spec.source,
        "normalize": spec.normalize,
        "dtype": dtype or "inputs",
    }
    tokenizer = inherited_tokenizer_record((i.lineage.extra for i in inputs), fingerprint)
    if tokenizer is not None:
        extra["tokenizer"] = tokenizer
    return Lineage(
        kind="merged",
        seed_hash=seed,
        units=[i.unit for i in inputs],
        weights=[i.weight for i in inputs],
        tokens_seen=sum(i.lineage.tokens_seen for i in inputs),
        tokenizer_fingerprint=fingerprint,
        parents=[os.path.abspath(i.path) for i in inputs],
        extra=extra,
        # the shortest context any input trained at (a warning when they differ)
        trained_seq_len=merged_seq_len({i.unit: i.lineage for i in inputs}, spec.source),
    )


def all_finite(t: torch.Tensor) -> bool:
    """Whether an fp32/bf16/fp16 tensor holds no NaN/inf: one reduction, no temporary of
    its size (and one device sync). Exact: a sum in fp64 of finite values of these dtypes
    cannot overflow, and any NaN/inf term makes it NaN/inf."""
    import torch

    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def count_non_finite(t: torch.Tensor, chunk: int = CHUNK) -> int:
    """How many NaN/inf values a tensor holds (for messages; temporaries of one chunk)."""
    import torch

    flat = t.reshape(-1)
    return sum(
        int(min(chunk, flat.numel() - s) - torch.isfinite(flat[s : s + chunk]).sum())
        for s in range(0, flat.numel(), chunk)
    )


def _address_of(buf: mmap.mmap) -> int:
    import ctypes

    probe = ctypes.c_char.from_buffer(buf)  # dropped at once: it would pin the buffer
    addr = ctypes.addressof(probe)
    del probe
    return addr


def _start_writeback() -> Callable[[int, int, int], None]:
    """``f(fd, offset, nbytes)`` that starts the disk write-back of that range of a file
    without waiting for it (Linux sync_file_range), or a no-op elsewhere. It makes the
    final fsync short: by then most of the file is already on its way to the disk."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    except (OSError, AttributeError):
        return lambda fd, offset, nbytes: None
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE


class _Writer:
    """Output chunks written in order by one background thread while the caller
    computes the next: a ring of ``_BUFFERS`` page-aligned buffers, each handed back
    once its bytes are in the file. Write errors surface in the caller's next call."""

    def __init__(self, writer: SafetensorsStreamWriter, f, nbytes: int):
        self._writer, self._f = writer, f
        self._buffers = [mmap.mmap(-1, max(nbytes, 1)) for _ in range(_BUFFERS)]
        self.addresses = [_address_of(b) for b in self._buffers]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(_BUFFERS):
            self._free.put(i)
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._writeback = _start_writeback()
        self._thread = threading.Thread(target=self._run, name="merge-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd, done, started = self._f.fileno(), self._f.tell(), 0
        while True:
            item = self._todo.get()
            if item is None:
                return
            index, data = item
            try:
                if self._error is None:
                    self._writer.write_bytes(data)
                    done += data.nbytes
                    if done - started >= _WRITEBACK_EVERY:
                        self._f.flush()
                        self._writeback(fd, started, done - started)
                        started = done
            except BaseException as e:  # re-raised in the caller (acquire, close)
                self._error = e
            finally:
                data.release()
                if index is not None:
                    self._free.put(index)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def acquire(self) -> int:
        """A free buffer's index (waits for the writer when all are in flight)."""
        self._raise()
        return self._free.get()

    def buffer(self, index: int) -> mmap.mmap:
        return self._buffers[index]

    def submit(self, index: int, nbytes: int) -> None:
        """Write the first ``nbytes`` of buffer ``index`` next; the buffer is reused after."""
        self._todo.put((index, memoryview(self._buffers[index])[:nbytes]))

    def submit_view(self, data: memoryview) -> None:
        """Write ``data`` (a memoryview the writer releases once written) next."""
        self._todo.put((None, data))

    def close(self, discard: bool = False) -> None:
        """Wait until everything submitted is written (``discard``: skip what is left)."""
        if discard and self._error is None:
            self._error = InterruptedError("merge abandoned")
        self._todo.put(None)
        self._thread.join()
        if not discard:
            self._raise()


class _LogBar:
    """Progress without tqdm (off a terminal, or disabled): a log line at most every
    ``every`` seconds, so that a long merge in a batch log still shows it is moving."""

    def __init__(self, total: int, every: float | None):
        self.total, self.done, self.every = total, 0, every
        self._last = time.monotonic()

    def __enter__(self) -> _LogBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        self.done += n
        if self.every is not None and time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            log.info("merge: %d of %d parameters", self.done, self.total)


def _progress(total: int, show: bool):
    # tqdm costs ~40 ms of import, a tenth of a whole small merge: it is loaded only
    # when a bar is drawn on a terminal; elsewhere progress is a log line every 30 s.
    if not show or os.environ.get("MBA_NO_PROGRESS") == "1":
        return _LogBar(total, None)
    if not sys.stderr.isatty():
        return _LogBar(total, 30.0)
    from megablocks_ablate.utils.progress import progress

    return progress(total=total, desc="merge", unit="param")


class _Chunks:
    """Merges element ranges of one tensor into an output buffer: the C++ kernel over
    raw addresses, or (another ``MBA_KERNELS`` backend, or no C++ extension) the
    :func:`.kernels.merge_into` dispatch over torch views. Returns whether the chunk
    is finite."""

    def __init__(self, maps: list[MappedSafetensors], ws: list[float], chunk: int):
        self.maps, self.ws, self.chunk = maps, ws, chunk
        self.raw = select_backend("cpu") == "cpp"
        self.threads = kernel_threads()
        self._scratch: dict[int, tuple[mmap.mmap, int]] = {}

    def _input_address(self, i: int, name: str, start: int, count: int) -> int:
        m = self.maps[i]
        addr = m.address(name, start)
        if addr % m.itemsize(name) == 0:
            return addr
        # safetensors aligns tensors, but a hand-made file may not: copy such a chunk.
        if i not in self._scratch:
            buf = mmap.mmap(-1, self.chunk * 4)
            self._scratch[i] = (buf, _address_of(buf))
        buf, scratch = self._scratch[i]
        with m.view(name, start, count) as src:
            buf[: src.nbytes] = src
        return scratch

    def merge(
        self, out: mmap.mmap, out_addr: int, out_dtype: str, name: str, start: int, count: int
    ) -> bool:
        if self.raw:
            addrs = [self._input_address(i, name, start, count) for i in range(len(self.maps))]
            dtypes = [m.dtype_name(name) for m in self.maps]
            return merge_raw(out_addr, out_dtype, addrs, dtypes, self.ws, count, self.threads)
        import torch

        from megablocks_ablate.merge.kernels import merge_into

        dtype = getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[out_dtype])
        view = torch.frombuffer(out, dtype=dtype, count=count)
        merge_into(view, [_aligned(m.flat(name, start, count)) for m in self.maps], self.ws)
        return all_finite(view)

    def release(self, name: str, start: int, count: int, last: bool) -> None:
        for m in self.maps:
            if last:  # the whole tensor: also the pages straddling chunk edges
                m.release(name)
            else:
                m.release(name, start, count)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % t.element_size() == 0 else t.clone()


def _refuse_non_finite(chunks: _Chunks, name: str, out_dtype: str) -> NoReturn:
    """Called when a merged chunk of ``name`` is not finite: name the first input whose
    tensor holds NaN/inf, else the output dtype the weighted sum overflowed."""
    import torch

    for m in chunks.maps:
        bad = count_non_finite(_aligned(m.flat(name)), chunks.chunk)
        m.release(name)
        if bad:
            raise NonFiniteError(
                f"{m.path}: tensor {name!r} has {bad} non-finite values (NaN/inf); a unit "
                "model with NaN weights means its training diverged"
            )
    n, size = chunks.maps[0].numel(name), _ITEMSIZE[out_dtype]
    buf = mmap.mmap(-1, max(1, min(chunks.chunk, n) * size))
    dtype = getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[out_dtype])
    bad = 0
    for start in range(0, n, chunks.chunk):
        count = min(chunks.chunk, n - start)
        chunks.merge(buf, _address_of(buf), out_dtype, name, start, count)
        bad += count_non_finite(torch.frombuffer(buf, dtype=dtype, count=count))
    label = _LABELS[out_dtype]
    raise NonFiniteError(
        f"merged tensor {name!r} has {bad} non-finite values (NaN/inf) in the output dtype "
        f"{label}: the weighted sum of finite inputs overflows {label} (largest finite value "
        f"{_MAX_FINITE[out_dtype]:g}); merge with --dtype fp32 or bf16, or check the weights"
    )


def _stream_merge(
    f,
    maps: list[MappedSafetensors],
    ws: list[float],
    out_dtype: dict[str, str],
    chunk: int,
    show_progress: bool,
) -> None:
    """Write the weighted average of ``maps`` into ``f``, one chunk per kernel call,
    releasing each consumed input chunk's pages right away.

    Every merged chunk is checked finite (fused into the kernel, or one reduction per
    chunk): with non-zero finite weights a NaN/inf input value always makes its output
    value non-finite, so this also catches every non-finite input; only on failure are
    the inputs scanned to say which checkpoint it came from (NonFiniteError)."""
    ref = maps[0]
    writer = SafetensorsStreamWriter(f, [(n, out_dtype[n], ref.shape(n)) for n in ref.names])
    longest = max((ref.numel(n) for n in ref.names), default=0)
    out = _Writer(writer, f, min(chunk, longest) * 4)
    chunks = _Chunks(maps, ws, chunk)
    try:
        with _progress(sum(ref.numel(n) for n in ref.names), show_progress) as bar:
            for name in writer.order:
                n, dtype = ref.numel(name), out_dtype[name]
                if dtype not in CODES:  # integer buffers: identical, copied
                    out.submit_view(ref.view(name))
                    bar.update(n)
                    continue
                for start in range(0, n, chunk):
                    count = min(chunk, n - start)
                    index = out.acquire()
                    addr = out.addresses[index]
                    if not chunks.merge(out.buffer(index), addr, dtype, name, start, count):
                        out.close(discard=True)
                        _refuse_non_finite(chunks, name, dtype)
                    out.submit(index, count * _ITEMSIZE[dtype])
                    chunks.release(name, start, count, last=start + count >= n)
                    bar.update(count)
    except BaseException:
        out.close(discard=True)
        raise
    out.close()
    writer.close()


def merge_checkpoints(
    spec: MergeSpec,
    out_dir: str,
    *,
    allow_different_seed: bool = False,
    dtype: str | None = None,
    chunk: int = CHUNK,
    show_progress: bool = True,
) -> Lineage:
    """Merge the spec's checkpoints into ``out_dir``; returns the output's lineage."""
    dtype = dtype or spec.dtype
    if dtype is not None and dtype not in DTYPE_OPTIONS:
        raise ConfigError(f"--dtype: expected one of {', '.join(DTYPE_OPTIONS)}, got {dtype!r}")
    inputs, seed = _read_inputs(spec, allow_different_seed)
    maps = [MappedSafetensors(model_file(inp.path)) for inp in inputs]
    check_tensors(maps)
    ref = maps[0]
    out_dtype = {
        n: (DTYPE_OPTIONS[dtype] if dtype and ref.dtype_name(n) in CODES else ref.dtype_name(n))
        for n in ref.names
    }
    lineage = _merged_lineage(spec, inputs, seed, dtype)
    with staged_checkpoint_dir(out_dir) as tmp:
        # unbuffered: the writer's chunks are large, a buffer would only copy them
        with open(os.path.join(tmp, MODEL_FILE), "wb", buffering=0) as f:
            _stream_merge(f, maps, [inp.weight for inp in inputs], out_dtype, chunk, show_progress)
        write_checkpoint_meta(tmp, inputs[0].config, lineage)
    return lineage
