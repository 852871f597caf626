"""How every ``pqv`` command ends: the exit statuses and the one-line errors, in one place (the
``pqv`` entry point and ``examples/demo.py`` both go through :func:`run_command`)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..errors import ConfigError

__all__ = ["CLIError", "CommandFailed", "run_command"]


class CLIError(ConfigError):
    """A user error found by the CLI itself: printed as one line, exit status 2."""


class CommandFailed(RuntimeError):
    """A run failed for a reason the message explains fully (e.g. a sweep cell's worker died, its
    traceback already on stderr): printed as one line, exit status 1."""


def run_command(command: Callable[[], int]) -> int:
    """Run ``command``; bad input (:class:`ConfigError`) → ``pqv: error: ...`` and 2,
    :class:`CommandFailed` → the message and 1, Ctrl-C → 130. Anything else is a bug or a failure
    of the run and keeps its traceback."""
    try:
        return command()
    except ConfigError as exc:
        print(f"pqv: error: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"pqv: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pqv: interrupted", file=sys.stderr)
        return 130
