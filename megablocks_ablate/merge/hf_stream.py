"""The streaming linear merge of Hugging Face models, tensor by tensor, chunk by chunk.

The same machinery as the checkpoint file merge (:mod:`.file_merge`: memory-mapped
inputs, one C++ kernel call per chunk over raw addresses, pages dropped after use, a
writer thread, the NaN/inf check fused into the kernel's store, no torch), with the
two arithmetic orders a merge of HF models can ask for (:class:`Arithmetic`):

* ``megablocks-ablate`` (a merge spec): ``out = Σ w_i·x_i`` with the spec's
  (normalised) weights, accumulated in fp32 and rounded once to the output dtype,
  exactly as the checkpoint merge does;
* ``mergekit-linear`` (a mergekit config): mergekit 0.1.5's ``linear`` method step by
  step: every input rounded to the config's ``dtype`` first, ``s = Σ w_i·x_i`` in fp32
  with the weights as written, divided by the fp32 sum of the weights when
  ``normalize`` is on, rounded to ``dtype`` (else the inputs' promoted dtype), then to
  ``out_dtype`` when given. The one step of its own is the accumulation: mergekit
  uses ``addcmul_``, which torch fuses into an FMA, our kernel does not (its results
  are bitwise those of the PyTorch reference); so an output is bitwise mergekit's
  wherever every product ``w_i·x_i`` and the weight sum are exact in fp32 (weights
  that are powers of two, such as 1.0 for every model), and within a few fp32 ulps
  elsewhere. A division by a power of two is done as a multiplication of the
  weights by its inverse (the same result unless a partial sum is below 2^-126·d); by
  any other divisor as an IEEE division (numpy) of the fp32 sum.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from megablocks_ablate.checkpoint import SafetensorsStreamWriter
from megablocks_ablate.errors import NonFiniteError
from megablocks_ablate.merge.file_merge import (
    _ITEMSIZE,
    _LABELS,
    _MAX_FINITE,
    CHUNK,
    _address_of,
    _aligned,
    _progress,
    _Writer,
    count_non_finite,
    kernel_threads,
)
from megablocks_ablate.merge.hf_inputs import FLOAT_DTYPES, HFModel
from megablocks_ablate.merge.kernels import merge_raw, select_backend

MERGEKIT = "mergekit-linear"
OURS = "megablocks-ablate"
_TORCH = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value (as ``torch.tensor(x, dtype=float32)``);
    beyond fp32's range, inf."""
    try:
        return float(struct.unpack("f", struct.pack("f", x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


def fp32_sum(xs: Sequence[float]) -> float:
    """The fp32 sum of ``xs`` (each rounded to fp32 first), added in order."""
    total = 0.0
    for x in xs:
        total = fp32(total + fp32(x))
    return total


def promoted(dtypes: Sequence[str]) -> str:
    """The dtype torch promotes a set of float dtypes to (bf16 with fp16: fp32)."""
    kinds = set(dtypes)
    return kinds.pop() if len(kinds) == 1 else "F32"


@dataclass
class Arithmetic:
    """How one merge computes each output element (see the module docstring).

    ``weights``: one per input, as the kernel takes them. ``divisor``: divide the fp32
    weighted sum by it (mergekit's normalize), or None. ``merge_dtype``: mergekit's
    ``dtype`` (inputs rounded to it first, the result's dtype), or None. ``out_dtype``:
    the output dtype (safetensors name) or None: the first input's (ours), the merge
    dtype or the inputs' promoted one (mergekit)."""

    semantics: str
    weights: list[float]
    divisor: float | None = None
    merge_dtype: str | None = None
    out_dtype: str | None = None

    def chain(self, dtypes: Sequence[str]) -> list[str]:
        """The dtypes the fp32 result is rounded to, in turn, for inputs of ``dtypes``
        (the last is the output's)."""
        if self.semantics == OURS:
            return [self.out_dtype or dtypes[0]]
        result = self.merge_dtype or promoted(dtypes)
        steps = [result] if self.out_dtype in (None, result) else [result, self.out_dtype]
        return steps[1:] if steps[0] == "F32" and len(steps) > 1 else steps

    def applied_weights(self) -> list[float]:
        """The weight each input's tensor finally gets (w / divisor)."""
        return [w / self.divisor if self.divisor else w for w in self.weights]


class _Chunks:
    """Merges element ranges of one tensor of every input into an output buffer."""

    def __init__(self, models: list[HFModel], arith: Arithmetic, chunk: int):
        self.models, self.arith, self.chunk = models, arith, chunk
        self.active = [i for i, w in enumerate(arith.weights) if w != 0.0]
        self.raw = select_backend("cpu") == "cpp"
        self.threads = kernel_threads()
        self._buffers: dict[tuple, tuple[mmap.mmap, int]] = {}
        self.divisor, self.weights = arith.divisor, [arith.weights[i] for i in self.active]
        if self.divisor is not None and math.frexp(self.divisor)[0] == 0.5:
            # x / 2^k == x * 2^-k exactly: fold it into the weights, no pass of its own
            self.weights = [w / self.divisor for w in self.weights]
            self.divisor = None
        self.chains = {
            name: arith.chain([m.dtype_name(name) for m in models])
            for name in models[0].names
            if models[0].dtype_name(name) in FLOAT_DTYPES
        }

    def out_dtype(self, name: str) -> str:
        chain = self.chains.get(name)
        return chain[-1] if chain else self.models[0].dtype_name(name)

    def _scratch(self, key: tuple) -> tuple[mmap.mmap, int]:
        if key not in self._buffers:
            buf = mmap.mmap(-1, self.chunk * 4)
            self._buffers[key] = (buf, _address_of(buf))
        return self._buffers[key]

    def _input(self, i: int, name: str, start: int, count: int) -> tuple[int, str]:
        """Address and dtype of input ``i``'s chunk, rounded to the merge dtype first
        when mergekit would (a copy when the mapped bytes are not element-aligned)."""
        m = self.models[i].map_of(name)
        dtype, addr = m.dtype_name(name), m.address(name, start)
        if addr % m.itemsize(name):
            buf, addr = self._scratch(("unaligned", i))
            with m.view(name, start, count) as src:
                buf[: src.nbytes] = src
        md = self.arith.merge_dtype
        if md is not None and md != "F32" and dtype != md:
            _, pre = self._scratch(("rounded", i))
            merge_raw(pre, md, [addr], [dtype], [1.0], count, self.threads)
            addr, dtype = pre, md
        return addr, dtype

    def merge(self, out: mmap.mmap, out_addr: int, name: str, start: int, count: int) -> bool:
        """Merge elements [start, start + count) of ``name`` into ``out``; returns
        whether every output value is finite."""
        if not self.raw:
            return self._merge_torch(out, name, start, count)
        ins = [self._input(i, name, start, count) for i in self.active]
        addrs, dtypes = [a for a, _ in ins], [d for _, d in ins]
        chain, t = self.chains[name], self.threads
        if self.divisor is None:
            if len(chain) == 1:
                return merge_raw(out_addr, chain[0], addrs, dtypes, self.weights, count, t)
            cur, cur_dtype, rest = self._scratch(("cast", 0))[1], chain[0], chain[1:]
            merge_raw(cur, cur_dtype, addrs, dtypes, self.weights, count, t)
        else:
            import numpy as np

            stage, cur = self._scratch(("stage",))
            merge_raw(cur, "F32", addrs, dtypes, self.weights, count, t)
            acc = np.frombuffer(stage, dtype=np.float32, count=count)
            np.divide(acc, np.float32(self.divisor), out=acc)
            del acc
            cur_dtype, rest = "F32", chain
        ok = True
        for j, dtype in enumerate(rest):
            dst = out_addr if j == len(rest) - 1 else self._scratch(("cast", j + 1))[1]
            ok = merge_raw(dst, dtype, [cur], [cur_dtype], [1.0], count, t)
            cur, cur_dtype = dst, dtype
        return ok

    def _merge_torch(self, out: mmap.mmap, name: str, start: int, count: int) -> bool:
        """The same steps as torch ops (``MBA_KERNELS=reference``, or no C++ extension)."""
        import torch

        from megablocks_ablate.merge.file_merge import all_finite
        from megablocks_ablate.merge.kernels import merge_into

        md = self.arith.merge_dtype
        xs = []
        for i in self.active:
            x = _aligned(self.models[i].map_of(name).flat(name, start, count))
            if md is not None and md != "F32":
                x = x.to(getattr(torch, _TORCH[md]))
            xs.append(x)
        acc = merge_into(torch.empty(count, dtype=torch.float32), xs, self.weights)
        if self.divisor is not None:
            acc.div_(torch.tensor(self.divisor, dtype=torch.float32))
        for dtype in self.chains[name]:
            acc = acc.to(getattr(torch, _TORCH[dtype]))
        view = torch.frombuffer(out, dtype=acc.dtype, count=count)
        view.copy_(acc)
        return all_finite(view)

    def release(self, name: str, start: int, count: int, last: bool) -> None:
        for m in self.models:
            mapped = m.map_of(name)
            if last:  # the whole tensor: also the pages straddling chunk edges
                mapped.release(name)
            else:
                mapped.release(name, start, count)

    def refuse_non_finite(self, name: str) -> NoReturn:
        """Name the first input whose tensor holds NaN/inf, else the output dtype the
        weighted sum overflowed."""
        for i in self.active:
            m = self.models[i]
            bad = count_non_finite(_aligned(m.map_of(name).flat(name)), self.chunk)
            m.map_of(name).release(name)
            if bad:
                raise NonFiniteError(
                    f"{m.path}: tensor {name!r} has {bad} non-finite values (NaN/inf); "
                    "refusing to merge a diverged or damaged model"
                )
        label = _LABELS[self.out_dtype(name)]
        raise NonFiniteError(
            f"merged tensor {name!r} has non-finite values (NaN/inf) in the output dtype "
            f"{label}: the weighted sum of finite inputs overflows {label} (largest finite "
            f"value {_MAX_FINITE[self.out_dtype(name)]:g}); merge in a wider dtype, or check "
            "the weights"
        )


def stream_hf_merge(
    f, models: list[HFModel], arith: Arithmetic, chunk: int = CHUNK, show_progress: bool = True
) -> dict[str, str]:
    """Write the merge of ``models`` as one safetensors file into ``f`` (unbuffered,
    binary); returns each tensor's output dtype. Non-float tensors (identical in every
    input, checked before) are copied from the first."""
    chunks = _Chunks(models, arith, chunk)
    ref = models[0]
    out_dtype = {n: chunks.out_dtype(n) for n in ref.names}
    writer = SafetensorsStreamWriter(f, [(n, out_dtype[n], ref.shape(n)) for n in ref.names])
    longest = max((ref.numel(n) for n in ref.names), default=0)
    out = _Writer(writer, f, min(chunk, longest) * 4)
    try:
        with _progress(sum(ref.numel(n) for n in ref.names), show_progress) as bar:
            for name in writer.order:
                n = ref.numel(name)
                if name not in chunks.chains:  # not averaged: copied
                    out.submit_view(ref.map_of(name).view(name))
                    bar.update(n)
                    continue
                for start in range(0, n, chunk):
                    count = min(chunk, n - start)
                    index = out.acquire()
                    if not chunks.merge(
                        out.buffer(index), out.addresses[index], name, start, count
                    ):
                        out.close(discard=True)
                        chunks.refuse_non_finite(name)
                    out.submit(index, count * _ITEMSIZE[out_dtype[name]])
                    chunks.release(name, start, count, last=start + count >= n)
                    bar.update(count)
    except BaseException:
        out.close(discard=True)
        raise
    out.close()
    writer.close()
    return out_dtype
