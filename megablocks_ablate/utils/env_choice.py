"""One reading of the ``MBA_*`` switches that pick one of a few named settings
(``MBA_KERNELS``, ``MBA_ATTENTION``, ``MBA_CE_CHUNKS``, ``MBA_INPROJ_GRAD``,
``MBA_MERGE_VEC``, ``MBA_COMPILE_ORDER``): case and surrounding blanks ignored, unset or
blank meaning the default, anything else refused naming the variable and the choices.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from megablocks_ablate.errors import ConfigError


def check_choice(value: str, choices: Sequence[str], where: str) -> str:
    """``value`` normalised (stripped, lower case), refused with a ConfigError naming
    ``where`` unless it is one of ``choices``."""
    name = value.strip().lower()
    if name not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {name!r}")
    return name


def env_choice(variable: str, choices: Sequence[str], default: str | None = None) -> str:
    """The setting ``variable`` names in the environment (``default``, else the first
    choice, when unset or blank), checked by :func:`check_choice`."""
    raw = os.environ.get(variable, "").strip()
    return check_choice(raw or (default if default is not None else choices[0]), choices, variable)
