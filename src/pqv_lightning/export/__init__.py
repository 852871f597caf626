"""Quantize and export models to ``.pte`` (ExecuTorch), ``.onnx`` and ``.ptl`` files; see :mod:`.core`."""

from .core import ENGINES, FORMATS, PRECISIONS, ExportFailedError, MobileExportConfig, check_output_dir, export_mobile, host_default_engine
from .delegation import make_delegation_friendly, register_delegation_swap
from .targets import TARGETS, ExportTarget, register_target

__all__ = [
    "ENGINES",
    "FORMATS",
    "PRECISIONS",
    "TARGETS",
    "ExportFailedError",
    "ExportTarget",
    "MobileExportConfig",
    "check_output_dir",
    "export_mobile",
    "host_default_engine",
    "make_delegation_friendly",
    "register_delegation_swap",
    "register_target",
]
