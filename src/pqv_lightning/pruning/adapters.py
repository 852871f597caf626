"""Model-family adapters: what the pruner must know about an architecture, kept out of the pruning code.

An adapter answers four questions for one family of models:

* which modules are multi-head attention, and how many heads each has (Torch-Pruning needs
  ``num_heads={qkv_linear: heads}``);
* which layers are the classifier and stay untouched by default;
* which bare ``nn.Parameter`` tokens (``cls_token``, ``pos_embed``, ...) carry the embedding width;
* how to re-synchronise module attributes after channels were removed (timm's ``Attention`` keeps
  ``num_heads``, ``head_dim``, ``attn_dim`` and ``scale`` as plain Python attributes).

Adapters live in the registry :data:`ADAPTERS` (name -> adapter, each naming the model classes it
handles) and are found along the model class's MRO, so a subclass of a registered model (e.g.
timm's ``VisionTransformerDistilled``) is handled by its parent's adapter unless it registers its
own. Add a family with :func:`register_adapter`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry

__all__ = [
    "ADAPTERS",
    "AttentionInfo",
    "check_model_attr",
    "no_adapter_error",
    "supported_families",
    "ModelAdapter",
    "VisionTransformerAdapter",
    "find_adapter",
    "input_shape_for",
    "register_adapter",
    "registered_model_types",
]


@dataclass(frozen=True)
class AttentionInfo:
    """One attention module: its dotted name, the module, its fused qkv Linear and head count."""

    name: str
    module: nn.Module
    qkv: nn.Linear
    num_heads: int


class ModelAdapter:
    """Base class of model-family adapters. Subclasses override the methods that differ;
    ``model_types`` (set by :func:`register_adapter`) are the model classes it handles."""

    model_types: tuple[type, ...] = ()
    #: whether whole attention heads may be removed (``prune_num_heads=True``); False: refused by name
    whole_heads: bool = True

    def attention_modules(self, model: nn.Module) -> list[AttentionInfo]:
        """All multi-head attention modules of ``model`` with a fused ``qkv`` projection."""
        return []

    def classifier_names(self, model: nn.Module) -> list[str]:
        """Dotted names of the classifier layers, kept whole by default."""
        return []

    def unwrapped_parameters(self, model: nn.Module) -> list[tuple[nn.Parameter, int]]:
        """Bare parameters (not owned by a Linear/Conv/Norm) and the dim that carries channels."""
        return []

    def example_input_shape(self, model: nn.Module) -> tuple[int, ...]:
        """Shape of a batch-1 input that a forward pass accepts (used to trace dependencies)."""
        raise NotImplementedError

    def width_multiple(self, model: nn.Module) -> int:
        """Every pruned width stays a multiple of this (combined with ``round_to``), for families whose
        modules need it, e.g. ``nn.MultiheadAttention``'s ``embed_dim`` divisible by its heads. Default 1."""
        return 1

    def kept_whole(self, model: nn.Module) -> dict[str, str]:
        """Layers never pruned whatever ``ignored_layers`` says (dotted name -> why), e.g. the layers that
        write a residual stream Torch-Pruning cannot reshape safely. Default: none."""
        return {}

    def out_channel_groups(self, model: nn.Module) -> dict[nn.Module, int]:
        """Layers whose outputs are ``n`` equal parts pruned alike (Torch-Pruning's ``out_channel_groups``),
        e.g. a Linear that computes both halves of a SwiGLU (unit ``i`` is outputs ``i`` and ``hidden + i``),
        so a ratio counts units, not outputs. Default: none."""
        return {}

    def check_prunable(self, model: nn.Module, ignored: Sequence[str]) -> None:
        """Raise :class:`ConfigError` for parts of ``model`` that Torch-Pruning cannot prune
        correctly unless they are among ``ignored`` (dotted module names kept whole, with their
        children), naming the part and what is allowed. Default: nothing to refuse."""

    def sync_attributes(self, model: nn.Module, num_heads: dict[str, int]) -> None:
        """Re-derive Python attributes from the (pruned) parameter shapes.

        ``num_heads`` maps an attention module's dotted name to its current head count.
        """

    def residual_writers(self, model: nn.Module) -> list[str]:
        """Dotted names of the Linear layers whose outputs are added to the residual stream, in
        forward order: what reconstruction after a pruning event refits
        (:mod:`pqv_lightning.pruning.reconstruction`). Empty: the family does not support it."""
        return []

    def reconstruction_layers(self, model: nn.Module) -> list[str]:
        """Dotted names of every Linear layer that reconstruction may refit, in forward order
        (``PruningConfig(reconstruct_layers="all")``). Empty: the family does not support it."""
        return []

    def reconstruction_stages(self, model: nn.Module) -> list[str]:
        """Dotted names of modules that run one after the other on one tensor and hold the layers
        to refit (a ViT's blocks): reconstruction keeps their inputs between stages instead of
        re-running the network from the start for every layer; layers after the last stage (the
        head) are fitted with whole forward passes. Empty: whole forward passes only."""
        return []


