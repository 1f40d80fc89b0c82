"""Preprocess ``--overwrite``: build the new output beside the old one, then swap.

An ``--out`` that holds a previous output (complete, or an unfinished run with other
settings) is not touched while the new one is built: the run writes into
``<out>.staging-<host>-<pid>`` (claimed as a preprocess output, so recognisably ours),
and only once its manifest is written

1. links the files in ``<out>`` that are not the previous output's (a user's notes, ...)
   into the staging directory, leaving ``<out>`` as it was;
2. renames ``<out>`` to ``<out>.old-<host>-<pid>`` and the staging directory to
   ``<out>``, then removes the old one (:func:`~megablocks_ablate.utils.outputs.swap_in`).

A refusal removes the staging directory; a crash leaves it, and the next ``--overwrite``
run with the same settings resumes it (others remove it once its writer is gone). A
kill between the two renames is undone by the next run, which renames the old output
back. Used by :mod:`.preprocess`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from megablocks_ablate.data.manifest import MANIFEST_NAME, Manifest
from megablocks_ablate.data.preprocess_heldout import UNIT_HELDOUT_DIR
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.outputs import (
    MARKER,
    carry_user_files,
    claim_output_dir,
    is_stale_temporary,
    remove_side_dirs,
    side_dirs,
    staging_dir,
    swap_in,
)

logger = logging.getLogger(__name__)

KIND = "preprocess"
TMP_DIR = ".preprocess-tmp"
_OWN_DIRS = ("units", "heldout", UNIT_HELDOUT_DIR)


def state_hash(directory: str) -> str | None:
    """The settings hash of the unfinished run in ``directory`` (None: none recorded)."""
    try:
        with open(os.path.join(directory, TMP_DIR, "state.json"), encoding="utf-8") as f:
            h = json.load(f).get("config_hash")
    except (OSError, ValueError, AttributeError):
        return None
    return h if isinstance(h, str) else None


def check_replace(out: str) -> None:
    """Refuse, touching nothing, a replace that cannot be done: another live process is
    replacing ``out``, or the directory beside it is not writable."""
    for d, gone in side_dirs(out, "staging", KIND):
        if not gone:
            raise ConfigError(
                f"--out {out}: another preprocess is replacing it (its staging directory "
                f"{d} belongs to a running process); nothing was changed: wait for it"
            )
    parent = os.path.dirname(os.path.realpath(out))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--out {out}: cannot replace it: {parent} is not writable (--overwrite builds "
            "the new output beside the old one); nothing was changed"
        )


def prepare_staging(out: str, h: str) -> str:
    """Claim this process's staging directory for ``out``: resume an interrupted one
    with the same settings hash ``h`` (a dead writer's is renamed to ours), remove the
    others whose writer is gone."""
    mine = staging_dir(out)
    if os.path.isdir(mine) and state_hash(mine) != h:
        shutil.rmtree(mine)  # this process's own earlier, interrupted try
    for d, gone in side_dirs(out, "staging", KIND):
        if not gone or d == mine:
            continue
        if not os.path.exists(mine) and state_hash(d) == h:
            os.rename(d, mine)
            logger.info("%s: resuming the interrupted replacement in %s", out, d)
        else:
            shutil.rmtree(d, ignore_errors=True)
    claim_output_dir(mine, KIND, reuse=True)
    return mine


def _own_files(out: str) -> set[str]:
    """The previous output's files under ``out``, relative: its manifest's units and
    held-out sets (or, for an unfinished run, the units it finished), the manifest and
    the marker."""
    own = {MARKER, MANIFEST_NAME, *_OWN_DIRS}
    manifest_path = os.path.join(out, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        old = Manifest.load(manifest_path)
        own |= {u["prefix"] + ext for u in old.units.values() for ext in (".bin", ".idx")}
        own |= {
            r["heldout"]["path"]
            for r in (*old.partitions.values(), *old.units.values())
            if r.get("heldout")
        }
    else:
        done = os.path.join(out, TMP_DIR, "units")
        for name in os.listdir(done) if os.path.isdir(done) else []:
            unit = name.removesuffix(".json")
            own |= {f"units/{unit}.bin", f"units/{unit}.idx", f"{UNIT_HELDOUT_DIR}/{unit}.jsonl"}
    return {os.path.normpath(p) for p in own}


def replace_output(staging: str, out: str) -> None:
    """Swap the complete ``staging`` in for ``out``, keeping the files in ``out`` that are
    not the previous output's (nor its packed-index caches, nor dead writers' temporaries)."""
    real = os.path.realpath(out)
    own = _own_files(real)
    stems = {os.path.splitext(p)[0] for p in own}

    def is_own(rel: str) -> bool:
        directory, name = os.path.split(rel)
        cache_of = os.path.join(directory, name.split(".packed-")[0])
        return (
            rel in own
            or (".packed-" in name and cache_of in stems)
            or is_stale_temporary(os.path.join(real, directory), name)
        )

    if os.path.isdir(real):
        carry_user_files(real, staging, is_own, prune=(TMP_DIR,))
    swap_in(staging, out)
    remove_side_dirs(out, "old", KIND)
