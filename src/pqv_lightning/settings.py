"""Process-wide runtime settings as context managers that put back what they found.

Torch's intra-op thread count, its quantized engine, ExecuTorch's thread pool and logger levels are
global to the process. Library calls (``export_mobile``, ``gemm_throughput``, ``pqv demo`` run
in-process, ...) change them only inside these blocks, so the caller's process is left as it was.
Code that owns its process (a benchmark worker) may set them for good instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence

import torch

__all__ = [
    "EXECUTORCH_NOISE",
    "dropped_log_lines",
    "filtered_stderr",
    "executorch_threads",
    "logger_levels",
    "quantized_engine",
    "set_executorch_threads",
    "torch_threads",
]


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block only."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """``torch.backends.quantized.engine = engine`` inside the block only."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


#: what ExecuTorch's runtime prints on its own when it is loaded and sizes its thread pool: cpuinfo's
#: probing of ARM-only files, and a torch notice about an enum of torchao's
EXECUTORCH_NOISE = ("[cpuinfo_utils.cpp:", "is an Enum subclass and is now natively supported")


@contextlib.contextmanager
def filtered_stderr(patterns: Sequence[str]) -> Iterator[None]:
    """Lines written to the process's stderr inside the block (file descriptor 2, so C and C++ libraries
    too) that contain one of ``patterns`` are dropped; the others are written out when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not any(p in line for p in patterns))
            if kept:
                os.write(2, kept.encode())


def _portable_lib():
    loaded = sys.modules.get("executorch.extension.pybindings.portable_lib")
    if loaded is not None:  # the noise comes with the first import only
        return loaded
    if importlib.util.find_spec("executorch") is None:
        return None
    with filtered_stderr(EXECUTORCH_NOISE):
        from executorch.extension.pybindings import portable_lib

    return portable_lib


def set_executorch_threads(threads: int) -> None:
    """Resize ExecuTorch's (process-wide) thread pool; a no-op without ExecuTorch. For processes that
    own their settings; library code uses :func:`executorch_threads`."""
    lib = _portable_lib()
    if lib is None:
        return
    with filtered_stderr(EXECUTORCH_NOISE):  # the pool's first use runs cpuinfo's probes
        if lib._threadpool_get_thread_count() != threads:
            lib._unsafe_reset_threadpool(threads)


@contextlib.contextmanager
def executorch_threads(threads: int) -> Iterator[None]:
    """ExecuTorch's thread pool at ``threads`` threads inside the block, its old size after it."""
    lib = _portable_lib()
    with filtered_stderr(EXECUTORCH_NOISE):  # the pool's first use runs cpuinfo's probes
        previous = lib._threadpool_get_thread_count() if lib is not None else None
    set_executorch_threads(threads)
    try:
        yield
    finally:
        if previous is not None:
            set_executorch_threads(previous)


class _DropLines(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextlib.contextmanager
def dropped_log_lines(name: str, prefixes: Sequence[str]) -> Iterator[None]:
    """Inside the block, the logger ``name`` drops records whose message starts with one of ``prefixes``
    (a third party's banner lines our own calls cause); every other record, and the logger after the
    block, are untouched."""
    drop = _DropLines(tuple(prefixes))
    logger = logging.getLogger(name)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def logger_levels(names: Sequence[str], level: int) -> Iterator[None]:
    """Set the named loggers (``""`` or ``"root"``: the root logger) to ``level`` inside the block only."""
    loggers = [logging.getLogger(None if n in ("", "root") else n) for n in names]
    previous = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(level)
        yield
    finally:
        for lg, old in zip(loggers, previous):
            lg.setLevel(old)
