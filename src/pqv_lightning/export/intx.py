"""int4 / int8 weights with int8 dynamic activations ("8da4w", "8da8w") on torchao, usable without a Trainer.

:func:`intx_layers` names the Linear layers an :class:`~.precisions.Int8DynamicIntxWeight` precision
quantizes, :func:`check_intx_groups` refuses a group size that a layer's width or XNNPACK cannot
take (naming the layer and the group sizes that would work), :func:`intx_config` is the torchao
config both post-training quantization and quantization-aware training (:mod:`.qat`) use, so the
two compute the same numbers, and :func:`quantize_intx_` applies it in place. ``export_mobile``
checks before it writes any file; the ``.pte`` target then quantizes a copy and lowers it to XNNPACK.

Example::

    model = create_vit("vit_test_tiny")
    precision = Int8DynamicInt4Weight(group_size=32)
    check_intx_groups(model, precision)
    names = quantize_intx_(model, precision)   # every Linear but the head: int4 weights
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .precisions import Int8DynamicIntxWeight

__all__ = ["XNNPACK_GROUP_MULTIPLE", "check_intx_groups", "intx_config", "intx_layers", "quantize_intx_"]

#: ExecuTorch's XNNPACK delegate takes int4 groups of a multiple of this many input channels
XNNPACK_GROUP_MULTIPLE = 32


def _kept_float(name: str, keep_float: tuple[str, ...]) -> bool:
    return any(name == k or name.startswith(k + ".") for k in keep_float)


def intx_layers(model: nn.Module, precision: Int8DynamicIntxWeight) -> dict[str, nn.Linear]:
    """The Linear layers ``precision`` quantizes: every one not named in (or inside) ``keep_float``."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not _kept_float(name, precision.keep_float)
    }


def check_intx_groups(model: nn.Module, precision: Int8DynamicIntxWeight) -> dict[str, nn.Linear]:
    """The layers to quantize, after checking that there are some and that ``group_size`` fits: for
    int4 a multiple of :data:`XNNPACK_GROUP_MULTIPLE` that divides each one's input width (or None);
    for int8 None (XNNPACK runs int8 weights with one scale per output channel only).

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
    if group is None:
        return layers
    if precision.weight_bits != 4:
        raise ConfigError(
            f"precision {precision.name!r}: group_size={group!r}, but ExecuTorch's XNNPACK runs "
            f"{precision.weight_bits}-bit weights with one scale per output channel only; use group_size=None"
        )
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


def intx_config(precision: Int8DynamicIntxWeight) -> Any:
    """torchao's ``Int8DynamicActivationIntxWeightConfig`` for ``precision``: int8 activations per token
    (asymmetric, chosen on each call), ``weight_bits``-bit symmetric weights per group or per channel."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    dtype = getattr(torch, f"int{precision.weight_bits}")  # torch 2.14 has int4; its type stubs do not
    granularity = PerAxis(0) if precision.group_size is None else PerGroup(precision.group_size)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)


def quantize_intx_(model: nn.Module, precision: Int8DynamicIntxWeight) -> list[str]:
    """Quantize ``model``'s Linear layers in place (after :func:`check_intx_groups`); returns the names
    of the quantized layers."""
    from torchao.quantization import quantize_

    layers = check_intx_groups(model, precision)
    chosen = {id(m) for m in layers.values()}
    quantize_(model, intx_config(precision), filter_fn=lambda module, fqn: id(module) in chosen)
    return list(layers)
