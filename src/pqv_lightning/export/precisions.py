"""Precisions as config objects, in the spirit of torchao's ``quantize_(model, Config())``.

A precision says *what* to do (``Int8Static(per_channel=True)``); each export target says *how* it
does it for its runtime, with one handler per config class registered by
:meth:`~pqv_lightning.export.targets.ExportTarget.handles`. Users name precisions by string
(``MobileExportConfig(precisions=["fp32", "int8-dynamic"])``, YAML, CLI); the strings are the keys
of :data:`PRECISIONS`.

Adding a precision (e.g. int8 weights without per-channel scales)::

    from pqv_lightning.export.precisions import PRECISIONS, Int8Dynamic

    PRECISIONS.register("int8-dynamic-per-tensor", Int8Dynamic(name="int8-dynamic-per-tensor", per_channel=False))

Every target whose handler is registered for :class:`Int8Dynamic` (or a base class) now exports it;
a new config *class* needs a handler in each target that should support it (targets without one
mark the artifact ``skipped`` and say so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..registry import Registry

__all__ = [
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
    "resolve_precision",
]


@dataclass(frozen=True)
class Precision:
    """Base class. ``name`` is the string users write; class attributes describe the family."""

    name: str
    #: int8 kernels differ per torch quantized engine (``.ptl`` writes one file per engine)
    engine_dependent: ClassVar[bool] = False
    #: needs calibration batches (activation ranges)
    needs_calibration: ClassVar[bool] = False
    #: where the precision runs, for the error of a format that has no handler for it ("" : no note)
    runs_on: ClassVar[str] = ""


@dataclass(frozen=True)
class FP32(Precision):
    """The model as trained."""

    name: str = "fp32"


@dataclass(frozen=True)
class FP16(Precision):
    """Half-precision weights and compute; inputs and outputs stay fp32."""

    name: str = "fp16"


@dataclass(frozen=True)
class Int8Dynamic(Precision):
    """int8 weights (Linear layers), activations quantized per call. ``per_channel``: one weight scale
    per output channel (``.pte``, ``.onnx``; ``.ptl`` uses torch.ao's per-tensor dynamic kernels).
    ``attention_matmuls``: also run the attention products ``q @ k.T`` and ``attn @ v`` as int8
    matmuls of two activations quantized per call (the softmax between them stays float); only
    ``.onnx`` can (ExecuTorch's XNNPACK delegate runs ``bmm`` in fp32 only, torch.ao and OpenVINO's
    dynamic quantization cover Linear layers only): registered as ``int8-dynamic-attention``."""

    name: str = "int8-dynamic"
    per_channel: bool = True
    attention_matmuls: bool = False
    engine_dependent: ClassVar[bool] = True


@dataclass(frozen=True)
class Int8Static(Precision):
    """int8 weights and activations, activation ranges calibrated on data. ``per_channel``: one weight
    scale per output channel (``.pte``, ``.onnx``; ``.ptl`` uses the engine's default qconfig)."""

    name: str = "int8-static"
    per_channel: bool = True
    engine_dependent: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True


@dataclass(frozen=True)
class IntxWeights(Precision):
    """Base class: integer weights of ``weight_bits`` bits in the Linear layers, one symmetric scale per
    ``group_size`` input channels (``None``: one per output channel). Linear layers named
    ``keep_float`` (or inside a module of that name) stay fp32: the classifier ``head`` by default (few
    outputs that decide the top-1, a small share of the weights). The patch embedding is a convolution
    and stays fp32. :mod:`.intx` has the pure functions."""

    name: str = ""
    group_size: int | None = None
    keep_float: tuple[str, ...] = ("head",)
    weight_bits: ClassVar[int] = 0


@dataclass(frozen=True)
class Int8DynamicIntxWeight(IntxWeights):
    """Integer weights and int8 activations quantized per token on each call (torchao's
    ``Int8DynamicActivationIntxWeightConfig``). Only ``.pte`` runs them;
    :class:`~pqv_lightning.QuantizationAwareTraining` trains for exactly these numerics (:mod:`.qat`).
    Use a subclass: :class:`Int8DynamicInt4Weight` or :class:`Int8DynamicInt8Weight`."""

    runs_on: ClassVar[str] = (
        "int4 and int8 weights with int8 per-token activations (torchao) run in ExecuTorch's XNNPACK delegate "
        "(format 'pte'); for ONNX Runtime and OpenVINO use 'int4-weight' (int4 weights, float activations)"
    )


@dataclass(frozen=True)
class Int8DynamicInt4Weight(Int8DynamicIntxWeight):
    """int4 weights, int8 dynamic activations ("8da4w"). ``group_size`` must be a multiple of 32 that
    divides every quantized layer's input width (XNNPACK's blockwise kernels), or ``None``."""

    name: str = "int8-dynamic-int4-weight"
    group_size: int | None = 32
    weight_bits: ClassVar[int] = 4


@dataclass(frozen=True)
class Int8DynamicInt8Weight(Int8DynamicIntxWeight):
    """int8 weights with one scale per output channel, int8 dynamic activations per token ("8da8w",
    torchao's numerics: the scheme :class:`~pqv_lightning.QuantizationAwareTraining` trains for int8;
    ``int8-dynamic`` is the pt2e XNNPACKQuantizer's own flavour). XNNPACK takes no int8 weight groups:
    ``group_size`` must stay ``None``."""

    name: str = "int8-dynamic-int8-weight"
    group_size: int | None = None
    weight_bits: ClassVar[int] = 8


@dataclass(frozen=True)
class Int4Weight(IntxWeights):
    """int4 weights, activations left float ("weight-only"): the weights are stored in 4 bits and
    expanded for a float GEMM. ``.onnx``: ONNX Runtime's ``MatMulNBits`` (``group_size`` a power of
    two >= 16); ``openvino``: NNCF ``compress_weights(INT4_SYM)``, run with fp32 activations. Not
    ``.pte``: ExecuTorch 1.5.1 lowers torchao's ``IntxWeightOnlyConfig`` to XNNPACK into a file that
    is no smaller and disagrees with the torchao model (cosine 0.30-0.50 on a tiny ViT); use
    ``int8-dynamic-int4-weight`` there. In ``.onnx`` a Linear the exporter writes as a ``Gemm`` node
    (one with 2-D input: the classifier on the pooled token) stays fp32 whatever ``keep_float`` says:
    ``MatMulNBits`` replaces ``MatMul`` nodes only. Saves file size and memory; at batch 1 a ViT's
    Linear layers are not memory-bound, so it is not expected to be faster."""

    name: str = "int4-weight"
    group_size: int | None = 32
    weight_bits: ClassVar[int] = 4
    runs_on: ClassVar[str] = (
        "int4 weight-only runs in formats 'onnx' (MatMulNBits) and 'openvino' (NNCF); ExecuTorch 1.5.1's XNNPACK "
        "lowering of it disagrees with the torchao model, so 'pte' takes 'int8-dynamic-int4-weight' instead"
    )


#: name -> :class:`Precision` config; what ``precisions=[...]`` accepts everywhere.
PRECISIONS: Registry[Precision] = Registry("precision", argument="precisions")
for _config in (
    FP32(),
    FP16(),
    Int8Dynamic(),
    Int8Static(),
    Int8Dynamic(name="int8-dynamic-attention", attention_matmuls=True),
    Int8DynamicInt4Weight(),
    Int8DynamicInt8Weight(),
    Int4Weight(),
):
    PRECISIONS.register(_config.name, _config)


def resolve_precision(precision: str | Precision) -> Precision:
    """The config object for a registered name (a config object is returned as is).

    Raises:
        ConfigError: an unregistered name.
    """
    return precision if isinstance(precision, Precision) else PRECISIONS[precision]