#: name -> :class:`ModelAdapter`, looked up by model class along its MRO (:func:`find_adapter`).
ADAPTERS: Registry[ModelAdapter] = Registry("model adapter", types=lambda adapter: adapter.model_types)


def register_adapter(
    *model_types: type | str, name: str | None = None
) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    """Class decorator: ``@register_adapter(MyViT) class MyViTAdapter(ModelAdapter): ...`` registers an
    instance in :data:`ADAPTERS` under ``name`` (default the adapter class's qualified name). A model
    type may be a ``"module.Class"`` string: an optional library's class, matched without importing it."""
    if not model_types:
        raise ConfigError("register_adapter needs at least one model class")

    def deco(adapter_cls: type[ModelAdapter]) -> type[ModelAdapter]:
        adapter = adapter_cls()
        adapter.model_types = tuple(model_types)
        ADAPTERS.register(name or f"{adapter_cls.__module__}.{adapter_cls.__qualname__}", adapter, overwrite=True)
        return adapter_cls

    return deco


def registered_model_types() -> list[type | str]:
    """Model classes (or ``"module.Class"`` names) that have an adapter."""
    return [t for adapter in ADAPTERS.values() for t in adapter.model_types]


def _block_linears(model: nn.Module, paths: tuple[str, ...]) -> list[str]:
    """``blocks.<i>.<path>`` for every block of ``model`` and every path that is an nn.Linear there."""
    names = []
    for i, block in enumerate(getattr(model, "blocks", [])):
        for path in paths:
            try:
                layer = block.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(layer, nn.Linear):
                names.append(f"blocks.{i}.{path}")
    return names


def find_adapter(model: nn.Module) -> ModelAdapter | None:
    """The adapter of the closest registered class in ``type(model).__mro__``, or None."""
    return ADAPTERS.for_type(model)


def _timm_attention_types() -> tuple[type, ...]:
    from timm.models import vision_transformer as vt

    types: list[type] = [vt.Attention]
    try:  # timm >= 1.0.20 defines Attention in timm.layers and re-exports it
        from timm.layers.attention import Attention as LayerAttention

        types.append(LayerAttention)
    except ImportError:  # pragma: no cover - older timm
        pass
    return tuple(dict.fromkeys(types))


