"""Packed training samples of one base unit: fixed ``seq_len + 1`` tokens, Megatron style.

``PackedDataset(prefix, seq_len=2048)[i]`` is sample ``shuffle_index[i]`` of the unit's
concatenated documents: ``seq_len + 1`` int64 tokens, ``inputs = x[:-1]``,
``labels = x[1:]``. Samples cross document boundaries (every document ends in EOD) and
consecutive samples share one boundary token. When more samples are asked for than one
epoch holds, the documents repeat for more epochs, each shuffled anew. See
:mod:`megablocks_ablate.data.sample_index` for the index arrays and their cache.
"""

from __future__ import annotations

import operator
import os

import numpy as np

from megablocks_ablate.data import sample_index as si
from megablocks_ablate.errors import DataFormatError


def _open(prefix_or_dataset):
    if isinstance(prefix_or_dataset, (str, os.PathLike)):
        from megablocks_ablate.data.indexed import IndexedDataset, strip_suffix

        return IndexedDataset(strip_suffix(os.fspath(prefix_or_dataset)))
    return prefix_or_dataset


class PackedDataset:
    """Fixed-length samples over one indexed dataset (a base unit).

    Args:
        prefix_or_dataset: an indexed-dataset prefix (``data/cs-0`` for ``cs-0.bin/.idx``)
            or an open :class:`~megablocks_ablate.data.indexed.IndexedDataset`.
        seq_len: tokens per training sequence; each sample holds ``seq_len + 1``.
        num_samples: samples to provide; default one epoch, ``(tokens - 1) // seq_len``.
            More than one epoch's worth repeats the documents (``num_epochs > 1``).
        seed: seeds ``np.random.RandomState`` for the document and sample shuffles.
        cache_dir: where the index ``.npy`` files go; default beside the data (no cache
            for an in-memory dataset without a prefix).
    """

    def __init__(
        self,
        prefix_or_dataset,
        seq_len: int,
        num_samples: int | None = None,
        seed: int = 1234,
        cache_dir: str | None = None,
    ):
        self.dataset = _open(prefix_or_dataset)
        self.seq_len = si.check_seq_len(seq_len)
        self.seed = int(seed)
        prefix = getattr(self.dataset, "prefix", None)
        self.name = os.path.basename(prefix) if prefix else "data"
        where = prefix or "the dataset"

        sizes = np.asarray(self.dataset.sequence_lengths)
        self.tokens_per_epoch = int(sizes.sum(dtype=np.int64))
        if sizes.size == 0 or self.tokens_per_epoch == 0:
            raise DataFormatError(
                f"{where} is empty ({sizes.size} sequences, "
                f"{self.tokens_per_epoch} tokens): nothing to pack"
            )
        if num_samples is None:
            num_samples = si.samples_per_epoch(self.tokens_per_epoch, self.seq_len)
            if num_samples == 0:
                raise DataFormatError(
                    f"{where} has {self.tokens_per_epoch} tokens, fewer than one sample of "
                    f"seq_len + 1 = {self.seq_len + 1}; pass num_samples to repeat it"
                )
        num_samples = operator.index(num_samples)
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = num_samples

        if cache_dir is None and prefix:
            cache_dir = os.path.dirname(os.path.abspath(prefix))
        self.cache_dir = cache_dir
        indices = si.load_or_build(
            sizes,
            self.seq_len,
            num_samples,
            self.seed,
            name=self.name,
            cache_dir=cache_dir,
            document_bounds=getattr(self.dataset, "document_indices", None),
        )
        self.document_index = indices.document_index
        self.sample_index = indices.sample_index
        self.shuffle_index = indices.shuffle_index
        self.num_epochs = indices.num_epochs

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample ``i`` (through the shuffle): ``seq_len + 1`` int64 tokens."""
        i = operator.index(i)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return self.unshuffled(int(self.shuffle_index[i]))

    def unshuffled(self, s: int) -> np.ndarray:
        """Sample ``s`` in stream order (before the shuffle)."""
        (j0, o0), (j1, o1) = self.sample_index[s], self.sample_index[s + 1]
        docs, ds = self.document_index, self.dataset
        if j0 == j1:
            return ds.get(int(docs[j0]), int(o0), int(o1 - o0 + 1)).astype(np.int64)
        parts = [ds.get(int(docs[j0]), int(o0))]
        parts.extend(ds[int(docs[j])] for j in range(j0 + 1, j1))
        parts.append(ds.get(int(docs[j1]), 0, int(o1 + 1)))
        out = np.concatenate(parts).astype(np.int64)
        if out.size != self.seq_len + 1:  # only a corrupt cache can get here
            raise DataFormatError(
                f"packed sample {s} of {self.name} has {out.size} tokens, "
                f"expected {self.seq_len + 1}: the index cache is stale"
            )
        return out

    def __repr__(self) -> str:
        return (
            f"PackedDataset({self.name!r}, seq_len={self.seq_len}, "
            f"num_samples={self.num_samples}, num_epochs={self.num_epochs}, "
            f"seed={self.seed})"
        )
