"""Quantize and export models to ``.pte`` (ExecuTorch), ``.onnx``, OpenVINO IR (``.xml`` + ``.bin``) and
``.ptl`` files, and name the fastest verified one on this host; see :mod:`.core`.

Extension points: :data:`TARGETS` (formats), :data:`PRECISIONS` (precision configs),
:data:`~.delegation.DELEGATION_SWAPS` (module swaps before ExecuTorch lowering). :func:`~.padding.pad_widths`
grows pruned widths to kernel-friendly multiples without changing the function.

Names are imported on first use (PEP 562): a latency worker (:mod:`.benchmark`) that only loads an
exported file imports neither timm nor Torch-Pruning."""

from __future__ import annotations

from .._lazy import lazy_names

#: public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        (
            "ENGINES",
            "RANKINGS",
            "ExportFailedError",
            "MobileExportConfig",
            "check_output_dir",
            "export_mobile",
            "host_default_engine",
            "rank_artifacts",
        ),
        ".core",
    ),
    **dict.fromkeys(("DELEGATION_SWAPS", "make_delegation_friendly", "register_delegation_swap"), ".delegation"),
    **dict.fromkeys(("WidthPaddingError", "pad_widths"), ".padding"),
    **dict.fromkeys(
        (
            "FP16",
            "FP32",
            "PRECISIONS",
            "Int8Dynamic",
            "Int8DynamicInt4Weight",
            "Int8DynamicInt8Weight",
            "Int8DynamicIntxWeight",
            "Int4Weight",
            "IntxWeights",
            "Int8Static",
            "Precision",
        ),
        ".precisions",
    ),
    **dict.fromkeys(
        (
            "QuantizationAwareTrainingConfig",
            "prepare_qat_",
            "qat_schemes",
            "set_activation_fake_quant_",
            "strip_fake_quant_",
        ),
        ".qat",
    ),
    **dict.fromkeys(("TARGETS", "Built", "ExportTarget", "PrecisionJob", "register_target"), ".targets"),
}

__all__ = sorted(_EXPORTS)

_lazy_getattr, __dir__ = lazy_names(__name__, globals(), _EXPORTS)


def __getattr__(attr: str):
    if attr == "FORMATS":  # the 0.1 tuple, now a live view of the registry
        from .targets import TARGETS

        return TARGETS.names()
    return _lazy_getattr(attr)
