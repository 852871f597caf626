"""File helpers shared by the library and the applications: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "JsonCache",
    "atomic_write",
    "atomic_write_text",
    "commit_staged",
    "current_umask",
    "file_digest",
    "load_tensors",
    "staged",
    "staged_name",
]


@contextlib.contextmanager
def staged(path: str | Path, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary file name beside ``path``; it replaces ``path`` only if the block succeeds,
    so a reader never sees a half-written file and a failure leaves the old file untouched.
    ``suffix``: the temporary name's ending (writers that pick a format by extension need it)."""
    tmp = staged_name(path, suffix)
    try:
        yield tmp
        commit_staged(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def staged_name(path: str | Path, suffix: str = ".tmp") -> str:
    """A new empty hidden temporary file beside ``path`` (``.<name>.<random><suffix>``), for a write
    that :func:`commit_staged` finishes later (or the caller removes)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    return tmp


def commit_staged(tmp: str | Path, path: str | Path) -> None:
    """Give the finished temporary file ``tmp`` the final name ``path`` (atomically), with the mode a
    plain ``open()`` would have made (mkstemp makes 0600)."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)


def current_umask() -> int:
    """The process's file-mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], object], suffix: str = ".tmp") -> Path:
    """``write(temporary name)``, then rename it to ``path`` (see :func:`staged`). Returns ``path``."""
    with staged(path, suffix) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`staged`)."""
    with staged(path) as tmp:
        Path(tmp).write_text(text)


def file_digest(path: str | Path, length: int = 16) -> str:
    """A file's identity by content: the first ``length`` hex digits of its sha256."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:length]


def load_tensors(path: str | Path, argument: str) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that is not a torch checkpoint of
    plain tensors and containers (empty, random bytes, another format, a pickle that would run code)
    is a :class:`~pqv_lightning.errors.ConfigError` naming ``argument`` instead of torch's traceback.
    Nothing is ever loaded with ``weights_only=False``: a checkpoint must not run code."""
    import pickle

    import torch

    from .errors import ConfigError, InputNotFoundError

    if not Path(path).is_file():
        raise InputNotFoundError(f"{argument}={str(path)!r}: no such file")
    if Path(path).stat().st_size == 0:
        raise ConfigError(f"{argument}={str(path)!r} is an empty file, not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = (
            (
                "it holds Python objects beyond tensors and containers, which pqv-lightning never unpickles "
                "(weights_only=True)"
            )
            if "Weights only load failed" in str(exc)
            else "not a torch checkpoint"
        )
        raise ConfigError(f"{argument}={str(path)!r} cannot be loaded: {why}") from None
    except (EOFError, RuntimeError, ValueError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{argument}={str(path)!r} is not a torch checkpoint ({reason})") from None


class JsonCache:
    """Finished rows of a long, resumable run by key, in one JSON file rewritten atomically after each
    :meth:`put`: an interrupted run keeps every row it finished."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=1))
