"""Errors a user can act on.

Every error raised for bad input or configuration is a ``ComatError``: its message is one line
that names the problem and what to do. The CLI prints it and exits non-zero; Prefect tasks do
not retry ``ConfigError``/``InputError`` (retrying cannot fix them) but do retry ``StorageError``.
"""


class ComatError(Exception):
    """Base class: a one-line, user-facing message."""


class ConfigError(ComatError):
    """The configuration is invalid (unknown preset or key, value out of range)."""


class InputError(ComatError):
    """An input (prompt file, model path) is missing, empty or malformed."""


class StorageError(ComatError):
    """The artifact store is unreachable or holds something unexpected (transient: retried)."""


class IntegrityError(StorageError):
    """A file does not match its manifest (size or sha256)."""
