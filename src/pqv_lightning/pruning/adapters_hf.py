"""Adapters for Hugging Face ``transformers`` vision models (the ``hf`` extra: ``transformers>=5``).

Registered by class name (``"transformers.models.vit.modeling_vit.ViTForImageClassification"``), so
``transformers`` is imported only by a user who builds such a model. ``transformers`` 5 names the
layers alike in every family: attention ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` with
``num_attention_heads`` / ``head_dim`` / ``scaling`` attributes (the forward views by ``head_dim``),
and ``mlp.fc1`` / ``mlp.fc2``. Their forward returns a ``ModelOutput``: export and distillation take
its ``logits`` (:mod:`pqv_lightning.outputs`).

* ViT, DeiT (with or without the distillation head) and DINOv2 (:class:`HFViTAdapter`): heads, head
  dims, MLP units and, except for DINOv2's classifier (below), the embedding width.
* Swin (:class:`HFSwinAdapter`): the MLP hidden units, the rest kept whole as in timm's Swin.

A pruned model's ``config`` still describes the unpruned widths: reload it with
:func:`~pqv_lightning.pruning.restore_structure` (or ``load_pruned_checkpoint``), not
``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .adapters import (
    SWIN_ATTENTION_WHY,
    SWIN_RESIDUAL_WHY,
    AttentionInfo,
    ModelAdapter,
    _bare_parameters,
    _MLPReconstruction,
    register_adapter,
)

__all__ = ["HF_SWIN_CLASSES", "HF_VIT_CLASSES", "HFSwinAdapter", "HFViTAdapter"]

_T = "transformers.models"
#: the ViT-like classes (class-token ViTs with q/k/v/o projections)
HF_VIT_CLASSES = (
    f"{_T}.vit.modeling_vit.ViTForImageClassification",
    f"{_T}.vit.modeling_vit.ViTModel",
    f"{_T}.deit.modeling_deit.DeiTForImageClassification",
    f"{_T}.deit.modeling_deit.DeiTForImageClassificationWithTeacher",
    f"{_T}.deit.modeling_deit.DeiTModel",
    f"{_T}.dinov2.modeling_dinov2.Dinov2ForImageClassification",
    f"{_T}.dinov2.modeling_dinov2.Dinov2Model",
)
HF_SWIN_CLASSES = (f"{_T}.swin.modeling_swin.SwinForImageClassification", f"{_T}.swin.modeling_swin.SwinModel")

_CLASSIFIERS = ("classifier", "cls_classifier", "distillation_classifier")


def _attention(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj")) and isinstance(
            getattr(module, "num_attention_heads", None), int
        ):
            yield name, module


def _input_shape(model: nn.Module) -> tuple[int, ...]:
    config = model.config
    size = config.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (1, int(config.num_channels), int(h), int(w))


def _classifier_names(model: nn.Module) -> list[str]:
    return [n for n in _CLASSIFIERS if isinstance(getattr(model, n, None), nn.Linear)]


def _linears(model: nn.Module, endings: tuple[str, ...]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(endings)]


class _HFModel:
    """What every Hugging Face vision family answers alike: its classifier(s), bare parameters and input."""

    def classifier_names(self, model: nn.Module) -> list[str]:
        return _classifier_names(model)

    def unwrapped_parameters(self, model: nn.Module) -> list[tuple[nn.Parameter, int]]:
        # class / distillation / mask tokens, position embeddings, DINOv2's layer scale (lambda1)
        return _bare_parameters(model)

    def example_input_shape(self, model: nn.Module) -> tuple[int, ...]:
        return _input_shape(model)


@register_adapter(*HF_VIT_CLASSES)
class HFViTAdapter(_HFModel, ModelAdapter):
    """Hugging Face ViT, DeiT and DINOv2 (``transformers`` 5): Torch-Pruning prunes the separate q / k / v
    projections together (``num_heads`` for each), then ``num_attention_heads``, ``head_dim`` and
    ``scaling`` follow the new widths. ``Dinov2ForImageClassification`` keeps its residual stream whole:
    its classifier reads ``[CLS, mean of the patch tokens]`` concatenated, and Torch-Pruning 1.6.1 removes
    the pruned embedding channels from the first half of the classifier's inputs only (a shape error at
    the first forward); ``Dinov2Model`` (no classifier) prunes its embedding too."""

    def attention_modules(self, model: nn.Module) -> list[AttentionInfo]:
        return [
            AttentionInfo(name, m, getattr(m, p), int(m.num_attention_heads))
            for name, m in _attention(model)
            for p in ("q_proj", "k_proj", "v_proj")
        ]

    def kept_whole(self, model: nn.Module) -> dict[str, str]:
        if type(model).__name__ != "Dinov2ForImageClassification":
            return {}
        why = "DINOv2's classifier reads [CLS, patch mean] concatenated: the embedding keeps its width"
        kept = {n: why for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        kept.update({n: why for n in _linears(model, ("o_proj", "mlp.fc2", "mlp.weights_out"))})
        return kept

    def reconstruction_layers(self, model: nn.Module) -> list[str]:
        names = _linears(model, ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc1", "mlp.fc2"))
        return names + [n for n in _classifier_names(model) if n not in self.kept_whole(model)]

    def residual_writers(self, model: nn.Module) -> list[str]:
        return _linears(model, ("o_proj", "mlp.fc2"))

    def sync_attributes(self, model: nn.Module, num_heads: dict[str, int]) -> None:
        for name, m in _attention(model):
            heads = int(num_heads.get(name, m.num_attention_heads))
            width = m.q_proj.out_features
            if width % heads:
                raise RuntimeError(f"{name}: q_proj has {width} outputs, not divisible by {heads} heads")
            m.num_attention_heads = heads
            m.head_dim = width // heads
            m.scaling = m.head_dim**-0.5


@register_adapter(*HF_SWIN_CLASSES)
class HFSwinAdapter(_MLPReconstruction, _HFModel, ModelAdapter):
    """Hugging Face Swin (``transformers`` 5): the MLP hidden units are pruned; kept whole, as for timm's
    Swin and for the same reasons, the residual stream (patch embedding, ``o_proj``, ``mlp.fc2``, patch
    merging's ``reduction``) and the window attention's q / k / v (per-head relative position bias);
    whole heads are refused."""

    whole_heads = False

    def kept_whole(self, model: nn.Module) -> dict[str, str]:
        residual, attention = SWIN_RESIDUAL_WHY, SWIN_ATTENTION_WHY
        kept = {n: residual for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        kept.update({n: residual for n in _linears(model, ("o_proj", "mlp.fc2", "downsample.reduction"))})
        kept.update({n: attention for n in _linears(model, ("q_proj", "k_proj", "v_proj"))})
        return kept
