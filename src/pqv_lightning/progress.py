"""Progress of long library work — the least-squares reconstruction of a pruning event, the files
of an export and their round-robin ranking — as a callback the library calls, and a terminal bar.

The library functions take ``progress(done, total, what)`` (None: silent); the callbacks pass
:func:`progress_bar`'s reporter, which draws a tqdm bar while stderr is a terminal and stays silent
in logs, CI and tests (the callbacks' own lines say what finished).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from tqdm import tqdm

__all__ = ["Progress", "progress_bar"]

#: ``progress(done, total, what)``: ``done`` of ``total`` steps finished, the last one named ``what``
Progress = Callable[[int, int, str], None]


def _silent(done: int, total: int, what: str) -> None:
    return None


@contextlib.contextmanager
def progress_bar(description: str, stream: TextIO | None = None, enabled: bool = True) -> Iterator[Progress]:
    """A reporter that draws a bar on ``stream`` (stderr) while it is a terminal and ``enabled``; a
    silent one otherwise. The bar is removed when the block ends."""
    stream = sys.stderr if stream is None else stream
    if not enabled or not stream.isatty():
        yield _silent
        return
    with tqdm(total=0, desc=description, file=stream, leave=False, dynamic_ncols=True) as bar:

        def report(done: int, total: int, what: str) -> None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(what, refresh=False)
            bar.refresh()

        yield report
