"""Exceptions that mean "the user asked for something that is not allowed".

Library code raises :class:`ConfigError` (a ``ValueError``) when it validates a value the user
chose — a constructor argument, a config entry, a CLI option — and :class:`InputNotFoundError` (also
a ``FileNotFoundError``) when a file or folder the user named does not exist. The ``pqv`` command
line prints exactly these as one line, ``pqv: error: ...``, with exit status 2; any other exception
is a bug or a failure of the run and keeps its traceback (exit status 1).
"""

from __future__ import annotations

__all__ = ["ConfigError", "InputNotFoundError"]


class ConfigError(ValueError):
    """A value the user chose is not allowed; the message names it and what is allowed."""


class InputNotFoundError(ConfigError, FileNotFoundError):
    """A file or folder the user named does not exist."""
