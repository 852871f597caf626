"""int4 weights with int8 dynamic activations ("8da4w") on torchao, usable without a Trainer.

:func:`int4_layers` names the Linear layers a :class:`~.precisions.Int8DynamicInt4Weight` precision
quantizes, :func:`check_int4_groups` refuses a group size that a layer's width or XNNPACK cannot
take (naming the layer and the group sizes that would work), and :func:`quantize_int4_` applies
torchao's ``Int8DynamicActivationIntxWeightConfig`` in place. ``export_mobile`` checks before it
writes any file; the ``.pte`` target then quantizes a copy and lowers it to XNNPACK.

Example::

    model = create_vit("vit_test_tiny")
    precision = Int8DynamicInt4Weight(group_size=32)
    check_int4_groups(model, precision)
    names = quantize_int4_(model, precision)   # every Linear but the head: int4 weights
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .precisions import Int8DynamicInt4Weight

__all__ = ["XNNPACK_GROUP_MULTIPLE", "check_int4_groups", "int4_layers", "quantize_int4_"]

#: ExecuTorch's XNNPACK delegate takes int4 groups of a multiple of this many input channels
XNNPACK_GROUP_MULTIPLE = 32


def _kept_float(name: str, keep_float: tuple[str, ...]) -> bool:
    return any(name == k or name.startswith(k + ".") for k in keep_float)


def int4_layers(model: nn.Module, precision: Int8DynamicInt4Weight) -> dict[str, nn.Linear]:
    """The Linear layers ``precision`` quantizes: every one not named in (or inside) ``keep_float``."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not _kept_float(name, precision.keep_float)
    }


def check_int4_groups(model: nn.Module, precision: Int8DynamicInt4Weight) -> dict[str, nn.Linear]:
    """The layers to quantize, after checking that there are some and that ``group_size`` divides each
    one's input width and is a multiple of :data:`XNNPACK_GROUP_MULTIPLE` (or is None).

    Raises:
        ConfigError: naming the precision, the layer, its width, and the group sizes that would work.
    """
    layers = int4_layers(model, precision)
    if not layers:
        raise ConfigError(
            f"precision {precision.name!r}: {type(model).__name__} has no Linear layer to quantize "
            f"(keep_float={list(precision.keep_float)} keeps {sum(isinstance(m, nn.Linear) for m in model.modules())} "
            "Linear layers fp32)"
        )
    group = precision.group_size
    if group is None:
        return layers
    widths = {name: m.in_features for name, m in layers.items()}
    common = math.gcd(*widths.values())
    working = [g for g in range(XNNPACK_GROUP_MULTIPLE, common + 1, XNNPACK_GROUP_MULTIPLE) if common % g == 0]
    hint = (
        f"group sizes that divide every quantized layer's input width and XNNPACK can run: {working}, "
        "or group_size=None (one scale per output channel)"
        if working
        else "no multiple of 32 divides every quantized layer's input width (their greatest common divisor is "
        f"{common}): use group_size=None (one scale per output channel)"
    )
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or group % XNNPACK_GROUP_MULTIPLE:
        raise ConfigError(
            f"precision {precision.name!r}: group_size={group!r} must be a multiple of {XNNPACK_GROUP_MULTIPLE} "
            f"(ExecuTorch's XNNPACK int4 kernels) or None; {hint}"
        )
    for name, width in widths.items():
        if width % group:
            raise ConfigError(
                f"precision {precision.name!r}: group_size={group} does not divide the input width {width} of "
                f"layer {name!r}; {hint}"
            )
    return layers


def quantize_int4_(model: nn.Module, precision: Int8DynamicInt4Weight) -> list[str]:
    """Quantize ``model``'s Linear layers in place (int4 weights in groups, int8 dynamic activations
    per token, symmetric weight scales); returns the names of the quantized layers."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    layers = check_int4_groups(model, precision)
    granularity = PerAxis(0) if precision.group_size is None else PerGroup(precision.group_size)
    int4 = getattr(torch, "int4")  # noqa: B009 - torch 2.14 has it; its type stubs do not
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, weight_granularity=granularity)
    chosen = {id(m) for m in layers.values()}
    quantize_(model, config, filter_fn=lambda module, fqn: id(module) in chosen)
    return list(layers)
