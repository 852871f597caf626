"""What a network returns, reduced to the logits tensor the library works on.

timm and torchvision classifiers return a tensor. Hugging Face ``transformers`` models return a
``ModelOutput`` (``.logits``, ``.loss``, ...). Export, verification and distillation need the logits
tensor: :func:`logits_of` reads it from either, :class:`LogitsOnly` wraps a network so that its
forward returns it (what gets exported), and :func:`tensor_module` picks the one a network needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["LogitsOnly", "logits_of", "main_tensor", "tensor_module"]


def logits_of(output: Any) -> torch.Tensor | None:
    """``output`` itself when it is a tensor, its ``logits`` tensor (a Hugging Face ``ModelOutput``, or a
    plain dict with a ``"logits"`` entry), or None."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def main_tensor(output: Any) -> torch.Tensor | None:
    """What a network's output is checked by: :func:`logits_of`, else a backbone's ``last_hidden_state``."""
    logits = logits_of(output)
    if logits is not None:
        return logits
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if isinstance(hidden, torch.Tensor) else None


class LogitsOnly(nn.Module):
    """``model(x).logits`` as a module whose forward takes the input tensor and returns the logits (the
    exported graph of a Hugging Face classifier)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = logits_of(self.model(x))
        assert logits is not None
        return logits


def tensor_module(model: nn.Module, output: Any, name: str = "model") -> nn.Module:
    """``model`` if its ``output`` is a tensor, :class:`LogitsOnly` around it if the output carries
    ``logits``; otherwise a :class:`ConfigError`."""
    if isinstance(output, torch.Tensor):
        return model
    if logits_of(output) is not None:
        return LogitsOnly(model)
    raise ConfigError(
        f"{name} returns a {type(output).__name__}; allowed: a logits tensor, or an output with a "
        "'logits' tensor (a Hugging Face ModelOutput, a dict with 'logits')"
    )
