"""int4 / int8 weights (:class:`~.precisions.IntxWeights`: with int8 dynamic activations, "8da4w" /
"8da8w", or weight-only int4), usable without a Trainer.

:func:`intx_layers` names the Linear layers such a precision quantizes, :func:`check_intx_groups`
refuses a group size that a layer's width or the runtime (a :class:`GroupRule`) cannot take (naming
the layer and the group sizes that would work), :func:`intx_config` is the torchao config both
post-training quantization and quantization-aware training (:mod:`.qat`) use, so the two compute the
same numbers, and :func:`quantize_intx_` applies it in place. ``export_mobile`` checks before it
writes any file (each target with its runtime's rule); the ``.pte`` target then quantizes a copy and
lowers it to XNNPACK, ``.onnx`` and ``openvino`` compress the weights of their own graphs.

Example::

    model = create_vit("vit_test_tiny")
    precision = Int8DynamicInt4Weight(group_size=32)
    check_intx_groups(model, precision)
    names = quantize_intx_(model, precision)   # every Linear but the head: int4 weights
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .precisions import Int8DynamicIntxWeight, IntxWeights

__all__ = [
    "MATMULNBITS_GROUPS",
    "NNCF_GROUPS",
    "XNNPACK_GROUPS",
    "XNNPACK_GROUP_MULTIPLE",
    "GroupRule",
    "check_intx_groups",
    "intx_config",
    "intx_layers",
    "quantize_intx_",
]

#: ExecuTorch's XNNPACK delegate takes int4 groups of a multiple of this many input channels
XNNPACK_GROUP_MULTIPLE = 32


@dataclass(frozen=True)
class GroupRule:
    """The weight group sizes a runtime's kernels take: a multiple of ``multiple``, a power of two when
    ``power_of_two``, at least ``minimum``; ``per_channel``: whether ``group_size=None`` (one scale per
    output channel) is allowed; ``grouped_bits``: the weight widths that may be grouped at all."""

    runtime: str
    multiple: int = 1
    power_of_two: bool = False
    minimum: int = 1
    per_channel: bool = True
    grouped_bits: tuple[int, ...] = (4,)

    def allows(self, group: int) -> bool:
        return (
            group >= self.minimum and group % self.multiple == 0 and (not self.power_of_two or group & (group - 1) == 0)
        )

    def describe(self) -> str:
        parts = [f"a multiple of {self.multiple}"] if self.multiple > 1 else []
        parts += ["a power of two"] if self.power_of_two else []
        parts += [f"at least {self.minimum}"] if self.minimum > 1 else []
        return " and ".join(parts) or "any size"


XNNPACK_GROUPS = GroupRule("ExecuTorch's XNNPACK delegate", multiple=XNNPACK_GROUP_MULTIPLE)
MATMULNBITS_GROUPS = GroupRule("ONNX Runtime's MatMulNBits", power_of_two=True, minimum=16, per_channel=False)
NNCF_GROUPS = GroupRule("OpenVINO's int4 weight compression (NNCF)")


def _kept_float(name: str, keep_float: tuple[str, ...]) -> bool:
    return any(name == k or name.startswith(k + ".") for k in keep_float)


def intx_layers(model: nn.Module, precision: IntxWeights) -> dict[str, nn.Linear]:
    """The Linear layers ``precision`` quantizes: every one not named in (or inside) ``keep_float``."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not _kept_float(name, precision.keep_float)
    }


def check_intx_groups(
    model: nn.Module, precision: IntxWeights, rule: GroupRule = XNNPACK_GROUPS
) -> dict[str, nn.Linear]:
    """The layers to quantize, after checking that there are some and that ``group_size`` fits each
    one's input width and ``rule`` (the runtime's kernels; default: XNNPACK's, int4 groups of a
    multiple of 32, int8 weights per channel only).

    Raises:
        ConfigError: naming the precision, the layer, its width, and the group sizes that would work.
    """
    layers = intx_layers(model, precision)
    if not layers:
        raise ConfigError(
            f"precision {precision.name!r}: {type(model).__name__} has no Linear layer to quantize "
            f"(keep_float={list(precision.keep_float)} keeps {sum(isinstance(m, nn.Linear) for m in model.modules())} "
            "Linear layers fp32)"
        )
    group = precision.group_size
    widths = {name: m.in_features for name, m in layers.items()}
    common = math.gcd(*widths.values())
    shown_from = max(rule.minimum, rule.multiple, 8)
    working = [g for g in range(shown_from, common + 1) if common % g == 0 and rule.allows(g)]
    hint = (
        f"group sizes that divide every quantized layer's input width and {rule.runtime} can run: {working}"
        + (", or group_size=None (one scale per output channel)" if rule.per_channel else "")
        if working
        else f"no group size {rule.runtime} can run ({rule.describe()}) divides every quantized layer's input "
        f"width (their greatest common divisor is {common})"
        + (": use group_size=None (one scale per output channel)" if rule.per_channel else "")
    )
    if group is None:
        if not rule.per_channel:
            raise ConfigError(
                f"precision {precision.name!r}: group_size=None (one scale per output channel), but "
                f"{rule.runtime} quantizes in groups only; {hint}"
            )
        return layers
    if precision.weight_bits not in rule.grouped_bits:
        raise ConfigError(
            f"precision {precision.name!r}: group_size={group!r}, but {rule.runtime} runs "
            f"{precision.weight_bits}-bit weights with one scale per output channel only; use group_size=None"
        )
    if isinstance(group, bool) or not isinstance(group, int) or not rule.allows(group):
        raise ConfigError(
            f"precision {precision.name!r}: group_size={group!r} must be {rule.describe()} ({rule.runtime})"
            + (" or None" if rule.per_channel else "")
            + f"; {hint}"
        )
    for name, width in widths.items():
        if width % group:
            raise ConfigError(
                f"precision {precision.name!r}: group_size={group} does not divide the input width {width} of "
                f"layer {name!r}; {hint}"
            )
    return layers


def intx_config(precision: IntxWeights) -> Any:
    """torchao's config for ``precision``: ``Int8DynamicActivationIntxWeightConfig`` (int8 activations
    per token, asymmetric, chosen on each call) for an :class:`Int8DynamicIntxWeight`, else
    ``IntxWeightOnlyConfig``; ``weight_bits``-bit symmetric weights per group or per channel."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    dtype = getattr(torch, f"int{precision.weight_bits}")  # torch 2.14 has int4; its type stubs do not
    granularity = PerAxis(0) if precision.group_size is None else PerGroup(precision.group_size)
    if isinstance(precision, Int8DynamicIntxWeight):
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


def quantize_intx_(model: nn.Module, precision: IntxWeights) -> list[str]:
    """Quantize ``model``'s Linear layers in place (after :func:`check_intx_groups`); returns the names
    of the quantized layers."""
    from torchao.quantization import quantize_

    layers = check_intx_groups(model, precision)
    chosen = {id(m) for m in layers.values()}
    quantize_(model, intx_config(precision), filter_fn=lambda module, fqn: id(module) in chosen)
    return list(layers)
