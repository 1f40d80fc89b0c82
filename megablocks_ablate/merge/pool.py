"""ModelPool: N unit models in one ``[N, P]`` buffer, merged into a live model in one call.

A merge-eval batch scores hundreds of mixtures of the same unit models. Loading the
unit models once into one ``[N, P]`` buffer (memory-mapped on CPU, resident on the
GPU when it fits) and rebinding a live model's parameters as views into one flat
``[P]`` buffer makes every mixture a single merge-kernel call that allocates nothing::

    pool = ModelPool.from_checkpoints({"cs_0": "pool/cs_0", "bio_0": "pool/bio_0"})
    model = build_model(pool.config)         # any nn.Module with matching state_dict keys
    pool.bind(model)
    for mixture in mixtures:
        pool.merge_into(model, spec_weights)  # {unit: weight}
        evaluate(model)

Row layout: the floating-point tensors of the checkpoints, in the first checkpoint's
file order; a tensor that the model does not have as a parameter or buffer (e.g. a
tied ``lm_head.weight``) is still merged but not bound.

Row format: each row is a unit model in the pool's dtype, or, given the seed the units
continue (``seed=``), the unit's difference from it, with the seed kept once in fp32
(``bf16-delta``: the same bytes per row, far less rounding; :mod:`.pool_delta`).

:class:`RowPool` is what every placement of the rows shares (binding, weight vectors,
NaN/inf checks); :class:`ModelPool` keeps them resident in one buffer, and
:mod:`.pool_placement` chooses between it, host rows shared per node
(:mod:`.pool_host`) and rows sharded over ranks (:mod:`.pool_sharded`).
:func:`open_units` is the checked, memory-mapped starting point all of them load from.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch

from megablocks_ablate.checkpoint import (
    Lineage,
    MappedSafetensors,
    model_file,
    read_checkpoint_meta,
)
from megablocks_ablate.errors import ConfigError, NonFiniteError
from megablocks_ablate.merge.file_merge import (
    DTYPE_LABELS,
    MergeInput,
    all_finite,
    check_compatible,
    check_tensors,
    count_non_finite,
)
from megablocks_ablate.merge.kernels import DTYPE_CODES, merge_into
from megablocks_ablate.merge.pool_delta import Seed, format_name, verify_seed
from megablocks_ablate.utils.progress import progress

# elements per step when a delta row is computed (bounds the fp32 temporary: 64 MiB)
DELTA_CHUNK = 1 << 24


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives in a pool row / the live flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


class RowPool:
    """What every pool placement shares: units, slots, binding a live model to one flat
    buffer, weight vectors, and the NaN/inf checks of a merge.

    A placement (see :mod:`.pool_placement`) says where the rows live and how a weighted
    sum of them reaches the live model's flat buffer: :meth:`_merge_rows`, and
    :meth:`_row` for the rows this process can read (diagnostics only).

    ``seed``: the rows are differences from this seed (:mod:`.pool_delta`); a placement
    then folds the fp32 seed in first, with weight ``sum(ws)`` (:meth:`_seed_weight`).
    """

    def __init__(
        self,
        units: Sequence[str],
        slots: Sequence[Slot],
        config: dict,
        lineages: Sequence[Lineage],
        seed: Seed | None = None,
    ):
        self.units = list(units)
        self.slots = {s.name: s for s in slots}
        self.config = config
        self.lineages = list(lineages)
        self.seed = seed
        self._num_params = max((s.offset + s.numel for s in slots), default=0)
        self._live: dict[int, torch.Tensor] = {}  # id(model) -> its flat buffer

    @property
    def num_params(self) -> int:
        return self._num_params

    @property
    def row_dtype(self) -> torch.dtype:
        """The dtype the rows are stored in."""
        raise NotImplementedError

    @property
    def row_format(self) -> str:
        """``fp32``, ``bf16-plain`` or ``bf16-delta`` (what a score's provenance records)."""
        dtype = DTYPE_LABELS.get(self.row_dtype, str(self.row_dtype))
        return format_name(dtype, self.seed is not None)

    @staticmethod
    def _seed_weight(ws: list[float]) -> float:
        """The seed's weight in a delta-row merge: ``sum(ws)``, so that
        ``seed * sum(ws) + sum_i ws[i] * (unit_i - seed) = sum_i ws[i] * unit_i``."""
        return math.fsum(ws)

    def _merge_rows(self, flat: torch.Tensor, ws: list[float]) -> None:
        raise NotImplementedError

    def _row(self, i: int) -> torch.Tensor | None:
        """Row ``i`` where this process can read it, else None."""
        return None

    def close(self) -> None:
        """Release what the placement holds beyond Python references (a no-op here)."""

    def bind(self, model: torch.nn.Module) -> torch.Tensor:
        """Make ``model``'s parameters (and float buffers) views into one flat buffer
        laid out like a pool row; returns that buffer. The model's current values are
        kept. Every parameter must have a slot of the same shape."""
        named: dict[str, torch.Tensor] = dict(model.named_parameters())
        named.update({k: v for k, v in model.named_buffers() if k in self.slots})
        dtypes = {t.dtype for t in named.values()}
        if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_CODES:
            raise ConfigError(
                f"the model's parameters must share one fp32/bf16/fp16 dtype, "
                f"got {sorted(map(str, dtypes))}"
            )
        device = next(iter(named.values())).device
        flat = torch.zeros(self.num_params, dtype=next(iter(dtypes)), device=device)
        for name, t in named.items():
            slot = self.slots.get(name)
            if slot is None:
                raise ConfigError(f"model parameter {name!r} is not in the pool's checkpoints")
            if tuple(t.shape) != slot.shape:
                raise ConfigError(
                    f"model parameter {name!r} has shape {list(t.shape)}, "
                    f"the pool has {list(slot.shape)}"
                )
            view = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
            with torch.no_grad():
                view.copy_(t)
            t.data = view  # rebinding keeps the Parameter object (and hooks) intact
        self._live[id(model)] = flat
        return flat

    def weight_vector(
        self, weights: Mapping[str, float] | Sequence[float] | torch.Tensor
    ) -> list[float]:
        """Weights over the pool's units, from ``{unit: w}`` (absent units 0) or a sequence."""
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(self.units))
            if unknown:
                raise ConfigError(f"weights name units not in the pool: {unknown}")
            ws = [float(weights.get(u, 0.0)) for u in self.units]
        else:
            ws = [
                float(w)
                for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)
            ]
            if len(ws) != len(self.units):
                raise ConfigError(f"expected {len(self.units)} weights, got {len(ws)}")
        bad = [u for u, w in zip(self.units, ws) if not math.isfinite(w)]
        if bad:
            raise ConfigError(f"weights of {bad} are not finite")
        if not any(ws):
            raise ConfigError("all merge weights are zero")
        return ws

    def merge_into(
        self, model: torch.nn.Module, weights: Mapping[str, float] | Sequence[float] | torch.Tensor
    ) -> None:
        """Set ``model``'s parameters to ``sum_i w_i * unit_i``: no allocation of model
        size (binds the model first if needed). Merged weights with NaN/inf raise
        NonFiniteError naming the tensor (the model then holds them)."""
        flat = self._live.get(id(model))
        if flat is None:
            flat = self.bind(model)
        ws = self.weight_vector(weights)
        self._merge_rows(flat, ws)
        if not all_finite(flat):  # one reduction per merge; names the tensor only on failure
            self._refuse_merged(flat, ws)

    def _refuse_merged(self, flat: torch.Tensor, ws: list[float]) -> NoReturn:
        """The merged flat buffer holds NaN/inf: name its first such tensor, and the unit
        row it came from, else the dtype the weighted sum overflowed."""
        slot = next(s for s in self.slots.values() if not all_finite(_view(flat, s)))
        bad = count_non_finite(_view(flat, slot))
        mixture = {u: w for u, w in zip(self.units, ws) if w}
        for i, w in enumerate(ws):
            row = self._row(i) if w else None
            if row is not None and not all_finite(_view(row, slot)):
                raise NonFiniteError(
                    f"model pool: unit {self.units[i]!r}'s row of tensor {slot.name!r} holds "
                    f"NaN/inf, so merging {mixture} gives {bad} non-finite values"
                )
        dtype = DTYPE_LABELS.get(flat.dtype, str(flat.dtype))
        raise NonFiniteError(
            f"merged model {mixture}: tensor {slot.name!r} has {bad} non-finite values "
            f"(NaN/inf) in {dtype}: the weighted sum of finite unit models overflows {dtype} "
            f"(largest finite value {torch.finfo(flat.dtype).max:g}); check the weights or "
            "merge into an fp32 model"
        )


