"""Quantize and export models to ``.pte`` (ExecuTorch), ``.onnx``, OpenVINO IR (``.xml`` + ``.bin``) and
``.ptl`` files, and name the fastest verified one on this host; see :mod:`.core`.

Extension points: :data:`TARGETS` (formats), :data:`PRECISIONS` (precision configs),
:data:`~.delegation.DELEGATION_SWAPS` (module swaps before ExecuTorch lowering). :func:`~.padding.pad_widths`
grows pruned widths to kernel-friendly multiples without changing the function."""

from .core import (
    ENGINES,
    RANKINGS,
    ExportFailedError,
    MobileExportConfig,
    check_output_dir,
    export_mobile,
    host_default_engine,
    rank_artifacts,
)
from .delegation import DELEGATION_SWAPS, make_delegation_friendly, register_delegation_swap
from .padding import WidthPaddingError, pad_widths
from .precisions import FP16, FP32, PRECISIONS, Int8Dynamic, Int8Static, Precision
from .targets import TARGETS, Built, ExportTarget, register_target

__all__ = [
    "Built",
    "DELEGATION_SWAPS",
    "ENGINES",
    "FP16",
    "FP32",
    "Int8Dynamic",
    "Int8Static",
    "PRECISIONS",
    "Precision",
    "RANKINGS",
    "TARGETS",
    "WidthPaddingError",
    "ExportFailedError",
    "ExportTarget",
    "MobileExportConfig",
    "check_output_dir",
    "export_mobile",
    "host_default_engine",
    "make_delegation_friendly",
    "pad_widths",
    "rank_artifacts",
    "register_delegation_swap",
    "register_target",
]


def __getattr__(attr: str):
    if attr == "FORMATS":  # the 0.1 tuple, now a live view of the registry
        return TARGETS.names()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
