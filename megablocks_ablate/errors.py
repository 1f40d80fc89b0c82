"""Exceptions with messages meant for users: each names the file/field/tensor at fault.

The CLI turns any :class:`MBAError` into ``error: <message>`` and exit status 2,
without a traceback; anything else is a bug and keeps its traceback.
"""


class MBAError(Exception):
    """Base of all user-facing errors."""


class ConfigError(MBAError, ValueError):
    """A config file, field or override is invalid."""


class DataFormatError(MBAError, ValueError):
    """A data file (index, bin, manifest, JSONL, cache) is malformed or inconsistent."""


class TokenizerError(MBAError, ValueError):
    """A tokenizer file cannot be loaded or does not match recorded data."""


class NonFiniteError(MBAError, ValueError):
    """A weight, loss or score is NaN or infinite; the message names where it arose
    (checkpoint and tensor, or model and domain)."""