@dataclass
class OpenedUnits:
    """Unit checkpoints checked against each other and memory-mapped, not yet read:
    what every placement starts from (:func:`open_units`)."""

    units: list[str]
    configs: list[dict]
    lineages: list[Lineage]
    maps: list[MappedSafetensors]
    slots: list[Slot]
    seed: Seed | None = None  # checked against the units: rows may be deltas from it
    seed_map: MappedSafetensors | None = None

    @property
    def num_params(self) -> int:
        return sum(s.numel for s in self.slots)

    def fill_row(
        self, i: int, row: torch.Tensor, bar=None, base: torch.Tensor | None = None
    ) -> None:
        """Copy unit ``i``'s float tensors into ``row`` (converting to its dtype), tensor
        by tensor, releasing the checkpoint's pages as it goes; with ``base`` (the fp32
        seed from :meth:`fill_seed`) the row is ``unit - base``, computed in fp32 and
        rounded once. A row with NaN/inf raises NonFiniteError naming the checkpoint and
        the tensor."""
        m = self.maps[i]
        for s in self.slots:
            if base is None:
                row[s.offset : s.offset + s.numel].copy_(m.flat(s.name))
            else:
                for lo in range(0, s.numel, DELTA_CHUNK):
                    n = min(DELTA_CHUNK, s.numel - lo)
                    at = s.offset + lo
                    unit = m.flat(s.name, lo, n).to(base.device, torch.float32)
                    row[at : at + n].copy_(unit - base[at : at + n])  # not in place: a map
            m.release(s.name)
            if bar is not None:
                bar.update(s.numel)
        if not all_finite(row):
            _refuse_row(m, row, self.slots)

    def fill_seed(self, base: torch.Tensor) -> None:
        """Copy the seed's float tensors into the fp32 vector ``base`` (row layout); a
        seed with NaN/inf is refused naming it."""
        m = self.seed_map
        if m is None:
            raise RuntimeError("fill_seed: the units were opened without a seed")
        if base.dtype != torch.float32:
            raise ValueError(f"the seed is held in fp32, got a {base.dtype} buffer")
        for s in self.slots:
            base[s.offset : s.offset + s.numel].copy_(m.flat(s.name))
            m.release(s.name)
        if not all_finite(base):
            _refuse_row(m, base, self.slots)

    def close(self) -> None:
        """Unmap the checkpoints (once their rows are loaded; a live view keeps its map)."""
        for m in [*self.maps, *([self.seed_map] if self.seed_map is not None else [])]:
            with contextlib.suppress(BufferError):
                m.close()


