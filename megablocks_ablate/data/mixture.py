"""Mixtures of base units: weighted greedy blending of packed datasets, DP-sharded batches.

A mixture is a weight vector over base units (the paper's vocabulary). Position ``i`` of
the blended stream takes the next sample of the unit furthest below its target share
(``argmax(weights * (i + 1) - counts)``, Megatron's BlendedDataset), so every prefix of
the stream holds each unit's share to within one sample. Each unit's
:class:`~megablocks_ablate.data.packed.PackedDataset` is built with exactly the number
of samples the blend takes from it, repeating its documents for more epochs when the
weight asks for more than the unit holds (upsampling).

Weights for the paper's mixtures:
:func:`partition_balanced_weights` gives every partition ``1/G`` of the samples,
shared equally by its units (``(1/G)(1/|g|)``, the macro weights);
:func:`token_weighted` keeps the units' natural proportions.

Iteration (:meth:`MixtureDataset.batches`) walks the blended stream in global batches;
data-parallel rank ``r`` of ``W`` gets the contiguous rows ``[r * B/W, (r + 1) * B/W)``
of each global batch of ``B`` (as Megatron's pretraining sampler does). The only state
is ``consumed_samples``, so resuming from it yields exactly the batches an uninterrupted
run would have.
"""

from __future__ import annotations

import hashlib
import operator
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from megablocks_ablate.data import sample_index as si
from megablocks_ablate.data.packed import PackedDataset
from megablocks_ablate.errors import DataFormatError


