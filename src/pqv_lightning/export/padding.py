"""Pad a pruned ViT's widths to kernel-friendly multiples, computing exactly the same function.

Structured pruning leaves widths such as 696 (DeiT-base, 9.375 % of 768 removed) or head dim 58.
Some runtimes run such widths slowly: OpenVINO's int8 kernels on an x86 host with AMX ran the
9.375 %-pruned DeiT-base slower than the unpruned model (`benchmarks/fastest_artifact.py
--pad none 64`). :func:`pad_widths` grows each width to a multiple of ``multiple`` (when that adds
at most ``max_growth``, 12.5 %) with channels that change nothing, so a runtime can use its fast
kernels while the pruning (and its accuracy) stays as it is:

* **MLP hidden units**: ``fc1`` gets zero rows (and zero bias), ``fc2`` zero columns; the
  activation maps 0 to 0 (GELU, ReLU, SiLU; checked), so the new units contribute nothing.
* **Head dims** (when ``heads x head dim`` is not a multiple): ``q``, ``k``, ``v`` get zero
  dims, ``proj`` zero columns; ``q`` is scaled by ``sqrt(new / old)`` because attention scales
  scores by ``1 / sqrt(head dim)`` of the padded width.
* **The embedding (residual) width**: the new channels carry the *mean* of the real channels
  everywhere in the residual stream (patch-embedding filters, class/register tokens and position
  embedding get mean rows; ``proj`` and ``fc2`` mean rows of their layer-scaled outputs), so every
  LayerNorm sees the real channels' mean, and the variance times ``C / P``: its epsilon becomes
  ``eps * C / P`` and its weight ``weight * sqrt(C / P)``, and its new channels output 0, which the
  next Linear ignores (zero columns), as does the classifier.

Supported: timm ``VisionTransformer`` with plain ``Block`` s (``Attention`` without q/k norm or
scale norm, ``Mlp``), LayerNorm or no final norms and a Linear head; anything else raises
:class:`WidthPaddingError` naming the part (:class:`MobileExportConfig` then exports unpadded and
says why in the manifest). Padding adds MACs, so it pays only where a runtime's kernels want the
multiple: ``MobileExportConfig(pad_widths="auto")`` pads for targets that declare one
(``ExportTarget.width_multiple``: OpenVINO 64).

Example::

    import timm, torch
    from pqv_lightning.export.padding import pad_widths
    from pqv_lightning.pruning import PruningConfig, prune_once

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    prune_once(model, PruningConfig(importance="l2", pruning_ratio=0.1))
    changes = pad_widths(model, 16)  # {'mlp_hidden': [691, 704], 'head_dim': [57, 64], 'embed_dim': [172, 176]}
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..widths import head_width_step

__all__ = ["MAX_GROWTH", "WidthPaddingError", "pad_widths"]

#: a width is padded only when that grows it by at most this fraction (696 -> 704 and head dim 58 -> 64
#: are; the Fashion-MNIST ViT's 144 -> 192 is not: it would give back most of what pruning removed)
MAX_GROWTH = 0.125


class WidthPaddingError(ConfigError):
    """The model has a part :func:`pad_widths` cannot pad exactly; the message names it."""


def _up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _grown(width: int, step: int, max_growth: float, kind: str, kept: dict[str, list[int]]) -> int:
    """``width`` rounded up to a multiple of ``step``, or ``width`` itself (noted in ``kept``) when that
    would grow it by more than ``max_growth``."""
    target = _up(width, step)
    if target > width * (1 + max_growth):
        kept.setdefault(kind, [width, target])
        return width
    return target


def _linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    new = nn.Linear(in_features, out_features, bias=like.bias is not None)
    return new.to(dtype=like.weight.dtype, device=like.weight.device)


def _zero_input_columns(lin: nn.Linear, width: int, inputs_per_group: int = 0, groups: int = 1) -> nn.Linear:
    """``lin`` taking ``width`` inputs, the new ones ignored. With ``groups`` the inputs are ``groups``
    blocks of ``inputs_per_group`` each padded at its end (attention heads)."""
    new = _linear(width, lin.out_features, lin)
    weight = new.weight.data
    weight.zero_()
    if groups == 1:
        weight[:, : lin.in_features] = lin.weight
    else:
        weight.view(lin.out_features, groups, -1)[:, :, :inputs_per_group] = lin.weight.view(
            lin.out_features, groups, inputs_per_group
        )
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias)
    return new


def _mlp_target(mlp: nn.Module, multiple: int, max_growth: float, kept: dict[str, list[int]]) -> int:
    """The padded hidden width (the same when it is a multiple); refuses an MLP it cannot pad."""
    target = _grown(mlp.fc1.out_features, multiple, max_growth, "mlp_hidden", kept)
    zero = torch.zeros(1, dtype=mlp.fc1.weight.dtype)
    if target != mlp.fc1.out_features and (
        not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity) or float(mlp.act(zero).abs().max()) != 0.0
    ):
        raise WidthPaddingError(
            f"cannot pad the MLP hidden width: its activation {type(mlp.act).__name__} does not "
            f"map 0 to 0 or it has a norm ({type(mlp.norm).__name__})"
        )
    return target


def _pad_mlp(mlp: nn.Module, target: int) -> list[int] | None:
    hidden = mlp.fc1.out_features
    if target == hidden:
        return None
    fc1 = _linear(mlp.fc1.in_features, target, mlp.fc1)
    fc1.weight.data.zero_()
    fc1.weight.data[:hidden] = mlp.fc1.weight
    if fc1.bias is not None:
        fc1.bias.data.zero_()
        fc1.bias.data[:hidden] = mlp.fc1.bias
    mlp.fc1, mlp.fc2 = fc1, _zero_input_columns(mlp.fc2, target)
    return [hidden, target]


def _head_target(attn: nn.Module, multiple: int, max_growth: float, kept: dict[str, list[int]]) -> int:
    """The padded head dim, so that heads x dim is a multiple; refuses an attention it cannot pad."""

    # the pruner's round_to rule: a head's width moves in steps that keep heads x width a multiple
    target = _grown(attn.head_dim, head_width_step(multiple, attn.num_heads), max_growth, "head_dim", kept)
    for part in ("q_norm", "k_norm", "norm"):
        if target != attn.head_dim and not isinstance(getattr(attn, part, nn.Identity()), nn.Identity):
            raise WidthPaddingError(
                f"cannot pad head dims of an attention with {part}="
                f"{type(getattr(attn, part)).__name__} (it normalizes over the head dims)"
            )
    return target


def _pad_heads(attn: nn.Module, target: int) -> list[int] | None:
    heads, head_dim = attn.num_heads, attn.head_dim
    if target == head_dim:
        return None
    qkv, width = attn.qkv, attn.qkv.in_features
    new = _linear(width, 3 * heads * target, qkv)
    weight = new.weight.data.zero_().view(3, heads, target, width)
    weight[:, :, :head_dim] = qkv.weight.view(3, heads, head_dim, width)
    weight[0] *= math.sqrt(target / head_dim)  # scores are scaled by 1/sqrt(target) now: keep 1/sqrt(head_dim)
    if qkv.bias is not None:
        bias = new.bias.data.zero_().view(3, heads, target)
        bias[:, :, :head_dim] = qkv.bias.view(3, heads, head_dim)
        bias[0] *= math.sqrt(target / head_dim)
    attn.qkv = new
    attn.proj = _zero_input_columns(attn.proj, heads * target, head_dim, heads)
    attn.head_dim, attn.attn_dim, attn.scale = target, heads * target, target**-0.5
    return [head_dim, target]


def _layernorm(norm: nn.LayerNorm, width: int, target: int) -> nn.LayerNorm:
    """LayerNorm over ``target`` channels whose new ones hold the real channels' mean: same outputs on
    the real channels, 0 on the new ones."""
    new = nn.LayerNorm(target, eps=norm.eps * width / target, elementwise_affine=True)
    new = new.to(dtype=norm.weight.dtype, device=norm.weight.device)
    new.weight.data.zero_()
    new.bias.data.zero_()
    new.weight.data[:width] = norm.weight * math.sqrt(width / target)
    if norm.bias is not None:
        new.bias.data[:width] = norm.bias
    return new


def _mean_rows(lin: nn.Linear, target: int, layer_scale: nn.Module) -> nn.Linear:
    """``lin`` with ``target`` outputs, the new ones the mean of its real outputs after ``layer_scale``
    (whose new channels get scale 1)."""
    width = lin.out_features
    gamma = getattr(layer_scale, "gamma", None)
    scale = gamma.detach() if gamma is not None else lin.weight.new_ones(width)
    new = _linear(lin.in_features, target, lin)
    new.weight.data[:width] = lin.weight
    new.weight.data[width:] = (scale[:, None] * lin.weight).mean(0)
    if lin.bias is not None:
        new.bias.data[:width] = lin.bias
        new.bias.data[width:] = (scale * lin.bias).mean()
    if gamma is not None:
        layer_scale.gamma = nn.Parameter(torch.cat([gamma.detach(), gamma.new_ones(target - width)]))
    return new


def _check_embedding(model: nn.Module) -> None:
    from timm.layers import LayerScale
    from timm.models.vision_transformer import Block

    def refuse(part: str) -> None:
        raise WidthPaddingError(f"cannot pad the embedding width of {type(model).__name__}: {part}")

    if not isinstance(getattr(model.patch_embed, "norm", nn.Identity()), nn.Identity):
        refuse("patch_embed.norm is not Identity")
    if not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity):
        refuse("norm_pre is not Identity")
    if getattr(model, "attn_pool", None) is not None:
        refuse("attention pooling head")
    if not isinstance(model.head, nn.Linear):
        refuse(f"its head is {type(model.head).__name__}, not Linear (the padded features would be the output)")
    for name in ("norm", "fc_norm"):
        if not isinstance(getattr(model, name, nn.Identity()), (nn.Identity, nn.LayerNorm)):
            refuse(f"{name} is {type(getattr(model, name)).__name__}")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            refuse(f"blocks[{i}] is {type(block).__name__}, not timm's Block")
        for part in ("norm1", "norm2"):
            if not isinstance(getattr(block, part), nn.LayerNorm):
                refuse(f"blocks[{i}].{part} is {type(getattr(block, part)).__name__}")
        for part in ("ls1", "ls2"):
            if not isinstance(getattr(block, part), (nn.Identity, LayerScale)):
                refuse(f"blocks[{i}].{part} is {type(getattr(block, part)).__name__}")


def _embedding_target(model: nn.Module, multiple: int, max_growth: float, kept: dict[str, list[int]]) -> int:
    target = _grown(model.patch_embed.proj.out_channels, multiple, max_growth, "embed_dim", kept)
    if target != model.patch_embed.proj.out_channels:
        _check_embedding(model)
    return target


def _pad_embedding(model: nn.Module, target: int) -> list[int] | None:
    conv = model.patch_embed.proj
    width = conv.out_channels
    if target == width:
        return None
    new = nn.Conv2d(conv.in_channels, target, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    new = new.to(dtype=conv.weight.dtype, device=conv.weight.device)
    new.weight.data[:width] = conv.weight
    new.weight.data[width:] = conv.weight.mean(0)
    if conv.bias is not None:
        new.bias.data[:width] = conv.bias
        new.bias.data[width:] = conv.bias.mean()
    model.patch_embed.proj = new
    for name in ("cls_token", "reg_token", "pos_embed"):
        t = getattr(model, name, None)
        if isinstance(t, torch.Tensor):
            mean = t.detach().mean(-1, keepdim=True).expand(*t.shape[:-1], target - width)
            setattr(model, name, nn.Parameter(torch.cat([t.detach(), mean], -1)))
    for block in model.blocks:
        block.norm1, block.norm2 = _layernorm(block.norm1, width, target), _layernorm(block.norm2, width, target)
        block.attn.qkv = _zero_input_columns(block.attn.qkv, target)
        block.attn.proj = _mean_rows(block.attn.proj, target, block.ls1)
        block.mlp.fc1 = _zero_input_columns(block.mlp.fc1, target)
        block.mlp.fc2 = _mean_rows(block.mlp.fc2, target, block.ls2)
    for name in ("norm", "fc_norm"):
        if isinstance(getattr(model, name, None), nn.LayerNorm):
            setattr(model, name, _layernorm(getattr(model, name), width, target))
    model.head = _zero_input_columns(model.head, target)
    for attr in ("embed_dim", "num_features", "head_hidden_size"):
        if getattr(model, attr, None) == width:
            setattr(model, attr, target)
    return [width, target]


@torch.no_grad()
def pad_widths(model: nn.Module, multiple: int = 64, max_growth: float = MAX_GROWTH) -> dict[str, Any]:
    """Pad, in place, every timm ``VisionTransformer`` inside ``model`` to widths that are multiples of
    ``multiple`` (MLP hidden, total attention width, embedding), without changing its outputs.

    Returns ``{"embed_dim": [old, new], "head_dim": [old, new], "mlp_hidden": [old, new]}`` for the
    widths that changed (of the first block that changed; pruning keeps all blocks alike unless it
    was global), ``{}`` when all were multiples already, and under ``"kept"`` the widths left as they
    were because padding would grow them by more than ``max_growth`` (``{"head_dim": [48, 64]}``).
    Every part is checked before any is padded: when it raises, ``model`` is unchanged.

    Raises:
        ConfigError: ``multiple`` is not an integer >= 2.
        WidthPaddingError: ``model`` holds no ViT, or a part that cannot be padded exactly.
    """
    from timm.models.vision_transformer import Attention, Mlp, VisionTransformer

    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 2:
        raise ConfigError(f"multiple={multiple!r} must be an integer >= 2")
    if not max_growth >= 0:
        raise ConfigError(f"max_growth={max_growth!r} must be >= 0")
    vits = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    if not vits:
        raise WidthPaddingError(
            f"{type(model).__name__} holds no timm VisionTransformer; pad_widths supports only those"
        )
    # every target first, so that a part that cannot be padded refuses before anything changed
    kept: dict[str, list[int]] = {}
    plan = [
        (
            vit,
            _embedding_target(vit, multiple, max_growth, kept),
            [(m, _mlp_target(m, multiple, max_growth, kept)) for m in vit.modules() if isinstance(m, Mlp)],
            [(m, _head_target(m, multiple, max_growth, kept)) for m in vit.modules() if isinstance(m, Attention)],
        )
        for vit in vits
    ]
    changes: dict[str, Any] = {}
    for vit, embed, mlps, attns in plan:
        for mlp, target in mlps:
            if c := _pad_mlp(mlp, target):
                changes.setdefault("mlp_hidden", c)
        for attn, target in attns:
            if c := _pad_heads(attn, target):
                changes.setdefault("head_dim", c)
        if c := _pad_embedding(vit, embed):
            changes.setdefault("embed_dim", c)
    if kept:
        changes["kept"] = kept
    return changes
