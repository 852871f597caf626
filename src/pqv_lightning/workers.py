"""Worker processes that answer JSON lines: the round-robin timing workers and the export's build
workers are both ``python -m <module> ARGS...`` processes that read one request per stdin line and
write one JSON reply per stdout line (the first one when they are ready).

A worker is a plain subprocess, not :mod:`multiprocessing`: a user's script without an
``if __name__ == "__main__"`` guard is never re-run in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

__all__ = ["LineWorker", "WorkerFailed", "wait_readable"]


class WorkerFailed(RuntimeError):
    """A worker exited, or stayed silent past its timeout, instead of answering."""


class LineWorker:
    """``python -m module *args`` with the parent's ``sys.path``; :meth:`request` writes one line and
    returns the JSON reply, :meth:`reply` reads one without writing. stderr goes to a temporary file
    (a chatty runtime cannot block on a full pipe) whose last line names a failure."""

    def __init__(self, module: str, args: Sequence[str], label: str) -> None:
        self.label = label
        # the parent's sys.path, so that modules it imported from a script's folder import in the worker too
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )

    @property
    def stdout(self):
        return self._proc.stdout

    def send(self, line: str) -> None:
        """Write one request line (a dead worker is reported by the next :meth:`reply`)."""
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, OSError):
            self._proc.stdin.write(line.rstrip("\n") + "\n")
            self._proc.stdin.flush()

    def request(self, line: str, timeout: float | None = None) -> dict[str, Any]:
        self.send(line)
        return self.reply(timeout)

    def reply(self, timeout: float | None = None) -> dict[str, Any]:
        """The next JSON line; :class:`WorkerFailed` (with the worker's last stderr line) when it exits
        or stays silent for ``timeout`` seconds (None: waits as long as it lives)."""
        assert self._proc.stdout is not None
        if timeout is not None and not wait_readable([self], timeout):
            self._proc.kill()
            self._proc.wait()
            raise WorkerFailed(f"{self.label}: no answer within {timeout:.0f} s")
        try:
            line = self._proc.stdout.readline()
        except OSError:
            line = ""
        if not line.strip():
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            raise WorkerFailed(f"{self.label} failed: {self.last_error()}")
        return json.loads(line)

    def last_error(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().strip().splitlines()
        return lines[-1] if lines else f"exit {self._proc.returncode}"

    def close(self) -> None:
        """Close its stdin (a worker exits when its requests end) and wait; kill it after 60 s."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()

    def kill(self) -> None:
        self._proc.kill()
        self.close()


def wait_readable(workers: Sequence[LineWorker], timeout: float | None = None) -> list[LineWorker]:
    """The workers with a reply (or an exit) to read, waiting up to ``timeout`` s (None: until one has)."""
    with selectors.DefaultSelector() as sel:
        for w in workers:
            sel.register(w.stdout, selectors.EVENT_READ, w)
        return [key.data for key, _ in sel.select(timeout)]