def _iter_timm_attention(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    attn_types = _timm_attention_types()
    for name, module in model.named_modules():
        if isinstance(module, attn_types) and isinstance(getattr(module, "qkv", None), nn.Linear):
            yield name, module


try:
    from timm.models.vision_transformer import VisionTransformer as _TimmViT
except ImportError:  # pragma: no cover - timm is a hard dependency
    _TimmViT = None


if _TimmViT is not None:

    @register_adapter(_TimmViT)
    class VisionTransformerAdapter(ModelAdapter):
        """timm ``VisionTransformer`` and its subclasses: ViT, DeiT (incl. distilled), DeiT3.

        Pruning head dims or whole heads changes ``qkv``/``proj`` widths; this adapter then sets
        ``num_heads``, ``head_dim = qkv.out_features // (3 * num_heads)``, ``attn_dim`` and
        ``scale = head_dim ** -0.5`` so the fused (SDPA, which always scales by the current head
        dim) and the manual attention path agree.
        """

        def attention_modules(self, model: nn.Module) -> list[AttentionInfo]:
            return [AttentionInfo(name, m, m.qkv, int(m.num_heads)) for name, m in _iter_timm_attention(model)]

        def classifier_names(self, model: nn.Module) -> list[str]:
            names = []
            for attr in ("head", "head_dist"):
                layer = getattr(model, attr, None)
                if isinstance(layer, nn.Module) and any(True for _ in layer.parameters()):
                    names.append(attr)
            return names

        def unwrapped_parameters(self, model: nn.Module) -> list[tuple[nn.Parameter, int]]:
            # tokens and position embedding (channels last) and LayerScale's gamma (DeiT3, DINOv2-style
            # ViTs): declared, so Torch-Pruning prunes them with the embedding instead of warning
            return _bare_parameters(model)

        def example_input_shape(self, model: nn.Module) -> tuple[int, ...]:
            pe = model.patch_embed
            in_chans = pe.proj.in_channels
            img_size = getattr(pe, "img_size", None)
            if img_size is None:
                raise ConfigError(
                    "cannot infer the input size of this VisionTransformer (patch_embed.img_size is None); "
                    "pass example_input_shape=[C, H, W]"
                )
            h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            return (1, in_chans, int(h), int(w))

        def residual_writers(self, model: nn.Module) -> list[str]:
            return _block_linears(model, ("attn.proj", "mlp.fc2"))

        def reconstruction_layers(self, model: nn.Module) -> list[str]:
            # the head comes after the blocks (its inputs are the pruned embedding channels)
            head = ["head"] if isinstance(getattr(model, "head", None), nn.Linear) else []
            return _block_linears(model, ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")) + head

        def reconstruction_stages(self, model: nn.Module) -> list[str]:
            blocks = getattr(model, "blocks", None)
            # timm runs blocks one by one on a tensor (nn.Sequential); anything else: whole forwards
            return [f"blocks.{i}" for i in range(len(blocks))] if isinstance(blocks, nn.Sequential) else []

        def kept_whole(self, model: nn.Module) -> dict[str, str]:
            # qk_norm=True: q and k go through a LayerNorm over the head dim after the heads are split.
            # Torch-Pruning 1.6.1 couples that norm's head_dim weights to qkv's 3 x heads x head_dim outputs
            # and fails (IndexError) for head dims and whole heads alike, so such an attention keeps its
            # widths; its input (the embedding) and the MLP are still pruned.
            why = "q/k normalized per head (qk_norm=True): the attention keeps its head dims and heads"
            return {
                f"{name}.qkv": why
                for name, m in _iter_timm_attention(model)
                if any(
                    not isinstance(getattr(m, part, None), (nn.Identity, type(None))) for part in ("q_norm", "k_norm")
                )
            }

        def sync_attributes(self, model: nn.Module, num_heads: dict[str, int]) -> None:
            for name, m in _iter_timm_attention(model):
                heads = int(num_heads.get(name, m.num_heads))
                qkv_out = m.qkv.out_features
                if qkv_out % (3 * heads):
                    raise RuntimeError(f"{name}: qkv has {qkv_out} outputs, not divisible by 3 x {heads} heads")
                m.num_heads = heads
                m.head_dim = qkv_out // (3 * heads)
                m.attn_dim = heads * m.head_dim
                m.scale = m.head_dim**-0.5
            _sync_embedding_width(model)


def check_model_attr(attr: object) -> str | None:
    """``model_attr`` is None or a dotted attribute path such as ``"model"`` or ``"net.backbone"``."""
    if attr is not None and (not isinstance(attr, str) or not all(p.isidentifier() for p in attr.split("."))):
        raise ConfigError(
            f"model_attr={attr!r} must be None or a dotted attribute path such as 'model' or 'net.backbone'"
        )
    return attr


#: timm convolutional families pruned through Torch-Pruning's generic dependency graph (no attention)
_TIMM_CNN_CLASSES = (
    "timm.models.resnet.ResNet",
    "timm.models.convnext.ConvNeXt",
    "timm.models.efficientnet.EfficientNet",
    "timm.models.mobilenetv3.MobileNetV3",
    "timm.models.regnet.RegNet",
)

#: layer types that own their parameters in Torch-Pruning's eyes; any other module's bare parameters
#: (ConvNeXt's layer scale ``gamma``) are declared as unwrapped parameters
_WRAPPED = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
    nn.MultiheadAttention,
)


def _mlp_linears(
    model: nn.Module,
    hidden: tuple[str, ...] = ("mlp.fc1", "mlp.fc1_g", "mlp.fc1_x"),
    out: tuple[str, ...] = ("mlp.fc2",),
) -> tuple[list[str], list[str]]:
    """(every MLP Linear, the MLP output Linears) in forward order: what reconstruction refits in a
    family whose pruning reaches only the MLP hidden units."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(hidden + out)]
    return names, [n for n in names if n.endswith(out)]


class _MLPReconstruction:
    """Reconstruction for families pruned in their MLP hidden units only: the MLP Linears (fc1 rows kept,
    fc2 columns kept) in forward order; fc2 writes the residual stream. Whole forwards (no stages)."""

    def reconstruction_layers(self, model: nn.Module) -> list[str]:
        return _mlp_linears(model)[0]

    def residual_writers(self, model: nn.Module) -> list[str]:
        return _mlp_linears(model)[1]


class _TimmHeadModel:
    """timm transformers with a ``patch_embed`` and a Linear ``head`` (BEiT, EVA): the classifier, the bare
    parameters and the example input."""

    def classifier_names(self, model: nn.Module) -> list[str]:
        return ["head"] if isinstance(getattr(model, "head", None), nn.Linear) else []

    def unwrapped_parameters(self, model: nn.Module) -> list[tuple[nn.Parameter, int]]:
        return _bare_parameters(model)

    def example_input_shape(self, model: nn.Module) -> tuple[int, ...]:
        return _patch_input_shape(model)


def _classes(*paths: str) -> tuple[type, ...]:
    """The classes at ``"module.Class"`` paths that import here (an optional library that is missing, or
    another version without the class: left out)."""
    found = []
    for path in paths:
        module, _, name = path.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _patch_input_shape(model: nn.Module) -> tuple[int, ...]:
    """A batch-1 input of a model with a timm ``patch_embed`` (``img_size``, ``proj``)."""
    pe = model.patch_embed
    h, w = (pe.img_size, pe.img_size) if isinstance(pe.img_size, int) else tuple(pe.img_size)
    return (1, pe.proj.in_channels, int(h), int(w))


def _bare_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Parameters held directly by modules that are not layers (layer scales, tokens), with the dim that
    carries channels: the only dim longer than 1, else the last."""
    out = []
    for module in model.modules():
        if isinstance(module, _WRAPPED):
            continue
        for p in module.parameters(recurse=False):
            long = [d for d, n in enumerate(p.shape) if n > 1]
            out.append((p, long[0] if len(long) == 1 else p.dim() - 1))
    return out


_CNN_TYPES = _classes(*_TIMM_CNN_CLASSES)

if _CNN_TYPES:

    @register_adapter(*_CNN_TYPES)
    class TimmCNNAdapter(ModelAdapter):
        """timm convolutional classifiers (ResNet, ConvNeXt, EfficientNet, MobileNetV3, RegNet): conv
        channels and MLP units through Torch-Pruning's generic dependency graph; the classifier named by
        the model's ``pretrained_cfg["classifier"]`` is kept whole; layer scales are declared; after an
        event the width attributes ``reset_classifier`` reads follow the pruned layers. No attention,
        and no least-squares reconstruction (it refits Linear layers of ViT blocks): ``reconstruct=True``
        is refused for these families."""

        def _classifier(self, model: nn.Module) -> str | None:
            name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
            try:
                layer = model.get_submodule(name) if isinstance(name, str) else None
            except AttributeError:
                return None
            return name if layer is not None and any(True for _ in layer.parameters()) else None

        def classifier_names(self, model: nn.Module) -> list[str]:
            name = self._classifier(model)
            return [name] if name else []

        def unwrapped_parameters(self, model: nn.Module) -> list[tuple[nn.Parameter, int]]:
            return _bare_parameters(model)

        def example_input_shape(self, model: nn.Module) -> tuple[int, ...]:
            first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
            size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224)
            channels = first.in_channels if first is not None else size[0]
            return (1, channels, int(size[1]), int(size[2]))

        def sync_attributes(self, model: nn.Module, num_heads: dict[str, int]) -> None:
            name = self._classifier(model)
            if name is None:
                return
            classifier = model.get_submodule(name)
            width = getattr(classifier, "in_features", None) or getattr(classifier, "in_channels", None)
            if not isinstance(width, int):
                return
            # MobileNetV3 keeps num_features for the blocks' output (conv_head's input)
            conv_head = getattr(model, "conv_head", None)
            features = (
                conv_head.in_channels
                if type(model).__name__ == "MobileNetV3" and isinstance(conv_head, nn.Conv2d)
                else width
            )
            for attr, value in (("num_features", features), ("head_hidden_size", width)):
                if isinstance(getattr(model, attr, None), int):
                    setattr(model, attr, value)
            if "." in name:  # a head module around the classifier (ConvNeXt, RegNet): its own widths
                head = model.get_submodule(name.rsplit(".", 1)[0])
                for attr in ("in_features", "num_features"):
                    if isinstance(getattr(head, attr, None), int) and not isinstance(getattr(head, attr), bool):
                        setattr(head, attr, width)