def open_units(
    checkpoints: Mapping[str, str], allow_different_seed: bool = False, seed: Seed | None = None
) -> OpenedUnits:
    """Check ``{unit: checkpoint_dir}`` for a merge (same config, tokenizer, seed, tensor
    names and shapes) and memory-map them; the row layout is the first checkpoint's
    float tensors in file order. ``seed``: the checkpoint they continue, for delta rows;
    it must be the seed every checkpoint records (ConfigError naming it otherwise) and
    have their tensors."""
    if not checkpoints:
        raise ConfigError("a model pool needs at least one checkpoint")
    units = list(checkpoints)
    metas = [read_checkpoint_meta(checkpoints[u]) for u in units]
    inputs = [MergeInput(u, checkpoints[u], 1.0, cfg, lin) for u, (cfg, lin) in zip(units, metas)]
    common = check_compatible(inputs, allow_different_seed)
    if seed is not None:
        if common != seed.sha256:
            raise ConfigError(
                f"{seed.path}: not the seed the pool's checkpoints continue "
                f"(sha256 {seed.sha256[:16]}..., they record "
                f"{(common or 'no common seed')[:16]}...); delta rows need their own seed"
            )
        verify_seed(seed.model_dir, seed.sha256)  # the bytes are that seed (cached hash)
    maps = [MappedSafetensors(model_file(checkpoints[u])) for u in units]
    seed_map = MappedSafetensors(seed.path) if seed is not None else None
    check_tensors([*maps, *([seed_map] if seed_map is not None else [])])
    ref = maps[0]
    slots, offset = [], 0
    for name in ref.names:
        if ref.dtype(name) in DTYPE_CODES:
            n = ref.numel(name)
            slots.append(Slot(name, tuple(ref.shape(name)), offset, n))
            offset += n
    return OpenedUnits(
        units, [c for c, _ in metas], [lin for _, lin in metas], maps, slots, seed, seed_map
    )


