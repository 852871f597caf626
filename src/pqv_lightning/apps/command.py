"""How every ``pqv`` command ends: the exit statuses and the one-line errors, in one place (the
``pqv`` entry point and ``examples/demo.py`` both go through :func:`run_command`)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Iterator, Sequence

from ..errors import ConfigError

__all__ = [
    "CLIError",
    "CommandFailed",
    "LazyChoices",
    "OneLineParser",
    "contention_limit",
    "count_at_least",
    "run_command",
]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument ends with one line, ``pqv: error: ...`` (exit status 2), like every
    other refusal of the command line, instead of the usage block; ``--help`` shows the usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"pqv: error: {self.prog.removeprefix('pqv ')}: {message} (see {self.prog} --help)\n")


class LazyChoices(Sequence[str]):
    """argparse ``choices`` read from a registry only when a value is checked or the help is shown,
    so that building the parser (``pqv --help``) imports neither torch nor the registries.

    ``LazyChoices("pqv_lightning.export.targets", "TARGETS")`` — a module and the name of a registry
    (or any collection of names) in it."""

    def __init__(self, module: str, attr: str) -> None:
        self.module, self.attr = module, attr

    def _names(self) -> list[str]:
        found = getattr(importlib.import_module(self.module), self.attr)
        return list(found.names() if hasattr(found, "names") else found)

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, index):
        return self._names()[index]


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


def count_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: allowed is an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def contention_limit(text: str) -> float | None:
    """An argparse type: a number of CPUs, or 'none' (keep every measurement)."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed are a number of CPUs (e.g. 0.2) or 'none'") from None