def _sync_embedding_width(model: nn.Module) -> None:
    """The model's own width attributes, which ``reset_classifier``, attention pooling and a later pruner
    read, set to the embedding width: the patch projection's output channels."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(proj, nn.Conv2d):
        old, width = getattr(model, "embed_dim", None), int(proj.out_channels)
        for attr in ("embed_dim", "num_features", "head_hidden_size"):
            if getattr(model, attr, None) == old and old is not None:
                setattr(model, attr, width)


_BEIT_TYPES = _classes("timm.models.beit.Beit")

if _BEIT_TYPES:

    @register_adapter(*_BEIT_TYPES)
    class BeitAdapter(_MLPReconstruction, _TimmHeadModel, ModelAdapter):
        """timm ``Beit`` (BEiT, BEiT v2): the MLP hidden units (and whatever else Torch-Pruning's graph
        finds independent) are pruned; the attention's ``qkv`` is kept whole, and said so: its biases
        are separate ``q_bias`` / ``v_bias`` parameters concatenated at every call, and the relative
        position bias is per head, which Torch-Pruning 1.6.1 couples to the head dims. Whole heads are
        refused."""

        whole_heads = False

        def kept_whole(self, model: nn.Module) -> dict[str, str]:
            why = "BEiT attention keeps its widths (q/v biases and relative position bias per head)"
            return {n: why for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith("attn.qkv")}

        def sync_attributes(self, model: nn.Module, num_heads: dict[str, int]) -> None:
            _sync_embedding_width(model)


_TV_VIT_TYPES = _classes("torchvision.models.vision_transformer.VisionTransformer")

if _TV_VIT_TYPES:

    @register_adapter(*_TV_VIT_TYPES)
    class TorchvisionViTAdapter(ModelAdapter):
        """torchvision ``VisionTransformer`` (``vit_b_16`` and friends, ``nn.MultiheadAttention``): the
        embedding width (with it every attention's ``embed_dim``, so the head dims shrink alike) and MLP
        hidden units, kept multiples of the head count (``nn.MultiheadAttention`` needs it); the
        classifier ``heads`` is kept whole; whole heads are refused; ``hidden_dim`` follows."""

        whole_heads = False

        def _attention(self, model: nn.Module) -> list[nn.MultiheadAttention]:
            return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]

        def classifier_names(self, model: nn.Module) -> list[str]:
            return ["heads"] if isinstance(getattr(model, "heads", None), nn.Module) else []

        def width_multiple(self, model: nn.Module) -> int:
            return math.lcm(*[int(m.num_heads) for m in self._attention(model)] or [1])

        def unwrapped_parameters(self, model: nn.Module) -> list[tuple[nn.Parameter, int]]:
            return _bare_parameters(model)  # class_token, encoder.pos_embedding

        def example_input_shape(self, model: nn.Module) -> tuple[int, ...]:
            return (1, model.conv_proj.in_channels, int(model.image_size), int(model.image_size))

        def sync_attributes(self, model: nn.Module, num_heads: dict[str, int]) -> None:
            model.hidden_dim = int(model.conv_proj.out_channels)


#: why a Swin (timm or Hugging Face) keeps its residual stream and its window attention whole
SWIN_RESIDUAL_WHY = "Swin's residual stream keeps its width (Torch-Pruning mis-couples patch merging)"
SWIN_ATTENTION_WHY = "window attention keeps its head dims (coupled to the relative position bias)"

_SWIN_TYPES = _classes(
    "timm.models.swin_transformer.SwinTransformer", "timm.models.swin_transformer_v2.SwinTransformerV2"
)

if _SWIN_TYPES:

    @register_adapter(*_SWIN_TYPES)
    class SwinAdapter(_MLPReconstruction, ModelAdapter):
        """timm ``SwinTransformer`` and ``SwinTransformerV2``: the MLP hidden units are pruned. Kept whole, and said so: the
        residual stream of every stage (patch embedding, ``attn.proj``, ``mlp.fc2``, patch merging's
        ``reduction``: Torch-Pruning 1.6.1 couples patch merging's 2 x 2 token concatenation wrongly,
        so a pruned embedding breaks the next stage's LayerNorm) and the window attention's ``qkv``
        (its dependency graph couples the head dims to the per-head relative position bias table
        through the attention scores, so no head-dim group is ever prunable); whole heads are refused."""

        whole_heads = False

        def attention_modules(self, model: nn.Module) -> list[AttentionInfo]:
            window = _classes(
                "timm.models.swin_transformer.WindowAttention", "timm.models.swin_transformer_v2.WindowAttention"
            )
            return [
                AttentionInfo(name, m, m.qkv, int(m.num_heads))
                for name, m in model.named_modules()
                if isinstance(m, window) and isinstance(getattr(m, "qkv", None), nn.Linear)
            ]

        def classifier_names(self, model: nn.Module) -> list[str]:
            fc = getattr(getattr(model, "head", None), "fc", None)
            return ["head.fc"] if isinstance(fc, nn.Linear) else []

        def kept_whole(self, model: nn.Module) -> dict[str, str]:
            residual, attention = SWIN_RESIDUAL_WHY, SWIN_ATTENTION_WHY
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            kept = {"patch_embed.proj": residual}
            kept.update({n: residual for n in linears if n.endswith(("attn.proj", "mlp.fc2", "downsample.reduction"))})
            kept.update({n: attention for n in linears if n.endswith("attn.qkv")})
            return kept

        def unwrapped_parameters(self, model: nn.Module) -> list[tuple[nn.Parameter, int]]:
            # relative position bias tables (positions, heads); v2: logit_scale (heads, 1, 1), q/v biases
            return _bare_parameters(model)

        def example_input_shape(self, model: nn.Module) -> tuple[int, ...]:
            return _patch_input_shape(model)

        def sync_attributes(self, model: nn.Module, num_heads: dict[str, int]) -> None:
            for info in self.attention_modules(model):
                m = info.module
                m.num_heads = int(num_heads.get(info.name, m.num_heads))
                head_dim = m.qkv.out_features // (3 * m.num_heads)
                m.scale = head_dim**-0.5  # what the fused path (SDPA) uses for the current head dim
                for attr, value in (("head_dim", head_dim), ("attn_dim", head_dim * m.num_heads)):
                    if hasattr(m, attr):
                        setattr(m, attr, value)


_EVA_TYPES = _classes("timm.models.eva.Eva")

if _EVA_TYPES:

    @register_adapter(*_EVA_TYPES)
    class EvaAdapter(_MLPReconstruction, _TimmHeadModel, ModelAdapter):
        """timm ``Eva`` (EVA, EVA-02 and the rotary-embedding ViTs built on it): the MLP hidden units are
        pruned, SwiGLU included (``SwiGLU``'s two Linears alike; ``GluMlp``'s fused Linear in equal
        halves, through :func:`~pqv_lightning.pruning.tp_fixes.install`). Kept whole, and said so:
        the attention (rotary position embedding rotates pairs of head dims; EVA's q/v biases are
        separate parameters) and the residual stream (patch embedding, ``attn.proj``, ``mlp.fc2``: with
        the embedding pruned Torch-Pruning 1.6.1 leaves EVA's blocks with mismatched widths, a shape
        error at the first forward); whole heads are refused."""

        whole_heads = False

        def kept_whole(self, model: nn.Module) -> dict[str, str]:
            residual = "EVA's residual stream keeps its width (Torch-Pruning mis-couples its embedding)"
            attention = "EVA attention keeps its widths (rotary embedding over head-dim pairs, separate q/v biases)"
            kept = {"patch_embed.proj": residual}
            for name, m in model.named_modules():
                if not isinstance(m, nn.Linear):
                    continue
                if name.endswith(("attn.proj", "mlp.fc2")):
                    kept[name] = residual
                elif name.endswith(("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj")):
                    kept[name] = attention
            return kept

        def out_channel_groups(self, model: nn.Module) -> dict[nn.Module, int]:
            from timm.layers import GluMlp

            return {m.fc1: 2 for m in model.modules() if isinstance(m, GluMlp) and isinstance(m.fc1, nn.Linear)}


def supported_families() -> list[str]:
    """The model classes that have an adapter, as ``module.Class`` names (for messages and docs)."""
    return [t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}" for t in registered_model_types()]


#: how to make an unknown model prunable, in every "no adapter" message
REGISTER_HINT = (
    "register an adapter: @pqv_lightning.register_adapter(MyNet) class MyNetAdapter(ModelAdapter): "
    "def classifier_names(self, model): return ['fc']; def example_input_shape(self, model): "
    "return (1, 3, 224, 224)  (docs/architecture.md)"
)


def no_adapter_error(model: nn.Module, argument: str = "model") -> ConfigError:
    """The refusal of a model no adapter knows: its class, the supported families, how to add one."""
    return ConfigError(
        f"{argument} is a {type(model).__module__}.{type(model).__name__}, which no pruning adapter "
        f"knows; supported families: {supported_families()}; or {REGISTER_HINT}"
    )


def locate_model(root: nn.Module, attr: str | None = None) -> tuple[str, nn.Module, ModelAdapter]:
    """Find the prunable network inside ``root`` (usually a LightningModule).

    With ``attr`` (a dotted path such as ``"model"`` or ``"net.backbone"``) that submodule is used.
    Otherwise ``root`` itself if it has an adapter, else the *outermost* submodules that have one;
    exactly one must exist.
    """
    if attr:
        module: nn.Module = root
        for part in attr.split("."):
            if not hasattr(module, part):
                raise ConfigError(f"model_attr={attr!r}: {type(module).__name__} has no attribute {part!r}")
            module = getattr(module, part)
        if not isinstance(module, nn.Module):
            raise ConfigError(f"model_attr={attr!r} is a {type(module).__name__}, not an nn.Module")
        adapter = find_adapter(module)
        if adapter is None:
            raise no_adapter_error(module, f"model_attr={attr!r}")
        return attr, module, adapter
    adapter = find_adapter(root)
    if adapter is not None:
        return "", root, adapter
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if not name or find_adapter(module) is None:
            continue
        if any(name.startswith(prev + ".") for prev, _ in found):
            continue
        found.append((name, module))
    if not found:
        raise ConfigError(
            f"no prunable model found in {type(root).__name__}: none of its submodules belongs to a supported family "
            f"{supported_families()}; pass model_attr= if the network is one of them, or {REGISTER_HINT}"
        )
    if len(found) > 1:
        raise ConfigError(
            f"several prunable models found in {type(root).__name__}: {[n for n, _ in found]}; "
            "choose one with model_attr="
        )
    name, module = found[0]
    return name, module, find_adapter(module)


def input_shape_for(model: nn.Module) -> tuple[int, ...]:
    """The batch-1 input shape of a supported model (e.g. ``(1, 3, 224, 224)`` for DeiT-S)."""
    adapter = find_adapter(model)
    if adapter is None:
        raise ConfigError(
            f"{type(model).__name__} has no registered adapter: give the input shape explicitly "
            f"(supported families: {supported_families()})"
        )
    return tuple(adapter.example_input_shape(model))


def example_inputs_for(model: nn.Module, adapter: ModelAdapter, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A random batch-1 input on the model's device and dtype."""
    shape = tuple(shape) if shape is not None else adapter.example_input_shape(model)
    if len(shape) == 3:
        shape = (1, *shape)
    p = next(model.parameters())
    return torch.randn(shape, device=p.device, dtype=p.dtype if p.is_floating_point() else torch.float32)
