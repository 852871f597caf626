"""Quantization-aware training on torchao's QAT flow, usable without a Trainer.

A QAT *scheme* is a registered :class:`~.precisions.Int8DynamicIntxWeight` precision
(``"int8-dynamic-int4-weight"``, ``"int8-dynamic-int8-weight"``, or one a user registers):
:func:`prepare_qat_` swaps the Linear layers that precision quantizes for torchao's
``FakeQuantizedLinear`` (the same Parameter objects, so an optimizer built before keeps working),
whose forward rounds weights (and int8 activations per token) exactly as the precision's
post-training quantization will. After training, :func:`strip_fake_quant_` swaps them back to plain
``nn.Linear`` and describes what was trained; quantizing that float model with the same precision
(``export_mobile`` does) gives the fake-quantized model's outputs exactly.

Example::

    model = create_vit("vit_test_tiny")
    prepare_qat_(model, "int8-dynamic-int4-weight")   # fake-quantized Linear layers
    train(model)                                        # any loop; torch.optim sees the same parameters
    trained = strip_fake_quant_(model)                  # plain Linear layers again, and what was trained
    export_mobile(model, example, MobileExportConfig(precisions=["int8-dynamic-int4-weight"], formats=["pte"]))

(``export_mobile`` also accepts the fake-quantized model itself and strips a copy.)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..checks import check_bool, check_int
from ..errors import ConfigError
from .intx import check_intx_groups, intx_config, intx_layers
from .precisions import PRECISIONS, Int8DynamicIntxWeight, Precision

__all__ = [
    "QuantizationAwareTrainingConfig",
    "describe_fake_quant",
    "fake_quantized_layers",
    "matching_precisions",
    "prepare_qat_",
    "qat_schemes",
    "resolve_scheme",
    "set_activation_fake_quant_",
    "strip_fake_quant_",
]


def qat_schemes() -> list[str]:
    """The registered precisions QAT can train for (every :class:`Int8DynamicIntxWeight`)."""
    return [name for name in PRECISIONS if isinstance(PRECISIONS[name], Int8DynamicIntxWeight)]


def resolve_scheme(scheme: str | Precision) -> Int8DynamicIntxWeight:
    """The precision a QAT scheme names.

    Raises:
        ConfigError: an unknown name, or a precision QAT cannot train for (naming the ones it can).
    """
    if isinstance(scheme, str) and scheme not in PRECISIONS:
        raise ConfigError(f"unknown QAT scheme {scheme!r}; allowed: {qat_schemes()}")
    precision = PRECISIONS[scheme] if isinstance(scheme, str) else scheme
    if not isinstance(precision, Int8DynamicIntxWeight):
        name = getattr(precision, "name", precision)
        raise ConfigError(
            f"QAT scheme {name!r} is not one QAT can train for (int8 dynamic activations with int4 or int8 "
            f"weights); allowed: {qat_schemes()}"
        )
    return precision


@dataclass(frozen=True)
class QuantizationAwareTrainingConfig:
    """When and for what :class:`~pqv_lightning.QuantizationAwareTraining` fake-quantizes (the callback
    is built from it).

    Args:
        scheme: the precision the network trains for, one of :func:`qat_schemes`
            (``"int8-dynamic-int4-weight"``: int4 weights in groups of 32, int8 activations per
            token; ``"int8-dynamic-int8-weight"``: int8 weights per channel). ``MobileExport`` in the
            same Trainer must export that precision.
        start_step: fake quantization begins at the first batch of an optimizer step ``>= start_step``.
        start_epoch: ... or at the first batch of epoch ``start_epoch`` (not both). Neither: at the
            start of training, or right after ``StructuredPruning``'s last event when it is in the
            Trainer (a start before that event is refused: the shapes are not final).
        activation_delay_steps: optimizer steps after the start during which only the weights are
            fake-quantized (activations follow; 0: both at once).
    """

    scheme: str = "int8-dynamic-int4-weight"
    start_step: int | None = None
    start_epoch: int | None = None
    activation_delay_steps: int = 0

    def validate(self) -> Int8DynamicIntxWeight:
        """Check every option; returns the scheme's precision."""
        precision = resolve_scheme(self.scheme)
        if self.start_step is not None:
            check_int("start_step", self.start_step, minimum=0)
        if self.start_epoch is not None:
            check_int("start_epoch", self.start_epoch, minimum=0)
        if self.start_step is not None and self.start_epoch is not None:
            raise ConfigError(
                f"start_step={self.start_step} and start_epoch={self.start_epoch}: give one of them, or neither"
            )
        check_int("activation_delay_steps", self.activation_delay_steps, minimum=0)
        return precision