def partition_balanced_weights(units: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Unit weights giving each of the G partitions an equal share, split equally inside.

    ``{"A": ["a1", "a2"], "B": ["b1"]}`` -> ``{"a1": 0.25, "a2": 0.25, "b1": 0.5}``.
    """
    groups = {g: list(us) for g, us in units.items()}
    if not groups:
        raise ValueError("partition_balanced_weights needs at least one partition")
    weights: dict[str, float] = {}
    for g, us in groups.items():
        if not us:
            raise ValueError(f"partition {g!r} has no units")
        for u in us:
            if u in weights:
                raise ValueError(f"unit {u!r} appears in more than one partition (or twice)")
            weights[u] = 1.0 / (len(groups) * len(us))
    return weights


def token_weighted(units_tokens: Mapping[str, int]) -> dict[str, float]:
    """Unit weights proportional to token counts (the units' natural proportions)."""
    if not units_tokens:
        raise ValueError("token_weighted needs at least one unit")
    for u, t in units_tokens.items():
        if t < 0:
            raise ValueError(f"unit {u!r} has a negative token count {t}")
    total = sum(int(t) for t in units_tokens.values())
    if total == 0:
        raise ValueError("token_weighted: every unit has zero tokens")
    return {u: int(t) / total for u, t in units_tokens.items()}


def _name_of(source, i: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.path.basename(os.fspath(source))
    prefix = getattr(source, "prefix", None) or getattr(
        getattr(source, "dataset", None), "prefix", None
    )
    return os.path.basename(prefix) if prefix else f"component{i}"


class MixtureDataset:
    """A weighted blend of base units, ``size`` samples of ``seq_len + 1`` tokens each.

    Args:
        components: ``{name: source}`` or a list of sources, where a source is an
            indexed-dataset prefix, an ``IndexedDataset``, or a ready ``PackedDataset``
            (which must hold at least the samples the blend takes from it).
        weights: ``{name: weight}`` (every component named), a list aligned with
            ``components``, or None for uniform. Normalised to sum to 1; zero weights
            are allowed (the unit is not opened for sampling).
        size: samples in the mixture; default one epoch of every weighted unit.
        seq_len: tokens per training sequence (taken from PackedDataset sources if None).
        seed: seeds every unit's shuffles (the same seed for all units, so a unit's
            cached index is shared by mixtures taking the same number of samples).
        cache_dir: where unit indices are cached (default beside each unit's data).
    """

    def __init__(
        self,
        components,
        weights=None,
        size: int | None = None,
        seq_len: int | None = None,
        seed: int = 1234,
        cache_dir: str | None = None,
    ):
        if isinstance(components, Mapping):
            names, sources = list(components.keys()), list(components.values())
        else:
            sources = list(components)
            names = [_name_of(s, i) for i, s in enumerate(sources)]
            if len(set(names)) != len(names):
                names = [f"{n}#{i}" for i, n in enumerate(names)]
        if not sources:
            raise ValueError("a mixture needs at least one component")
        self.names = names
        self.seed = int(seed)
        self.seq_len = self._resolve_seq_len(sources, seq_len)
        self.weights = si.normalize_weights(self._weight_vector(weights))

        if size is None:
            size = self._one_epoch_size(sources)
            if size == 0:
                raise DataFormatError(
                    f"the weighted units hold no sample of seq_len + 1 = {self.seq_len + 1} "
                    "tokens in one epoch: pass size= (units are repeated for more epochs) "
                    "or a smaller seq_len"
                )
        size = operator.index(size)
        if size <= 0:
            raise ValueError(f"mixture size must be positive, got {size}")
        self.size = size

        self.dataset_index, self.dataset_sample_index = si.build_blending_indices(
            self.weights, size
        )
        self.counts = np.bincount(self.dataset_index, minlength=len(sources)).astype(np.int64)
        self.components: list[PackedDataset | None] = [
            self._component(src, name, int(n), cache_dir) if n > 0 else None
            for src, name, n in zip(sources, names, self.counts)
        ]
        self.consumed_samples = 0

    # -- construction helpers ----------------------------------------------------------
    @staticmethod
    def _resolve_seq_len(sources, seq_len):
        packed = {s.seq_len for s in sources if isinstance(s, PackedDataset)}
        if seq_len is None:
            if len(packed) != 1:
                raise ValueError(
                    "seq_len is required unless every component is a PackedDataset of one seq_len"
                )
            seq_len = packed.pop()
        seq_len = si.check_seq_len(seq_len)
        if packed - {seq_len}:
            raise ValueError(
                f"component seq_len {sorted(packed)} differs from the mixture's {seq_len}"
            )
        return seq_len

    def _weight_vector(self, weights) -> list[float]:
        if weights is None:
            return [1.0] * len(self.names)
        if isinstance(weights, Mapping):
            missing = [n for n in self.names if n not in weights]
            extra = [n for n in weights if n not in self.names]
            if missing or extra:
                raise ValueError(
                    f"mixture weights must name every component exactly: "
                    f"missing {missing}, unknown {extra}"
                )
            return [float(weights[n]) for n in self.names]
        w = list(weights)
        if len(w) != len(self.names):
            raise ValueError(f"{len(w)} weights for {len(self.names)} components")
        return w

    def _one_epoch_size(self, sources) -> int:
        total = 0
        for src, w in zip(sources, self.weights):
            if w > 0:
                tokens = (
                    src.tokens_per_epoch
                    if isinstance(src, PackedDataset)
                    else int(np.asarray(_open_lengths(src)).sum(dtype=np.int64))
                )
                total += si.samples_per_epoch(tokens, self.seq_len)
        return total

    def _component(self, src, name: str, n: int, cache_dir) -> PackedDataset:
        if isinstance(src, PackedDataset):
            if len(src) < n:
                raise ValueError(
                    f"component {name!r} holds {len(src)} samples; the mixture "
                    f"takes {n} from it (build it with num_samples >= {n})"
                )
            return src
        return PackedDataset(src, self.seq_len, num_samples=n, seed=self.seed, cache_dir=cache_dir)

    # -- random access -----------------------------------------------------------------
    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample ``i`` of the blend: ``seq_len + 1`` int64 tokens."""
        i = operator.index(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for a mixture of {self.size}")
        return self.components[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]

    # -- iteration with exact resume ---------------------------------------------------
    def batches(
        self,
        global_batch: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        consumed_samples: int | None = None,
        micro_batch: int | None = None,
    ) -> Iterator[np.ndarray]:
        """This rank's ``[micro_batch, seq_len + 1]`` int64 arrays, global batch by batch.

        Each global batch of ``global_batch`` consecutive samples starts at
        ``consumed_samples`` (default: ``self.consumed_samples``, e.g. after
        :meth:`load_state_dict`); rank ``dp_rank`` takes the contiguous rows
        ``[dp_rank * B/W, (dp_rank + 1) * B/W)`` of it, in micro batches of
        ``micro_batch`` rows (default all ``B/W`` at once). A final partial global batch
        is dropped; a mixture smaller than one global batch is refused
        (:meth:`check_batch_fits`) rather than yielding nothing. ``self.consumed_samples``
        moves past a global batch just before its last micro batch is yielded, so a
        checkpoint taken after processing it resumes at the next one.
        """
        for name, v in (("global_batch", global_batch), ("dp_world", dp_world)):
            if operator.index(v) <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_world {dp_world}")
        if global_batch % dp_world:
            raise ValueError(f"global_batch {global_batch} is not divisible by dp_world {dp_world}")
        per_rank = global_batch // dp_world
        micro = per_rank if micro_batch is None else operator.index(micro_batch)
        if micro <= 0 or per_rank % micro:
            raise ValueError(
                f"micro_batch {micro_batch} must be positive and divide the "
                f"per-rank batch {per_rank}"
            )
        self.check_batch_fits(global_batch)
        start = self.consumed_samples if consumed_samples is None else consumed_samples
        if not 0 <= start <= self.size:
            raise ValueError(
                f"consumed_samples {start} out of range for a mixture of {self.size} samples"
            )
        for step_start in range(start, self.size - global_batch + 1, global_batch):
            first = step_start + dp_rank * per_rank
            for m in range(0, per_rank, micro):
                if m + micro == per_rank:
                    self.consumed_samples = step_start + global_batch
                yield np.stack([self[k] for k in range(first + m, first + m + micro)])

    def check_batch_fits(self, global_batch: int) -> None:
        """DataFormatError, naming the sizes, when the mixture holds fewer samples than
        one global batch: :meth:`batches` drops a final partial batch, so it would
        otherwise yield nothing at all."""
        if self.size < global_batch:
            raise DataFormatError(
                f"the mixture holds {self.size} samples of seq_len + 1 = {self.seq_len + 1} "
                f"tokens, fewer than one global batch of {global_batch}: it would yield no "
                f"batch; pass size={global_batch} or more (units are repeated for more "
                "epochs), or a smaller global_batch or seq_len"
            )

    @property
    def fingerprint(self) -> str:
        """Hash of what defines the blended stream (units, weights, size, seq_len, seed)."""
        h = hashlib.sha256()
        h.update(
            f"mba-mixture-v{si.BUILDER_VERSION}|{self.size}|{self.seq_len}|{self.seed}|".encode()
        )
        h.update("\x00".join(self.names).encode())
        h.update(self.weights.tobytes())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"consumed_samples": int(self.consumed_samples), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume at ``state["consumed_samples"]``; refuses a state from another mixture."""
        if state.get("fingerprint") not in (None, self.fingerprint):
            raise DataFormatError(
                f"data state was saved for mixture {state.get('fingerprint')}, but this "
                f"mixture is {self.fingerprint} (units, weights, size, seq_len or seed differ)"
            )
        consumed = operator.index(state["consumed_samples"])
        if not 0 <= consumed <= self.size:
            raise DataFormatError(
                f"data state consumed_samples {consumed} out of range for a "
                f"mixture of {self.size} samples"
            )
        self.consumed_samples = consumed

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={w:.4g}" for n, w in zip(self.names, self.weights))
        return f"MixtureDataset({parts}; size={self.size}, seq_len={self.seq_len})"


def _open_lengths(src):
    """Sequence lengths of a prefix or IndexedDataset source."""
    if isinstance(src, (str, os.PathLike)):
        from megablocks_ablate.data.indexed import IndexedDataset, strip_suffix

        with IndexedDataset(strip_suffix(os.fspath(src))) as ds:
            return np.array(ds.sequence_lengths)
    return src.sequence_lengths
