"""Export-time module swaps that let ExecuTorch's XNNPACK delegate take a whole ViT.

ExecuTorch 1.5 lowers a stock timm ViT into ~62 XNNPACK partitions: ``native_layer_norm`` has no
XNNPACK kernel, and ``F.scaled_dot_product_attention`` decomposes into mask-handling ops
(``eq``, ``full_like``, ``logical_not``, ``any``, ``where``) that are not delegated either. Every
partition boundary costs a round trip through the portable CPU kernels, which is why such a
``.pte`` runs slower than torch eager on x86.

The swaps here compute the same function with ops XNNPACK does take (``linear``, ``bmm``,
``softmax``, ``permute``, ``slice``, ``view``, elementwise arithmetic and ``rsqrt``):

* :class:`DelegatableLayerNorm`: the two means of a LayerNorm as ``linear`` with a constant
  ``1/d`` row, then ``(x - mean) * rsqrt(var + eps) * weight + bias``;
* :class:`DelegatableAttention`: timm's ``Attention`` with the q/k/v split done by slicing and the
  attention as two ``bmm`` and a ``softmax`` (no mask handling: it refuses masks);
* :class:`Fp32LayerNorm`: runs a LayerNorm in fp32 inside an fp16 model (ExecuTorch 1.5.1
  computes fp16 LayerNorm wrongly for widths >= 256 on x86).

They share the original parameters, differ from the original output only by float rounding
(checked in the tests), and are applied to a copy of the model by the exporter, never to the
user's module. :func:`register_delegation_swap` adds swaps for other module types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry

__all__ = [
    "DELEGATION_SWAPS",
    "DelegationSwap",
    "DelegatableAttention",
    "DelegatableLayerNorm",
    "Fp32LayerNorm",
    "make_delegation_friendly",
    "register_delegation_swap",
    "keep_layernorm_fp32",
]


@dataclass(frozen=True)
class DelegationSwap:
    """Replace every module of exactly one of ``module_types`` by ``build(module)`` (exact types: a
    subclass may compute something else, so it needs its own entry)."""

    module_types: tuple[type, ...]
    build: Callable[[nn.Module], nn.Module]


#: name -> :class:`DelegationSwap`; applied by :func:`make_delegation_friendly` before ExecuTorch lowering.
DELEGATION_SWAPS: Registry[DelegationSwap] = Registry(
    "delegation swap", types=lambda swap: swap.module_types, mro=False
)


def register_delegation_swap(module_type: type, name: str | None = None) -> Callable:
    """Decorator: ``fn(module) -> replacement`` is applied to every module of exactly ``module_type``
    (registered in :data:`DELEGATION_SWAPS` under ``name``, default the type's qualified name)."""

    def wrap(fn: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
        DELEGATION_SWAPS.register(
            name or f"{module_type.__module__}.{module_type.__qualname__}",
            DelegationSwap((module_type,), fn),
            overwrite=True,
        )
        return fn

    return wrap


class DelegatableLayerNorm(nn.Module):
    """LayerNorm over the last dimension written with XNNPACK-delegatable ops."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        if len(norm.normalized_shape) != 1:
            raise ValueError(
                f"normalized_shape={tuple(norm.normalized_shape)}: only last-dimension LayerNorm is supported"
            )
        width = norm.normalized_shape[0]
        self.width, self.eps = width, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        ref = norm.weight if norm.weight is not None else torch.empty(0)
        self.register_buffer(
            "mean_row", torch.full((1, width), 1.0 / width, dtype=ref.dtype, device=ref.device), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centered = x - F.linear(x, self.mean_row)
        var = F.linear(centered * centered, self.mean_row)
        y = centered * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.width}, eps={self.eps}"


class Fp32LayerNorm(nn.Module):
    """Run ``norm`` in fp32 whatever the dtype of its input; cast the result back."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


class DelegatableAttention(nn.Module):
    """timm ``Attention`` (self-attention, no mask) as slice + bmm + softmax."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.gate = getattr(attn, "gate", None)
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.attn_dim = attn.num_heads * attn.head_dim
        if attn.qkv.out_features != 3 * self.attn_dim:
            raise ValueError(
                f"qkv.out_features={attn.qkv.out_features} != 3 * num_heads * head_dim "
                f"= {3 * self.attn_dim}; the module's head attributes are out of sync"
            )
        ref = attn.qkv.weight
        self.register_buffer(
            "scale", torch.tensor([float(attn.scale)], dtype=ref.dtype, device=ref.device), persistent=False
        )

    def _heads(self, t: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
        return t.reshape(batch, tokens, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(
                "DelegatableAttention supports unmasked self-attention only (attn_mask=None, is_causal=False)"
            )
        b, n, _ = x.shape
        h, d, a = self.num_heads, self.head_dim, self.attn_dim
        qkv = self.qkv(x)
        q = self.q_norm(self._heads(qkv[:, :, :a], b, n)) * self.scale
        k = self.k_norm(self._heads(qkv[:, :, a : 2 * a], b, n))
        v = self._heads(qkv[:, :, 2 * a :], b, n)
        scores = torch.bmm(q.reshape(b * h, n, d), k.transpose(-2, -1).reshape(b * h, d, n)).softmax(-1)
        out = torch.bmm(scores, v.reshape(b * h, n, d)).reshape(b, h, n, d).permute(0, 2, 1, 3).reshape(b, n, a)
        out = self.norm(out)
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(x))
        return self.proj(out)


register_delegation_swap(nn.LayerNorm)(DelegatableLayerNorm)
try:  # timm's LayerNorm subclass computes the same function (F.layer_norm or its fast variant)
    from timm.layers import LayerNorm as _TimmLayerNorm
    from timm.layers.attention import Attention as _TimmAttention

    register_delegation_swap(_TimmLayerNorm)(DelegatableLayerNorm)
    register_delegation_swap(_TimmAttention)(DelegatableAttention)
except ImportError:  # pragma: no cover - timm is a dependency
    pass


def _replace(
    module: nn.Module,
    pick: Callable[[nn.Module], Callable[[nn.Module], nn.Module] | None],
    counts: dict[str, int] | None = None,
) -> dict[str, int]:
    """Post-order: a module's children are swapped before the module itself is (e.g. the q/k norms of
    an attention block before the block)."""
    counts = {} if counts is None else counts
    for name, child in list(module.named_children()):
        _replace(child, pick, counts)
        fn = pick(child)
        if fn is not None:
            setattr(module, name, fn(child))
            counts[type(child).__name__] = counts.get(type(child).__name__, 0) + 1
    return counts


def make_delegation_friendly(model: nn.Module) -> dict[str, int]:
    """Swap, in place, every module with a registered swap. Returns ``{type name: count}``.

    Call it on a copy (the exporter does): the swapped modules share the original parameters.
    """

    def pick(module: nn.Module):
        swap = DELEGATION_SWAPS.for_type(module)
        return None if swap is None else swap.build

    return _replace(model, pick)


def keep_layernorm_fp32(model: nn.Module) -> int:
    """Wrap, in place, every LayerNorm (original or :class:`DelegatableLayerNorm`) in :class:`Fp32LayerNorm`."""
    counts = _replace(model, lambda m: Fp32LayerNorm if isinstance(m, (nn.LayerNorm, DelegatableLayerNorm)) else None)
    return sum(counts.values())