def _fake_quantized_linear() -> type | None:
    # a model can only hold torchao's fake-quantized layers once torchao's QAT module is imported
    module = sys.modules.get("torchao.quantization.qat.linear")
    return getattr(module, "FakeQuantizedLinear", None)


def fake_quantized_layers(model: nn.Module) -> dict[str, Any]:
    """name -> torchao ``FakeQuantizedLinear`` layer of ``model`` (empty when it has none)."""
    cls = _fake_quantized_linear()
    if cls is None:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def prepare_qat_(model: nn.Module, scheme: str | Precision) -> list[str]:
    """Fake-quantize, in place, the Linear layers ``scheme`` quantizes (``keep_float`` ones stay plain);
    returns their names. The layers keep their Parameter objects and state-dict keys.

    Raises:
        ConfigError: an unknown scheme, a model already fake-quantized, no Linear layer to quantize,
            or a group size a layer's width or XNNPACK cannot take (naming the layer and what works).
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    precision = resolve_scheme(scheme)
    already = fake_quantized_layers(model)
    if already:
        raise ConfigError(
            f"the model is fake-quantized already ({len(already)} layers, e.g. {next(iter(already))!r}); "
            "strip_fake_quant_ it first"
        )
    layers = check_intx_groups(model, precision)
    chosen = {id(m) for m in layers.values()}
    quantize_(model, QATConfig(intx_config(precision), step="prepare"), filter_fn=lambda m, fqn: id(m) in chosen)
    return list(layers)


def set_activation_fake_quant_(model: nn.Module, enabled: bool) -> int:
    """Turn the activation fake quantizers of ``model``'s fake-quantized layers on or off; returns how many."""
    check_bool("enabled", enabled)
    count = 0
    for layer in fake_quantized_layers(model).values():
        quantizer = getattr(layer, "activation_fake_quantizer", None)
        if quantizer is not None:
            quantizer.enabled = enabled
            count += 1
    return count


def _describe(layers: dict[str, Any]) -> dict[str, Any]:
    from torchao.quantization.granularity import PerGroup

    bits, groups, activations = set(), set(), set()
    for layer in layers.values():
        weight = layer.weight_fake_quantizer.config
        bits.add(int(str(weight.dtype).removeprefix("torch.int")))
        groups.add(weight.granularity.group_size if isinstance(weight.granularity, PerGroup) else None)
        quantizer = getattr(layer, "activation_fake_quantizer", None)
        activations.add(quantizer is not None and bool(quantizer.enabled))
    if len(bits) != 1 or len(groups) != 1 or len(activations) != 1:
        raise ConfigError(
            f"the fake-quantized layers mix schemes (weight bits {sorted(bits)}, groups {sorted(groups, key=str)}, "
            f"activations fake-quantized {sorted(activations)}); one scheme per model is supported"
        )
    return {
        "weight_bits": bits.pop(),
        "group_size": groups.pop(),
        "activations": activations.pop(),
        "layers": sorted(layers),
    }


def describe_fake_quant(model: nn.Module) -> dict[str, Any] | None:
    """What ``model``'s fake-quantized layers compute — ``weight_bits``, ``group_size``, ``activations``
    (on or off now), the ``layers`` — or None when it has none."""
    layers = fake_quantized_layers(model)
    return _describe(layers) if layers else None


def strip_fake_quant_(model: nn.Module) -> dict[str, Any] | None:
    """Swap every fake-quantized layer of ``model`` back to a plain ``nn.Linear`` (the same Parameter
    objects), in place; returns what was trained — ``weight_bits``, ``group_size``, ``activations``
    (whether activations were fake-quantized) and the ``layers`` — or None when there was nothing
    to strip."""
    layers = fake_quantized_layers(model)
    if not layers:
        return None
    if "" in layers:
        raise ConfigError("strip_fake_quant_ needs a model that contains the fake-quantized layers, not one layer")
    description = _describe(layers)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.to_linear())
    return description


def matching_precisions(model: nn.Module, trained: dict[str, Any], precisions: list[Precision]) -> list[str]:
    """The names of ``precisions`` that compute what the QAT network computed: same weight bits and
    group, activations fake-quantized, and the same layers quantized (``model``: the stripped network)."""
    return [
        p.name
        for p in precisions
        if isinstance(p, Int8DynamicIntxWeight)
        and p.weight_bits == trained["weight_bits"]
        and p.group_size == trained["group_size"]
        and trained["activations"]
        and sorted(intx_layers(model, p)) == trained["layers"]
    ]
