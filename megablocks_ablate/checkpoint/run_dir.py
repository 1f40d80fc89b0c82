"""A training run directory where a model checkpoint is expected: its ``final/``.

``megablocks-ablate train`` writes a *run directory* (``config.yaml``,
``checkpoints/step_*``, and once training finished ``final/`` + ``COMPLETE.json``; the
layout is :mod:`megablocks_ablate.train.state`'s). Every command that reads a model
checkpoint from a path the user gave calls :func:`resolve_checkpoint_dir` first, so
``eval --model runs/seed`` means ``runs/seed/final``; an unfinished run is refused,
naming its latest step checkpoint.

The names below are the one definition of a run directory's layout: the trainer
(``train.state``) imports them, since this package may not import ``train``.
"""

from __future__ import annotations

import logging
import os
import re

from megablocks_ablate.checkpoint.model_dir import CONFIG_FILE, LINEAGE_FILE, MODEL_FILE
from megablocks_ablate.errors import DataFormatError
from megablocks_ablate.utils.outputs import output_kind

logger = logging.getLogger(__name__)

RUN_COMPLETE_FILE = "COMPLETE.json"  # written last by the trainer: training finished
RUN_FINAL_DIR = "final"  # the trained model, a model checkpoint
RUN_CHECKPOINTS_DIR = "checkpoints"  # resumable step checkpoints, step_<8+ digits>
RUN_KIND = "train-run"  # the output kind `train` claims its out_dir as
STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")  # a step checkpoint's directory name


def is_run_dir(path: str) -> bool:
    """Whether ``path`` is a training run directory rather than a model checkpoint:
    a directory without checkpoint files that holds ``final/``, ``COMPLETE.json`` or
    ``checkpoints/``, or that ``train`` claimed as its output."""
    if not os.path.isdir(path):
        return False
    if any(os.path.exists(os.path.join(path, n)) for n in (MODEL_FILE, CONFIG_FILE, LINEAGE_FILE)):
        return False
    return (
        os.path.isdir(os.path.join(path, RUN_FINAL_DIR))
        or os.path.isfile(os.path.join(path, RUN_COMPLETE_FILE))
        or os.path.isdir(os.path.join(path, RUN_CHECKPOINTS_DIR))
        or output_kind(path) == RUN_KIND
    )


def latest_run_checkpoint(run_dir: str) -> str | None:
    """The newest ``checkpoints/step_*`` directory of a run (None: none yet)."""
    root = os.path.join(run_dir, RUN_CHECKPOINTS_DIR)
    try:
        names = os.listdir(root)
    except OSError:
        return None
    steps = []
    for name in names:
        m = STEP_DIR_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            steps.append((int(m.group(1)), name))
    return os.path.join(root, max(steps)[1]) if steps else None


def resolve_checkpoint_dir(path: str) -> str:
    """The model checkpoint directory that ``path`` names.

    A checkpoint directory (or anything that is not a run directory: a missing path,
    a file) is returned unchanged, for the reader to validate; a finished training run
    means its ``final/`` (logged at INFO). An unfinished run (no ``COMPLETE.json`` or
    no ``final/``) is a :class:`DataFormatError` naming its latest step checkpoint.
    """
    if not is_run_dir(path):
        return path
    final = os.path.join(path, RUN_FINAL_DIR)
    complete = os.path.isfile(os.path.join(path, RUN_COMPLETE_FILE))
    if complete and os.path.isfile(os.path.join(final, MODEL_FILE)):
        logger.info(f"using {final} (the run's final checkpoint)")
        return final
    shown = os.path.normpath(path)
    if not os.path.isdir(final):
        missing = "final/"
    elif not complete:  # killed between writing final/ and its marker
        missing = RUN_COMPLETE_FILE
    else:
        missing = f"final/{MODEL_FILE}"
    latest = latest_run_checkpoint(path)
    if latest is None:
        raise DataFormatError(
            f"{shown} is a training run that has not finished (no {missing}) and has no "
            "checkpoint yet: finish the run, or pass a checkpoint directory"
        )
    raise DataFormatError(
        f"{shown} is a training run that has not finished (no {missing}); its latest "
        f"checkpoint is {os.path.normpath(latest)}: pass that, or finish the run"
    )
