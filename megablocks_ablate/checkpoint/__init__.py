"""The on-disk model format, owned here and nowhere else.

A model checkpoint is a directory of ``model.safetensors`` + ``config.json`` +
``lineage.json`` (:mod:`.model_dir`); :class:`Lineage` records where its weights came
from (:mod:`.lineage`); every directory is written staged and renamed into place
(:mod:`.staging`); large files are read memory-mapped and written as a stream
(:mod:`.safetensors_io`); a model with a NaN/inf weight is refused naming the tensor
(:func:`check_finite_state`, :mod:`.finite`). A training run directory given where a
checkpoint is expected means its ``final/`` (:func:`resolve_checkpoint_dir`,
:mod:`.run_dir`).

This package imports nothing of the project but ``errors`` and ``utils``, so that
``model``, ``train``, ``merge``, ``evaluate`` and ``ablate`` can all depend on it.
Training state (optimizer, RNG, trainer progress) is not a model checkpoint and lives
in :mod:`megablocks_ablate.train.state`.
"""

from megablocks_ablate.checkpoint.finite import check_finite_state
from megablocks_ablate.checkpoint.lineage import (
    LINEAGE_KINDS,
    Lineage,
    merged_seq_len,
    trained_seq_len,
)
from megablocks_ablate.checkpoint.model_dir import (
    CONFIG_FILE,
    LINEAGE_FILE,
    MODEL_FILE,
    load_model_checkpoint,
    map_model_weights,
    model_file,
    model_hash,
    open_model_weights,
    plain_tensors,
    read_checkpoint_meta,
    save_model_checkpoint,
    write_checkpoint_meta,
)
from megablocks_ablate.checkpoint.run_dir import (
    is_run_dir,
    latest_run_checkpoint,
    resolve_checkpoint_dir,
)
from megablocks_ablate.checkpoint.safetensors_io import (
    MappedSafetensors,
    SafetensorsStreamWriter,
    safetensors_header,
)
from megablocks_ablate.checkpoint.staging import fsync_path, staged_checkpoint_dir, write_json

__all__ = [
    "CONFIG_FILE",
    "LINEAGE_FILE",
    "LINEAGE_KINDS",
    "MODEL_FILE",
    "SAFETENSORS_DTYPES",
    "Lineage",
    "MappedSafetensors",
    "SafetensorsStreamWriter",
    "check_finite_state",
    "fsync_path",
    "is_run_dir",
    "latest_run_checkpoint",
    "load_model_checkpoint",
    "map_model_weights",
    "merged_seq_len",
    "model_file",
    "model_hash",
    "open_model_weights",
    "plain_tensors",
    "read_checkpoint_meta",
    "resolve_checkpoint_dir",
    "safetensors_header",
    "save_model_checkpoint",
    "staged_checkpoint_dir",
    "trained_seq_len",
    "write_checkpoint_meta",
    "write_json",
]


def __getattr__(name: str):
    # SAFETENSORS_DTYPES maps to torch dtypes; built on first use so that importing
    # this package (the file-merge path) does not import torch.
    if name == "SAFETENSORS_DTYPES":
        from megablocks_ablate.checkpoint import safetensors_io

        return safetensors_io.SAFETENSORS_DTYPES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
