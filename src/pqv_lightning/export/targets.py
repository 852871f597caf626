"""Export targets: one class per file format, in a registry the exporter iterates over.

A target turns the fp32 reference model into a file at a given precision, loads that file back
with the runtime that will execute it on the device, and says how to measure its memory in a
fresh process. Everything around it (verification, latency, manifest, atomic writes) is shared
in :mod:`pqv_lightning.export.core`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["TARGETS", "Built", "ExportTarget", "Runner", "chunked", "register_target"]

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Built:
    """What a target reports about the file it wrote."""

    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    # the in-Python model the file should reproduce exactly (e.g. the pt2e-quantized graph); its
    # cosine against the file's outputs checks the lowering separately from the quantization error
    quantized_reference: Runner | None = None


class ExportTarget:
    """Base class. Subclasses set the class attributes and implement :meth:`write` and :meth:`load`."""

    format: ClassVar[str]
    suffix: ClassVar[str]
    extra: ClassVar[str | None] = None  # pip extra that installs the runtime
    requires: ClassVar[tuple[str, ...]] = ()  # importable modules it needs
    engine_dependent: ClassVar[bool] = False  # one file per torch quantized engine for int8
    memory_probe: ClassVar[str]  # python source; argv: path, shape "1,3,224,224", threads, engine or "-"

    def missing(self) -> str | None:
        """Why this target cannot run here (a missing package), or None."""
        absent = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if not absent:
            return None
        hint = f"pip install 'pqv-lightning[{self.extra}]'" if self.extra else f"install {absent}"
        return f"format {self.format!r} needs {absent}: {hint}"

    def write(self, reference: nn.Module, precision: str, engine: str, example: torch.Tensor,
              calibration: Sequence[torch.Tensor], path: str, options: dict[str, Any]) -> Built:
        raise NotImplementedError

    def load(self, path: str, example: torch.Tensor, threads: int) -> Runner:
        raise NotImplementedError


TARGETS: dict[str, ExportTarget] = {}


def register_target(cls: type[ExportTarget]) -> type[ExportTarget]:
    """Class decorator: make ``cls.format`` available to ``MobileExportConfig(formats=[...])``."""
    TARGETS[cls.format] = cls()
    return cls


def chunked(run: Runner, batch: int) -> Runner:
    """Run a fixed-batch program on any batch: split into chunks of ``batch`` rows, zero-pad the
    last one, drop the padding from the output."""

    def call(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for start in range(0, len(x), batch):
            part = x[start:start + batch]
            rows = len(part)
            if rows < batch:
                part = torch.cat([part, part.new_zeros((batch - rows, *part.shape[1:]))])
            outs.append(run(part.contiguous())[:rows])
        return torch.cat(outs)

    return call


# the memory probes share this prologue: reset the peak RSS, load, run 3 times, print before/peak
PROBE_HEAD = """
import sys, torch
torch.set_num_threads(int(sys.argv[3]))

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))

x = torch.randn(*[int(d) for d in sys.argv[2].split(",")])
"""
PROBE_RESET = """
with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
    fh.write("5")
before = status("VmRSS:")
"""
PROBE_TAIL = """
print(before, status("VmHWM:"))
"""
