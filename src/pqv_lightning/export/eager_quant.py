"""Eager dynamic quantization of Linear layers (``torch.ao``'s ``quantize_dynamic``) that leaves alone the
Linear layers a model cannot run quantized.

``quantize_dynamic`` swaps every ``nn.Linear`` for a dynamically quantized one whose ``weight`` is a
method, not a tensor. A parent that reads its child's weight itself — BEiT's and EVA's attention call
``F.linear(x, weight=self.qkv.weight, bias=qkv_bias)`` to add their separate q/v biases — then fails
(``linear(): argument 'weight' must be Tensor, not method``). Such layers are found by reading the
parent's ``forward`` source for ``self.<child>.weight`` / ``.bias`` and stay fp32; the others are
quantized as before. Used by the ``.ptl`` int8-dynamic / fp16 exports and the int8 KD teacher.
"""

from __future__ import annotations

import functools
import inspect
import re

import torch
from torch import nn

__all__ = ["linears_read_directly", "quantize_linears_dynamic"]


@functools.cache
def _forward_source(cls: type[nn.Module]) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def linears_read_directly(model: nn.Module) -> list[str]:
    """Dotted names of the Linear layers whose parent's ``forward`` reads their ``weight`` or ``bias``."""
    found = []
    for parent_name, parent in model.named_modules():
        source = _forward_source(type(parent))  # type: ignore[arg-type]  # a class is hashable
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and re.search(rf"\bself\.{re.escape(name)}\.(weight|bias)\b", source):
                found.append(f"{parent_name}.{name}" if parent_name else name)
    return found


def quantize_linears_dynamic(
    model: nn.Module, dtype: torch.dtype = torch.qint8, per_channel: bool = False
) -> nn.Module:
    """``quantize_dynamic`` of every Linear layer except :func:`linears_read_directly` (``qint8`` or
    ``float16`` weights, ``torch.ao``'s dynamic qconfig for that type; ``qint8`` with one weight scale
    per output channel when ``per_channel``, else per tensor)."""
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        float16_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    if dtype == torch.float16:
        qconfig = float16_dynamic_qconfig
    else:
        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    keep = set(linears_read_directly(model))
    spec = {name: qconfig for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in keep}
    return quantize_dynamic(model, spec, dtype=dtype)
