"""A study spec named by a packaged preset: ``study plan demo``.

Wherever a study spec path is taken (``study plan|run|report|search|export|optimize``,
:meth:`~megablocks_ablate.ablate.spec.StudySpec.load`, the notebook API), a bare name
that is not a file, such as ``demo``, names the shipped preset
``megablocks_ablate/configs/studies/<name>.yaml``: a pip install has no ``configs/`` to
point at. A file of that name in the working directory wins; a name ending in
``.yaml``/``.yml``/``.json`` or holding a directory separator is always a path. The
relative paths inside a shipped preset are relative to the working directory (see
:mod:`.spec_paths`), as the demo writes ``demo_out/`` there.
"""

from __future__ import annotations

import os

from megablocks_ablate.config import known_presets, shipped_preset_dir
from megablocks_ablate.errors import ConfigError

SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def is_bare_name(text: str) -> bool:
    """Whether ``text`` reads as a preset name rather than a path."""
    return (
        bool(text)
        and not text.endswith(SPEC_SUFFIXES)
        and "/" not in text
        and os.sep not in text
        and not text.startswith((".", "~"))
    )


def study_spec_file(spec: str | os.PathLike) -> str:
    """The file a study spec argument names: the argument itself when it is a file or a
    path, else the packaged preset of that name; an unknown name is refused, listing
    the known presets."""
    text = os.fspath(spec)
    if os.path.isfile(text) or not is_bare_name(text):
        return text
    presets = shipped_preset_dir("studies")
    if text in known_presets(presets):
        return os.path.join(presets, f"{text}.yaml")
    known = ", ".join(known_presets(presets)) or "none"
    raise ConfigError(
        f"study spec {text!r}: no such file, and no packaged study preset of that name "
        f"(known presets: {known}; or give a YAML path)"
    )
