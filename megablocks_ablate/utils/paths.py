"""Paths recorded in files travel with those files.

A path a file records (a manifest's tokenizer, a checkpoint lineage's tokenizer and
parents, a study spec's data and outputs, a results row's model) is stored relative to
the directory of the file that records it when the path was given relative, and kept
exactly as given when it was absolute. A reader resolves it against that directory,
never against its own working directory, so a study copied elsewhere, or read from
another directory (a Slurm job, a notebook), finds the same files.

* :func:`record_path`: a path as this process holds it (absolute, or relative to the
  working directory) -> the string to store in ``recording_file``;
* :func:`resolve_recorded`: a stored string -> an absolute path;
* :func:`recorded_as_given`: a stored string -> a path in the form it was given
  (absolute stays absolute, relative becomes relative to the working directory), for a
  value that is read from one file and recorded again in another, so that it is
  recorded relative there too.

Files written before this rule recorded some relative paths against the working
directory of the process that wrote them. ``cwd_fallback=True`` accepts such a record
when it is unambiguous: the path does not exist relative to the recording file but
does relative to the working directory.
"""

from __future__ import annotations

import os


def _recording_dir(recording_file: str | os.PathLike) -> str:
    return os.path.dirname(os.path.abspath(os.fspath(recording_file)))


def record_path(path: str | os.PathLike, recording_file: str | os.PathLike) -> str:
    """``path`` as ``recording_file`` stores it: relative to that file's directory when
    ``path`` is relative (to the working directory), unchanged when it is absolute."""
    path = os.fspath(path)
    if not path or os.path.isabs(path):
        return path
    return os.path.relpath(os.path.abspath(path), _recording_dir(recording_file))


def resolve_recorded(
    value: str | os.PathLike, recording_file: str | os.PathLike, *, cwd_fallback: bool = False
) -> str:
    """The absolute path a value stored in ``recording_file`` names: an absolute value
    as it is, a relative one joined to the recording file's directory. ``cwd_fallback``:
    a relative value that exists only relative to the working directory (a record
    written before paths were recorded relative to their file) is taken from there."""
    value = os.fspath(value)
    if not value or os.path.isabs(value):
        return value
    here = os.path.normpath(os.path.join(_recording_dir(recording_file), value))
    if cwd_fallback and not os.path.lexists(here) and os.path.lexists(value):
        return os.path.abspath(value)
    return here


def recorded_as_given(
    value: str | os.PathLike, recording_file: str | os.PathLike, *, cwd_fallback: bool = False
) -> str:
    """A value stored in ``recording_file`` as a path for this process, in the form it
    was given: an absolute value as it is, a relative one relative to the working
    directory (so that :func:`record_path` records it relative again wherever it goes).
    ``cwd_fallback`` as in :func:`resolve_recorded`."""
    value = os.fspath(value)
    if not value or os.path.isabs(value):
        return value
    return os.path.relpath(resolve_recorded(value, recording_file, cwd_fallback=cwd_fallback))
