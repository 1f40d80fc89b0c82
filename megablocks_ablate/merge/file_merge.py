"""Streaming checkpoint-to-checkpoint merge (``megablocks-ablate merge``).

Memory stays near one chunk per input, never N models: the inputs are memory-mapped
safetensors files, the output is written tensor by tensor, chunk by chunk, each chunk
computed by one merge-kernel call straight from the mapped inputs (each input read
once), and the pages of consumed input chunks are dropped from the resident set
right away. The output checkpoint (weights, config, lineage) appears atomically.

Everything that can be checked without reading weights is checked first: the
tensors' names and shapes, the model configs, the seed lineage (refused unless
``allow_different_seed``) and the tokenizer fingerprint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import torch

from megablocks_ablate.checkpoint import (
    CONFIG_FILE,
    LINEAGE_FILE,
    MODEL_FILE,
    Lineage,
    MappedSafetensors,
    SafetensorsStreamWriter,
    model_file,
    model_hash,
    read_checkpoint_meta,
    staged_checkpoint_dir,
    write_checkpoint_meta,
)
from megablocks_ablate.errors import ConfigError, DataFormatError, NonFiniteError
from megablocks_ablate.merge.kernels import DTYPE_CODES, merge_into
from megablocks_ablate.merge.spec import MergeSpec
from megablocks_ablate.utils.progress import progress

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_LABELS = {v: k for k, v in DTYPE_NAMES.items()}

# Elements per kernel call: 1M (4 MiB of fp32 output); resident input pages are
# released after every chunk, so the merge adds about (N + 1) chunks to the process.
CHUNK = 1 << 20


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


def check_tensors(maps: list[MappedSafetensors]) -> None:
    """Same tensor names and shapes in every file; float tensors may differ in dtype,
    others must be identical. Errors name the file and the tensor."""
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
            floating = m.dtype(name) in DTYPE_CODES
            if floating != (ref.dtype(name) in DTYPE_CODES) or (
                not floating and m.dtype(name) != ref.dtype(name)
            ):
                raise DataFormatError(
                    f"{m.path}: tensor {name!r} has dtype {m.dtype(name)}, "
                    f"{ref.path} has {ref.dtype(name)}"
                )
        for name in ref.names:
            if m.dtype(name) not in DTYPE_CODES and not torch.equal(
                m.tensor(name), ref.tensor(name)
            ):
                raise DataFormatError(
                    f"{m.path}: non-float tensor {name!r} differs from {ref.path} "
                    "(only fp32/bf16/fp16 tensors are averaged; others must be identical)"
                )


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # safetensors aligns tensors, but a hand-made file may not: copy such a chunk.
    return t if t.data_ptr() % t.element_size() == 0 else t.clone()


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
    )


def _merged_chunks(
    maps: list[MappedSafetensors], ws: list[float], name: str, buf: torch.Tensor, chunk: int
) -> Iterator[torch.Tensor]:
    """The weighted average of tensor ``name``, one chunk (a view of ``buf``) per kernel
    call, releasing each consumed input chunk's pages right away."""
    n = maps[0].numel(name)
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        out = buf[:count]
        merge_into(out, [_aligned(m.flat(name, start, count)) for m in maps], ws)
        for m in maps:
            m.release(name, start, count)
        yield out


def all_finite(t: torch.Tensor) -> bool:
    """Whether an fp32/bf16/fp16 tensor holds no NaN/inf: one reduction, no temporary of
    its size (and one device sync). Exact: a sum in fp64 of finite values of these dtypes
    cannot overflow, and any NaN/inf term makes it NaN/inf."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def count_non_finite(t: torch.Tensor, chunk: int = CHUNK) -> int:
    """How many NaN/inf values a tensor holds (for messages; temporaries of one chunk)."""
    flat = t.reshape(-1)
    return sum(
        int(min(chunk, flat.numel() - s) - torch.isfinite(flat[s : s + chunk]).sum())
        for s in range(0, flat.numel(), chunk)
    )


def _refuse_non_finite(
    maps: list[MappedSafetensors], ws: list[float], name: str, buf: torch.Tensor, chunk: int
) -> NoReturn:
    """Called when a merged chunk of ``name`` is not finite: name the first input whose
    tensor holds NaN/inf, else the output dtype the weighted sum overflowed."""
    for m in maps:
        bad = count_non_finite(_aligned(m.flat(name)), chunk)
        m.release(name)
        if bad:
            raise NonFiniteError(
                f"{m.path}: tensor {name!r} has {bad} non-finite values (NaN/inf); a unit "
                "model with NaN weights means its training diverged"
            )
    bad = sum(count_non_finite(out) for out in _merged_chunks(maps, ws, name, buf, chunk))
    dtype = DTYPE_LABELS.get(buf.dtype, str(buf.dtype))
    raise NonFiniteError(
        f"merged tensor {name!r} has {bad} non-finite values (NaN/inf) in the output dtype "
        f"{dtype}: the weighted sum of finite inputs overflows {dtype} (largest finite value "
        f"{torch.finfo(buf.dtype).max:g}); merge with --dtype fp32 or bf16, or check the weights"
    )


def _stream_merge(
    f,
    maps: list[MappedSafetensors],
    ws: list[float],
    out_dtype: dict[str, torch.dtype],
    chunk: int,
    show_progress: bool,
) -> None:
    """Write the weighted average of ``maps`` into ``f``, one chunk per kernel call,
    releasing each consumed input chunk's pages right away.

    Every merged chunk is checked finite (:func:`all_finite`, one reduction per chunk):
    with non-zero finite weights a NaN/inf input value always makes its output value
    non-finite, so this also catches every non-finite input; only on failure are the
    inputs scanned to say which checkpoint it came from (NonFiniteError)."""
    ref = maps[0]
    writer = SafetensorsStreamWriter(f, [(n, out_dtype[n], ref.shape(n)) for n in ref.names])
    buffers: dict[torch.dtype, torch.Tensor] = {}
    total = sum(ref.numel(n) for n in ref.names)
    with progress(
        total=total, desc="merge", unit="param", disable=None if show_progress else True
    ) as bar:
        for name in writer.order:
            n = ref.numel(name)
            if out_dtype[name] not in DTYPE_CODES:  # integer buffers: identical, copied
                writer.write(ref.tensor(name))
                bar.update(n)
                continue
            buf = buffers.get(out_dtype[name])
            if buf is None or buf.numel() < min(chunk, n):
                buf = buffers[out_dtype[name]] = torch.empty(
                    min(chunk, max(n, 1)), dtype=out_dtype[name]
                )
            for out in _merged_chunks(maps, ws, name, buf, chunk):
                if not all_finite(out):
                    _refuse_non_finite(maps, ws, name, buf, chunk)
                writer.write(out)
                bar.update(out.numel())
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
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConfigError(f"--dtype: expected one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    inputs, seed = _read_inputs(spec, allow_different_seed)
    maps = [MappedSafetensors(model_file(inp.path)) for inp in inputs]
    check_tensors(maps)
    ref = maps[0]
    out_dtype = {
        n: (DTYPE_NAMES[dtype] if dtype and ref.dtype(n) in DTYPE_CODES else ref.dtype(n))
        for n in ref.names
    }
    lineage = _merged_lineage(spec, inputs, seed, dtype)
    with staged_checkpoint_dir(out_dir) as tmp:
        with open(os.path.join(tmp, MODEL_FILE), "wb") as f:
            _stream_merge(f, maps, [inp.weight for inp in inputs], out_dtype, chunk, show_progress)
        write_checkpoint_meta(tmp, inputs[0].config, lineage)
    return lineage
