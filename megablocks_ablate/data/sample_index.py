"""Index arrays behind packed training samples and mixtures (Megatron GPTDataset semantics).

A base unit is a sequence of documents (each already ending in EOD). Packing turns it
into fixed samples of ``seq_len + 1`` tokens that cross document boundaries, with
three arrays, all of them functions of the document lengths, ``seq_len``,
``num_samples`` and ``seed`` only:

``document_index`` (int32, ``[num_epochs * num_docs]``)
    The document ids repeated for as many epochs as ``num_samples`` needs. Each epoch
    is its own permutation drawn from ``np.random.RandomState(seed)`` (epoch 0 first).
``sample_index`` (int64, ``[num_samples + 1, 2]``)
    Row ``i`` is ``(position in document_index, token offset in that document)`` of
    global token ``i * seq_len`` of the concatenated stream. Sample ``i`` is the tokens
    from row ``i`` to row ``i + 1`` *inclusive*, so consecutive samples share one
    boundary token (the last label of sample ``i`` is the first input of ``i + 1``).
    A position always points into the document that contains the token, so
    zero-length documents are skipped.
``shuffle_index`` (int64, ``[num_samples]``)
    A permutation of the samples, drawn from the same RNG after the document index.

Difference from Megatron-LM, on purpose: Megatron shuffles all full epochs together
and, when the final epoch is needed only in part (< 80 %), shuffles that one separately
("separate_final_epoch"), then over-produces samples for the whole final epoch. Here
every epoch is shuffled separately and exactly ``num_samples`` samples are kept, so every
full epoch is seen exactly once and a partly used final epoch contributes a random
subset of its documents: the guarantee separate_final_epoch exists for, without the
80 % threshold. Seeds therefore do not reproduce Megatron's exact sample order.

The sample index and the mixture's blending indices are built in C++
(``csrc/dataset_index.cpp``) when the extension is built, else by the vectorised NumPy
twins below; both give identical arrays. ``MBA_SAMPLE_INDEX=numpy|cpp`` forces one.
The three packed arrays are cached as ``.npy`` files (see :func:`load_or_build`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np

from megablocks_ablate.errors import DataFormatError

logger = logging.getLogger(__name__)

# Bump whenever the arrays built for the same inputs change: it is part of the cache key.
BUILDER_VERSION = 1

_BACKEND_ENV = "MBA_SAMPLE_INDEX"


# --------------------------------------------------------------------------------------
# Backend dispatch
# --------------------------------------------------------------------------------------


def backend() -> str:
    """``"cpp"`` or ``"numpy"``: the builder used now (``MBA_SAMPLE_INDEX`` forces one)."""
    from megablocks_ablate import _ext

    forced = os.environ.get(_BACKEND_ENV, "").strip().lower()
    has_cpp = _ext.cpp is not None and hasattr(_ext.cpp, "build_sample_index")
    if forced == "numpy":
        return "numpy"
    if forced == "cpp":
        if not has_cpp:
            raise RuntimeError(
                f"{_BACKEND_ENV}=cpp but megablocks_ablate._C is not built "
                "(or lacks build_sample_index); run `make install`"
            )
        return "cpp"
    if forced:
        raise ValueError(f"{_BACKEND_ENV} must be 'numpy' or 'cpp', got {forced!r}")
    return "cpp" if has_cpp else "numpy"


def _cpp():
    from megablocks_ablate import _ext

    return _ext.cpp


# --------------------------------------------------------------------------------------
# Sizes: samples, epochs
# --------------------------------------------------------------------------------------


def check_seq_len(seq_len: int) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    return int(seq_len)


def samples_per_epoch(tokens_per_epoch: int, seq_len: int) -> int:
    """Samples one pass over ``tokens_per_epoch`` tokens gives: ``(tokens - 1) // seq_len``."""
    seq_len = check_seq_len(seq_len)
    return max(int(tokens_per_epoch) - 1, 0) // seq_len


