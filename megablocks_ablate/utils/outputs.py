"""Output directories: never delete what we did not write.

Every command that writes a directory claims it first with :func:`claim_output_dir`:

* a new or empty directory is ours (a marker file ``.megablocks-ablate.json`` records
  which command's output it is);
* a directory that already holds a previous output of the same kind (its marker, or
  for outputs older than markers the files that kind always writes) is reused: resumed
  by commands that resume (train, study, demo, preprocess), replaced by the others
  only with ``--overwrite`` — and even then only the files that output consists of
  are replaced (:func:`megablocks_ablate.checkpoint.staged_checkpoint_dir`);
* anything else that exists — a file, a directory with a user's files, another kind
  of output — is refused, naming it, and nothing is touched;
* an output equal to one of the command's inputs, or inside one, is refused.

Interrupted writes leave hidden temporaries (``.<name>.<host>-<pid>.<random>.tmp``)
beside their target; :func:`sweep_stale_temporaries` removes those whose process is
gone, so the next successful run of the same command leaves none behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.atomic import atomic_write_json

MARKER = ".megablocks-ablate.json"
MARKER_FORMAT = "megablocks-ablate/output@1"

# kind -> files (or directories) that output always holds, to recognise outputs written
# before markers existed. A directory counts as that kind when ALL are present.
SIGNATURES: dict[str, tuple[tuple[str, ...], ...]] = {
    "checkpoint": (("model.safetensors", "config.json", "lineage.json"),),
    "hf-export": (),  # recognised by marker only
    "train-run": (("config.yaml", "metrics.jsonl"), ("config.yaml", "checkpoints")),
    "preprocess": (("manifest.json",), (".preprocess-tmp",)),
    "study": (("results.sqlite",), ("pool",), ("seq",)),
    "demo": (("study.yaml",), ("corpus.jsonl",), ("tokenizer.model",)),
    "gpu-suite": (("summary.json", "rows"),),  # benchmarks/gpu_suite.sh --out DIR
}
# Temporaries on other hosts are left alone unless this old (their pid says nothing here).
FOREIGN_TMP_AGE_S = 24 * 3600


def tmp_tag() -> str:
    """``<host>-<pid>``: put in temporary names so a later run can tell a dead writer's
    leftovers from a live writer's work in progress."""
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


def read_marker(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, MARKER), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def write_marker(directory: str, kind: str, files: Iterable[str] | None = None) -> None:
    """Record that ``directory`` is an output of ``kind`` (and, optionally, its files)."""
    data: dict = {"format": MARKER_FORMAT, "kind": kind}
    if files is not None:
        data["files"] = sorted(files)
    atomic_write_json(os.path.join(directory, MARKER), data)


def output_kind(directory: str) -> str | None:
    """The kind of our output ``directory`` holds (marker first, then signatures)."""
    marker = read_marker(directory)
    if marker is not None:
        return str(marker.get("kind"))
    try:
        present = set(os.listdir(directory))
    except OSError:
        return None
    for kind, signatures in SIGNATURES.items():
        if any(sig and set(sig) <= present for sig in signatures):
            return kind
    return None


def own_files(directory: str) -> set[str] | None:
    """The files the marker of ``directory`` lists as ours (None: not recorded)."""
    marker = read_marker(directory)
    files = marker.get("files") if marker else None
    return set(files) | {MARKER} if isinstance(files, list) else None


def _inside(path: str, other: str) -> bool:
    path, other = os.path.realpath(path), os.path.realpath(other)
    return path == other or path.startswith(other.rstrip(os.sep) + os.sep)


def check_not_an_input(path: str, inputs: Iterable[str | None], flag: str = "--out") -> None:
    """Refuse an output equal to an input or inside one (it would replace the input)."""
    for inp in inputs:
        if inp and os.path.exists(inp) and _inside(path, inp):
            what = "is" if os.path.realpath(path) == os.path.realpath(inp) else "is inside"
            raise ConfigError(f"{flag} {path}: {what} the input {inp}; write the output elsewhere")


def _describe(directory: str) -> str:
    names = sorted(os.listdir(directory))
    shown = ", ".join(names[:4]) + (f", ... ({len(names)} entries)" if len(names) > 4 else "")
    return shown


def claim_output_dir(
    path: str,
    kind: str,
    *,
    overwrite: bool = False,
    reuse: bool = False,
    inputs: Iterable[str | None] = (),
    flag: str = "--out",
    create: bool = True,
) -> bool:
    """Make ``path`` the output directory of a ``kind`` output, or refuse (ConfigError).

    ``reuse``: an existing output of this kind is continued (resumable commands);
    ``overwrite``: it may be replaced (its own files only). ``create=False`` only checks
    (outputs written by a staged rename, like checkpoints, create themselves). Returns
    True when the directory already held an output of this kind. Stale temporaries of
    earlier interrupted runs beside it are removed.
    """
    check_not_an_input(path, inputs, flag)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: exists and is not a directory; nothing was changed")
    existing = os.path.isdir(path) and bool(os.listdir(path))
    if existing:
        found = output_kind(path)
        if found != kind:
            what = f"a {found} output" if found else "files megablocks-ablate did not write"
            raise ConfigError(
                f"{flag} {path}: exists and holds {what} ({_describe(path)}); nothing was "
                f"changed: choose a new or empty directory for this {kind} output"
            )
        if not (reuse or overwrite):
            raise ConfigError(
                f"{flag} {path}: holds a previous {kind} output; pass --overwrite to replace "
                "it (only its own files are replaced; other files there are kept)"
            )
    try:
        if create:
            os.makedirs(path, exist_ok=True)
            if read_marker(path) is None:
                write_marker(path, kind)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{flag} {path}: cannot create the output directory ({e.strerror})"
        ) from None
    sweep_stale_temporaries(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    return existing


_TMP_RE = re.compile(r"^\.(?P<base>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.(?:tmp|old)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _is_stale(directory: str, name: str) -> bool:
    m = _TMP_RE.match(name)
    if m is None:
        return False
    host = socket.gethostname().split(".")[0]
    if m["host"] == host:
        return int(m["pid"]) != os.getpid() and not _alive(int(m["pid"]))
    try:
        age = time.time() - os.lstat(os.path.join(directory, name)).st_mtime
    except OSError:
        return False
    return age > FOREIGN_TMP_AGE_S


def sweep_stale_temporaries(directory: str, base: str | None = None) -> list[str]:
    """Remove ``.<base>.<host>-<pid>.*.tmp`` / ``.old`` entries in ``directory`` left by
    writers that are no longer running (any base when ``base`` is None). Returns them."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _TMP_RE.match(name)
        if m is None or (base is not None and m["base"] != base) or not _is_stale(directory, name):
            continue
        full = os.path.join(directory, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            try:
                os.unlink(full)
            except OSError:
                continue
        removed.append(full)
    return removed
