"""A build worker of :func:`~.core.export_mobile`: ``python -m pqv_lightning.export.build_worker
CONTEXT THREADS MODULES``.

It loads the build context (``torch.save``'d by the parent: the model, its padded copies, the
example, calibration and verification batches, the config), says ``{"ready": true}``, then answers
each stdin line ``[format, precision, engine]`` with the JSON entry of :func:`~.core._build_one`
(the file written and verified under a temporary name, or skipped with the reason) until its stdin
closes. ``MODULES``: comma-separated modules that register the user's export targets (``-``: none).
Its stdout is the reply channel only: whatever a runtime prints goes to stderr.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys

import torch

from ..settings import executorch_threads
from .core import _build_one


def _main(argv: list[str]) -> None:
    path, threads_arg, modules = argv
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # a runtime's prints (C++ or Python) cannot corrupt a reply
    sys.stdout = sys.stderr
    for module in modules.split(",") if modules != "-" else []:
        importlib.import_module(module)
    threads = int(threads_arg)
    torch.set_num_threads(threads)  # this process exists to build files: its settings are set for good
    ctx = torch.load(path, weights_only=False)
    with contextlib.ExitStack() as settings:
        if "pte" in ctx.config.formats:
            settings.enter_context(executorch_threads(threads))
        print(json.dumps({"ready": True}), file=replies, flush=True)
        for line in sys.stdin:
            fmt, precision, engine = json.loads(line)
            entry = _build_one(ctx, fmt, precision, engine, threads, raise_on_failure=False)
            print(json.dumps(entry), file=replies, flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
