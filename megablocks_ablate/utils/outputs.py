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
* an output equal to one of the command's inputs, or inside one, is refused, and so
  (:func:`check_inputs_outside`) is an input inside the output.

An output replaced as a whole only once its successor is complete (preprocess
``--overwrite``) is built in ``<out>.staging-<host>-<pid>`` beside it and swapped in
(:func:`swap_in`): ``<out>`` -> ``<out>.old-<host>-<pid>``, staging -> ``<out>``, old
removed; :func:`recover_swap` undoes a swap killed between its renames, and
:func:`side_dirs` recognises a dead writer's staging directory as ours.

Single output files (eval results, concatenated datasets, tokenizers) are claimed the
same way by :mod:`megablocks_ablate.utils.output_files`, which also holds the lock that
lets one writer at a time write an output.

Interrupted writes leave hidden temporaries (``.<name>.<host>-<pid>.<random>.tmp``)
beside their target; :func:`sweep_stale_temporaries` removes those whose process is
gone, so the next successful run of the same command leaves none behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterable

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.atomic import atomic_write_json, fsync_dir

logger = logging.getLogger(__name__)

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
    "report": (("report.md", "summary.json"),),  # study report --out DIR
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


def check_output_dir(
    path: str,
    kind: str,
    *,
    overwrite: bool = False,
    reuse: bool = False,
    inputs: Iterable[str | None] = (),
    flag: str = "--out",
) -> bool:
    """The checks of :func:`claim_output_dir`, touching nothing: refuse (ConfigError) an
    output that is an input or inside one, a file, another kind of output or a user's
    directory, or a previous output without ``reuse``/``overwrite``. Returns True when
    ``path`` already holds an output of this kind."""
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
    return existing


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
    existing = check_output_dir(
        path, kind, overwrite=overwrite, reuse=reuse, inputs=inputs, flag=flag
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


def check_inputs_outside(
    path: str, inputs: Iterable[tuple[str, str | None]], flag: str = "--out"
) -> None:
    """Refuse an input (``(its flag, its path)``) inside the output directory ``path``:
    replacing the output would replace it too. Touches nothing."""
    if not os.path.isdir(path):
        return
    for inp_flag, inp in inputs:
        if inp and os.path.exists(inp) and _inside(inp, path):
            raise ConfigError(
                f"{inp_flag} {inp}: is inside the output directory {flag} {path}; nothing "
                f"was changed: move it out of {path} or choose another {flag}"
            )


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


def is_stale_temporary(directory: str, name: str) -> bool:
    """Whether ``name`` in ``directory`` is a temporary of a writer that is gone."""
    return _is_stale(directory, name)


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


# ------------------------------------------------------------- staged replacement
# An output replaced as a whole is built in ``<out>.staging-<host>-<pid>`` beside it and
# swapped in only once complete: ``<out>`` -> ``<out>.old-<host>-<pid>``, staging ->
# ``<out>``, then the old one is removed.

_SIDE_RE = re.compile(r"^(?P<base>.+)\.(?P<what>staging|old)-(?P<host>[^.]+)-(?P<pid>\d+)$")


def staging_dir(path: str) -> str:
    """``<path>.staging-<host>-<pid>``: where this process builds a replacement of
    ``path`` (beside it, so on the same filesystem; symlinks resolved)."""
    return f"{os.path.realpath(path)}.staging-{tmp_tag()}"


def _writer_gone(full: str, host: str, pid: int) -> bool:
    if host == socket.gethostname().split(".")[0]:
        return pid == os.getpid() or not _alive(pid)
    try:
        return time.time() - os.lstat(full).st_mtime > FOREIGN_TMP_AGE_S
    except OSError:
        return False


def side_dirs(path: str, what: str, kind: str) -> list[tuple[str, bool]]:
    """The ``<path>.<what>-<host>-<pid>`` directories (``what``: staging or old) that
    are recognisably ours (a ``kind`` output, or empty), each with whether its writer is
    gone (dead, this process, or another host's and older than 24 hours)."""
    parent, base = os.path.split(os.path.realpath(path))
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    found = []
    for name in names:
        m = _SIDE_RE.match(name)
        full = os.path.join(parent, name)
        if m is None or m["base"] != base or m["what"] != what:
            continue
        if os.path.islink(full) or not os.path.isdir(full):
            continue
        if os.listdir(full) and output_kind(full) != kind:
            continue  # not recognisably ours: left alone
        found.append((full, _writer_gone(full, m["host"], int(m["pid"]))))
    return found


def recover_swap(path: str, kind: str) -> str | None:
    """Undo a swap a crash interrupted between its two renames: when ``path`` is gone
    and a dead writer's ``<path>.old-<host>-<pid>`` holds a ``kind`` output, rename it
    back. Returns the directory restored from, or None."""
    real = os.path.realpath(path)
    if os.path.lexists(real):
        return None
    olds = [d for d, gone in side_dirs(path, "old", kind) if gone]
    if not olds:
        return None
    newest = max(olds, key=os.path.getmtime)
    os.rename(newest, real)
    logger.warning(
        "%s: restored the previous output from %s (an interrupted replace)", path, newest
    )
    return newest


def remove_side_dirs(path: str, what: str, kind: str) -> list[str]:
    """Remove the ``<path>.<what>-*`` directories of writers that are gone; return them."""
    removed = []
    for d, gone in side_dirs(path, what, kind):
        if gone:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _carry(src: str, dst: str) -> None:
    """Hard-link ``src`` as ``dst`` (a copy where links are not possible)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)


def carry_user_files(
    old: str, new: str, own: Callable[[str], bool], prune: Iterable[str] = ()
) -> list[str]:
    """Hard-link (or copy) into ``new`` every file and empty directory of ``old`` that
    ``own(relative path)`` does not claim, skipping the directories ``prune`` wholesale;
    ``old`` is not changed. A path the new output already has keeps the new output's
    file (as an in-place rewrite would), with a warning. Returns the paths carried."""
    carried = []
    skip = {os.path.normpath(p) for p in prune}
    for root, dirs, files in os.walk(old):
        rel_root = os.path.relpath(root, old)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel_root, d)) not in skip]
        entries = files + [d for d in dirs if os.path.islink(os.path.join(root, d))]
        if not files and not dirs and rel_root != "." and not own(rel_root):
            os.makedirs(os.path.join(new, rel_root), exist_ok=True)
        for name in entries:
            rel = os.path.normpath(os.path.join(rel_root, name))
            if own(rel):
                continue
            if os.path.lexists(os.path.join(new, rel)):
                logger.warning("%s: replaced by the new output's file", os.path.join(old, rel))
                continue
            _carry(os.path.join(old, rel), os.path.join(new, rel))
            carried.append(rel)
    return carried


def swap_in(staging: str, path: str) -> None:
    """Replace the directory ``path`` by the complete ``staging`` beside it: rename
    ``path`` to ``<path>.old-<host>-<pid>``, ``staging`` to ``path``, remove the old
    one. Killed between the renames, :func:`recover_swap` restores the old output."""
    real = os.path.realpath(path)
    if not os.path.lexists(real):
        os.rename(staging, real)
    else:
        old = f"{real}.old-{tmp_tag()}"
        os.rename(real, old)
        try:
            os.rename(staging, real)
        except BaseException:
            os.rename(old, real)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(os.path.dirname(real))