def num_epochs_for(num_samples: int, tokens_per_epoch: int, seq_len: int) -> int:
    """Fewest epochs whose tokens hold ``num_samples`` samples (``num_samples * seq_len + 1``)."""
    seq_len = check_seq_len(seq_len)
    if tokens_per_epoch <= 0:
        raise ValueError("tokens_per_epoch must be positive")
    needed = int(num_samples) * seq_len + 1
    return max(1, -(-needed // int(tokens_per_epoch)))


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------


def build_document_index(num_docs: int, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """Document ids for ``num_epochs`` epochs, each epoch permuted separately (int32)."""
    if num_docs <= 0:
        raise ValueError("cannot build a document index over an empty dataset")
    if num_docs > np.iinfo(np.int32).max:
        raise ValueError(f"{num_docs} documents exceed the int32 document index")
    out = np.empty(num_docs * num_epochs, dtype=np.int32)
    for e in range(num_epochs):
        out[e * num_docs : (e + 1) * num_docs] = rng.permutation(num_docs)
    return out


def build_sample_index_numpy(
    sizes: np.ndarray,
    document_index: np.ndarray,
    seq_len: int,
    num_epochs: int,
    tokens_per_epoch: int,
    num_samples: int = -1,
) -> np.ndarray:
    """NumPy twin of the C++ ``build_sample_index`` (same arguments, same result).

    ``num_samples=-1`` means every full sample of ``num_epochs * tokens_per_epoch``
    tokens (``(num_epochs * tokens_per_epoch - 1) // seq_len``), as Megatron does.
    """
    seq_len = check_seq_len(seq_len)
    if num_samples < 0:
        num_samples = samples_per_epoch(int(num_epochs) * int(tokens_per_epoch), seq_len)
    sizes = np.asarray(sizes)
    document_index = np.asarray(document_index)
    if document_index.size and (document_index.min() < 0 or document_index.max() >= sizes.size):
        raise ValueError(f"document_index holds ids outside [0, {sizes.size})")
    lengths = sizes[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    if ends.size == 0 or positions[-1] >= ends[-1]:
        total = int(ends[-1]) if ends.size else 0
        raise ValueError(
            f"{num_samples} samples of {seq_len}+1 tokens need "
            f"{num_samples * seq_len + 1} tokens; the document index holds {total}"
        )
    # The document holding token p is the first whose end is beyond p.
    doc = np.searchsorted(ends, positions, side="right")
    out = np.empty((num_samples + 1, 2), dtype=np.int64)
    out[:, 0] = doc
    out[:, 1] = positions - (ends[doc] - lengths[doc])
    return out


def build_sample_index(
    sizes: np.ndarray,
    document_index: np.ndarray,
    seq_len: int,
    num_epochs: int,
    tokens_per_epoch: int,
    num_samples: int = -1,
) -> np.ndarray:
    """Sample index ``[num_samples + 1, 2]`` by the C++ builder or its NumPy twin."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    document_index = np.ascontiguousarray(document_index, dtype=np.int32)
    if backend() == "cpp":
        return _cpp().build_sample_index(
            sizes,
            document_index,
            int(seq_len),
            int(num_epochs),
            int(tokens_per_epoch),
            int(num_samples),
        )
    return build_sample_index_numpy(
        sizes, document_index, seq_len, num_epochs, tokens_per_epoch, num_samples
    )


def normalize_weights(weights) -> np.ndarray:
    """Weights as a float64 vector summing to 1; rejects negative, non-finite, all-zero."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0:
        raise ValueError("a mixture needs at least one weight")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"mixture weights must be finite, got {w.tolist()}")
    if np.any(w < 0):
        raise ValueError(f"mixture weights must be non-negative, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError("mixture weights are all zero")
    return w / total


def _blend_dtype(num_datasets: int):
    return np.int16 if num_datasets <= np.iinfo(np.int16).max else np.int32


def build_blending_indices_numpy(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin of the C++ greedy blending (same arguments, same result).

    Position ``i`` goes to the component furthest below its target,
    ``argmax(weights * (i + 1) - counts)`` (first one on ties). Inherently sequential,
    so this loops in Python over plain floats (IEEE doubles, bit-identical to the C++
    arithmetic); the C++ builder is the fast path.
    """
    w = [float(x) for x in np.asarray(weights, dtype=np.float64).reshape(-1)]
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    counts = [0] * len(w)
    dataset_index = np.empty(size, dtype=_blend_dtype(len(w)))
    dataset_sample_index = np.empty(size, dtype=np.int64)
    ds_range = range(len(w))
    for i in range(size):
        x = float(i + 1)
        best, best_err = 0, w[0] * x - counts[0]
        for d in ds_range:
            err = w[d] * x - counts[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


def build_blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dataset_index, dataset_sample_index)`` of a greedy blend of ``size`` samples.

    ``weights`` are normalised first (see :func:`normalize_weights`).
    """
    w = normalize_weights(weights)
    size = int(size)
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    if backend() == "cpp":
        return tuple(_cpp().build_blending_indices(w, size))
    return build_blending_indices_numpy(w, size)


# --------------------------------------------------------------------------------------
# Packed indices: build + cache
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedIndices:
    """The three arrays of a packed dataset (possibly memory-mapped from the cache)."""

    document_index: np.ndarray
    sample_index: np.ndarray
    shuffle_index: np.ndarray
    num_epochs: int


def build_packed_indices(
    sizes: np.ndarray, seq_len: int, num_samples: int, seed: int
) -> PackedIndices:
    """Document, sample and shuffle index for ``num_samples`` samples (no caching)."""
    seq_len = check_seq_len(seq_len)
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    if sizes.size == 0 or tokens_per_epoch == 0:
        raise ValueError("cannot pack an empty dataset (no documents or no tokens)")
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    num_epochs = num_epochs_for(num_samples, tokens_per_epoch, seq_len)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(sizes.size, num_epochs, rng)
    sample_index = build_sample_index(
        sizes, document_index, seq_len, num_epochs, tokens_per_epoch, num_samples
    )
    shuffle_index = rng.permutation(num_samples).astype(np.int64)
    return PackedIndices(document_index, sample_index, shuffle_index, num_epochs)


_KINDS = ("document_index", "sample_index", "shuffle_index")


def cache_key(
    name: str,
    sizes: np.ndarray,
    document_bounds: np.ndarray | None,
    seq_len: int,
    num_samples: int,
    seed: int,
) -> str:
    """Hex digest naming a packed index: what it is built from, and the builder version.

    The data is identified by its sequence-length array (and document boundaries), which
    is all the index depends on; ``name`` (the data prefix's base name) keeps caches of
    different units apart and readable, and survives moving the data directory.
    """
    h = hashlib.sha256()
    h.update(
        f"mba-packed-v{BUILDER_VERSION}|{name}|{int(seq_len)}|{int(num_samples)}|"
        f"{int(seed)}|".encode()
    )
    h.update(np.ascontiguousarray(sizes, dtype=np.int32).tobytes())
    if document_bounds is not None:
        h.update(b"|docs|")
        h.update(np.ascontiguousarray(document_bounds, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def cache_paths(cache_dir: str, name: str, key: str) -> dict[str, str]:
    """``{kind: path}`` of the three cache files."""
    return {k: os.path.join(cache_dir, f"{name}.packed-{key}.{k}.npy") for k in _KINDS}


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
    from megablocks_ablate.utils.atomic import atomic_open

    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _load_cache(paths: dict[str, str], num_samples: int):
    """``(document, sample, shuffle)`` memory-mapped, or None when not (fully) cached."""
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    try:
        arrays = {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}
    except (OSError, ValueError) as e:
        raise DataFormatError(
            f"packed index cache {paths['sample_index']} is unreadable ({e}); "
            "delete the .packed-* files to rebuild"
        ) from e
    d, s, sh = arrays["document_index"], arrays["sample_index"], arrays["shuffle_index"]
    if (
        s.shape != (num_samples + 1, 2)
        or sh.shape != (num_samples,)
        or d.ndim != 1
        or s.dtype != np.int64
        or sh.dtype != np.int64
        or d.dtype != np.int32
    ):
        raise DataFormatError(
            f"packed index cache {paths['sample_index']} has shapes "
            f"{d.shape}/{s.shape}/{sh.shape}, expected a sample index of "
            f"{num_samples + 1} rows; delete the .packed-* files to rebuild"
        )
    return d, s, sh


def load_or_build(
    sizes: np.ndarray,
    seq_len: int,
    num_samples: int,
    seed: int,
    *,
    name: str = "data",
    cache_dir: str | None = None,
    document_bounds: np.ndarray | None = None,
) -> PackedIndices:
    """Load the packed indices from ``cache_dir``, or build (and cache) them.

    Cache files are written atomically (temp file, then rename), so concurrent ranks
    building the same index race harmlessly. An unwritable ``cache_dir`` only warns.
    """
    tokens_per_epoch = int(np.asarray(sizes).sum(dtype=np.int64))
    if cache_dir is not None:
        key = cache_key(name, sizes, document_bounds, seq_len, num_samples, seed)
        paths = cache_paths(cache_dir, name, key)
        hit = _load_cache(paths, num_samples)
        if hit is not None:
            d, s, sh = hit
            num_epochs = d.size // max(np.asarray(sizes).size, 1)
            if num_epochs != num_epochs_for(num_samples, tokens_per_epoch, seq_len):
                raise DataFormatError(
                    f"packed index cache {paths['document_index']} covers "
                    f"{num_epochs} epochs, inconsistent with its key"
                )
            return PackedIndices(d, s, sh, num_epochs)
    built = _build_indices(sizes, seq_len, num_samples, seed)
    if cache_dir is not None:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            for kind in _KINDS:
                _save_npy_atomic(paths[kind], getattr(built, kind))
        except OSError as e:
            # Files already renamed into place are complete, so nothing to clean up.
            logger.warning(
                "cannot write the packed index cache in %s (%s); keeping it in memory", cache_dir, e
            )
    return built


def _build_indices(sizes, seq_len, num_samples, seed) -> PackedIndices:
    # Indirection so tests can assert a cache hit builds nothing.
    return build_packed_indices(sizes, seq_len, num_samples, seed)