class ModelPool(RowPool):
    """Unit models as rows of one ``[N, P]`` buffer; see the module docstring. With
    ``seed``, ``rows`` are differences from it and ``base`` is the fp32 seed ``[P]`` on
    the rows' device."""

    def __init__(
        self,
        units: Sequence[str],
        rows: torch.Tensor,
        slots: Sequence[Slot],
        config: dict,
        lineages: Sequence[Lineage],
        seed: Seed | None = None,
        base: torch.Tensor | None = None,
    ):
        if rows.dim() != 2 or rows.shape[0] != len(units):
            raise ValueError(f"rows must be [N={len(units)}, P], got {list(rows.shape)}")
        if (seed is None) != (base is None):
            raise ValueError("delta rows need both the seed and its fp32 vector (base)")
        super().__init__(units, slots, config, lineages, seed)
        self.rows = rows
        self.base = base
        self._num_params = rows.shape[1]

    @property
    def row_dtype(self) -> torch.dtype:
        return self.rows.dtype

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Mapping[str, str],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        storage_dir: str | None = None,
        allow_different_seed: bool = False,
        show_progress: bool = True,
        seed: Seed | None = None,
    ) -> ModelPool:
        """Load unit models (``{unit: checkpoint_dir}``) into one ``[N, P]`` buffer.

        Streaming: each checkpoint is memory-mapped and copied tensor by tensor into its
        row, its pages released as it goes. On CPU the buffer is a file-backed shared
        mapping in ``storage_dir`` (default: the temp dir), unlinked at once so it goes
        away with the pool; on CUDA it is device memory. A row with NaN/inf (in the
        checkpoint, or from conversion to ``dtype``) raises NonFiniteError naming the
        checkpoint and the tensor. ``seed`` (verified, see :mod:`.pool_delta`): rows
        are ``unit - seed`` in ``dtype``, the seed kept beside them in fp32.
        """
        if dtype not in DTYPE_CODES:
            raise ConfigError(f"pool dtype must be fp32, bf16 or fp16, got {dtype}")
        opened = open_units(checkpoints, allow_different_seed, seed)
        n, p = len(opened.units), opened.num_params
        dev = torch.device(device)
        base = None
        if seed is not None:
            base = allocate_rows(1, p, torch.float32, dev, storage_dir)[0]
            opened.fill_seed(base)
        rows = allocate_rows(n, p, dtype, dev, storage_dir)
        with progress(
            total=n * p,
            desc="load pool",
            unit="param",
            disable=None if show_progress else True,
        ) as bar:
            for i in range(n):
                opened.fill_row(i, rows[i], bar, base)
        opened.close()
        return cls(opened.units, rows, opened.slots, opened.configs[0], opened.lineages, seed, base)

    @classmethod
    def from_directory(cls, directory: str, **kwargs) -> ModelPool:
        """Every checkpoint directly under ``directory`` (unit name = subdirectory name)."""
        return cls.from_checkpoints(checkpoint_directory(directory), **kwargs)

    # ------------------------------------------------------------------ merging

    def _merge_rows(self, flat: torch.Tensor, ws: list[float]) -> None:
        # one kernel call over every row; rows with weight 0 are not read
        rows = [self.rows[i] for i in range(len(self.units))]
        if self.base is None:
            merge_into(flat, rows, ws)
        else:  # delta rows: the seed first, weighted by sum(ws)
            merge_into(flat, [self.base, *rows], [self._seed_weight(ws), *ws])

    def _row(self, i: int) -> torch.Tensor | None:
        return self.rows[i]


def checkpoint_directory(directory: str) -> dict[str, str]:
    """``{unit: dir}`` for every checkpoint directly under ``directory`` (sorted)."""
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory}: pool directory does not exist")
    found = {
        d: os.path.join(directory, d)
        for d in sorted(os.listdir(directory))
        if os.path.isfile(os.path.join(directory, d, "model.safetensors"))
    }
    if not found:
        raise ConfigError(f"{directory}: no checkpoints (subdirectories with model.safetensors)")
    return found


def _view(flat: torch.Tensor, slot: Slot) -> torch.Tensor:
    return flat[slot.offset : slot.offset + slot.numel]


def _refuse_row(m: MappedSafetensors, row: torch.Tensor, slots: Sequence[Slot]) -> NoReturn:
    """A loaded pool row holds NaN/inf: name the checkpoint and the tensor, and say
    whether the checkpoint itself or the conversion to the pool's dtype is at fault."""
    slot = next(s for s in slots if not all_finite(_view(row, s)))
    bad = count_non_finite(m.flat(slot.name))
    m.release(slot.name)
    if bad:
        raise NonFiniteError(
            f"{m.path}: tensor {slot.name!r} has {bad} non-finite values (NaN/inf); a unit "
            "model with NaN weights means its training diverged"
        )
    dtype = DTYPE_LABELS.get(row.dtype, str(row.dtype))
    raise NonFiniteError(
        f"{m.path}: tensor {slot.name!r} has {count_non_finite(_view(row, slot))} values "
        f"that overflow the pool dtype {dtype} (largest finite value "
        f"{torch.finfo(row.dtype).max:g}); load the pool in fp32 or bf16"
    )


def allocate_rows(
    n: int, p: int, dtype: torch.dtype, device: torch.device, storage_dir: str | None = None
) -> torch.Tensor:
    """An uninitialised ``[n, p]`` row buffer: device memory on CUDA; on CPU a file-backed
    shared mapping in ``storage_dir`` (default: the temp dir), unlinked at once."""
    if device.type != "cpu":
        return torch.empty((n, p), dtype=dtype, device=device)
    fd, path = tempfile.mkstemp(prefix="mba-pool-", suffix=".bin", dir=storage_dir)
    try:
        os.ftruncate(fd, n * p * dtype.itemsize)
        rows = torch.from_file(path, shared=True, size=n * p, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(path)  # the mapping keeps the space until the pool is dropped
    return rows.view(n, p)
