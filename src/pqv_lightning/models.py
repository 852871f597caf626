"""Model families, the Fashion-MNIST ViT checkpoint format, and a plain image-classification
LightningModule used by the examples (the callbacks do not need it: they work with any module).

:data:`MODELS` is the registry of model families the CLI, the sweep and the benchmarks build by
name (:func:`create_vit`); any other name is looked up in timm. Adding a family::

    from pqv_lightning.models import MODELS, ModelFamily
    from timm.models.vision_transformer import VisionTransformer

    MODELS.register("vit_micro_cifar", ModelFamily(
        build=lambda **kw: VisionTransformer(**{"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6,
                                                "num_heads": 3, "num_classes": 10, **kw}),
        description="a 6-block ViT for 32x32 RGB images"))

    create_vit("vit_micro_cifar")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .checks import first_line
from .errors import ConfigError, InputNotFoundError
from .fileio import load_tensors, staged
from .pruning import PruningConfig, prune_once
from .registry import Registry

__all__ = [
    "BUNDLED_CHECKPOINTS",
    "LOCAL_MODELS",
    "MODELS",
    "PAPER_MODELS",
    "ModelFamily",
    "bundled_checkpoint",
    "create_vit",
    "paper_model",
    "load_vit_checkpoint",
    "save_vit_checkpoint",
]

#: Architectures that are not in timm's registry; used by name like timm models.
LOCAL_MODELS: dict[str, dict[str, Any]] = {
    # The Fashion-MNIST ViT of shared/models/vit_tiny_fmnist.pt (5.36 M parameters).
    "vit_tiny_fmnist": dict(
        img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, depth=12, num_heads=3
    ),
    # A tiny ViT for unit tests (depth 2, dim 64, 32x32).
    "vit_test_tiny": dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=4),
}


#: Weights shipped inside the package (``pqv_lightning/assets/``): local model name -> (file, sha256).
#: ``assets/README.md`` documents each file's recipe.
BUNDLED_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "vit_tiny_fmnist": ("vit_tiny_fmnist.pt", "ace3f5e02bc9ebf1515440b794defead989effb1a4e1b45b31f2c39b448a5ede"),
}


def bundled_checkpoint(model_name: str = "vit_tiny_fmnist") -> Path:
    """Path of the checkpoint shipped with the package for ``model_name`` (see :data:`BUNDLED_CHECKPOINTS`).

    Raises:
        ValueError: no weights are bundled for ``model_name``.
        FileNotFoundError: the file is missing from this installation.
    """
    if model_name not in BUNDLED_CHECKPOINTS:
        raise ConfigError(f"no bundled weights for model_name={model_name!r}; bundled: {sorted(BUNDLED_CHECKPOINTS)}")
    path = Path(__file__).resolve().parent / "assets" / BUNDLED_CHECKPOINTS[model_name][0]
    if not path.is_file():
        raise InputNotFoundError(
            f"the bundled checkpoint {str(path)!r} is missing from this installation of "
            "pqv-lightning; reinstall it, or pass a checkpoint path"
        )
    return path


@dataclass(frozen=True)
class ModelFamily:
    """How to build one model family by name.

    Args:
        build: ``(**kwargs) -> nn.Module`` with random weights (kwargs override the defaults).
        pretrained: ``(**kwargs) -> nn.Module`` with trained weights, or None when there are none.
        description: one line for docs and error messages.
    """

    build: Callable[..., nn.Module]
    pretrained: Callable[..., nn.Module] | None = None
    description: str = ""


#: name -> :class:`ModelFamily`; :func:`create_vit` falls back to timm for other names.
MODELS: Registry[ModelFamily] = Registry("model family", argument="model_name")


def _local_vit(name: str) -> ModelFamily:
    arch = LOCAL_MODELS[name]

    def build(**kwargs: Any) -> nn.Module:
        return VisionTransformer(**{**arch, **kwargs})

    def pretrained(**kwargs: Any) -> nn.Module:
        other = {k: v for k, v in kwargs.items() if arch.get(k, object()) != v}
        if other:
            raise ConfigError(f"pretrained {name!r} has a fixed architecture ({arch}); got {other}")
        return load_vit_checkpoint(bundled_checkpoint(name))[0].train()

    return ModelFamily(build, pretrained if name in BUNDLED_CHECKPOINTS else None, f"timm VisionTransformer {arch}")


def _timm_family(name: str, description: str) -> ModelFamily:
    return ModelFamily(
        lambda **kw: timm.create_model(name, pretrained=False, **kw),
        lambda **kw: timm.create_model(name, pretrained=True, **kw),
        description,
    )


MODELS.register("vit_tiny_fmnist", _local_vit("vit_tiny_fmnist"))
MODELS.register("vit_test_tiny", _local_vit("vit_test_tiny"))
#: The paper's two models (PQV-Mobile, arXiv 2408.08437): built from timm, weights from the hub.
PAPER_MODELS: tuple[str, ...] = ("deit_base_patch16_224", "deit3_medium_patch16_224")
MODELS.register(
    PAPER_MODELS[0], _timm_family(PAPER_MODELS[0], "DeiT-base (86.6 M parameters), the paper's first model")
)
MODELS.register(PAPER_MODELS[1], _timm_family(PAPER_MODELS[1], "DeiT3-medium (38.8 M), the paper's second model"))


def create_vit(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A model family from :data:`MODELS`, or any timm model, by name.

    ``pretrained=True`` loads the family's weights: the ones bundled with the package for
    ``vit_tiny_fmnist`` (:data:`BUNDLED_CHECKPOINTS`), timm's hub weights for timm models (needs
    network access).

    Raises:
        ConfigError: an unknown name, or ``pretrained=True`` for a family without weights.
    """
    if model_name in MODELS:
        family = MODELS[model_name]
        if not pretrained:
            return family.build(**kwargs)
        if family.pretrained is None:
            raise ConfigError(
                f"{model_name!r} has no pretrained weights; families with weights: "
                f"{[n for n, f in MODELS.items() if f.pretrained is not None]}"
            )
        return family.pretrained(**kwargs)
    if not timm.is_model(model_name):
        raise ConfigError(
            f"unknown model_name={model_name!r}: not a timm model nor one of {list(MODELS)} "
            "(timm.list_models('deit*') lists DeiT variants)"
        )
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)


def paper_model(
    model_name: str,
    ratio: float = 0.0,
    *,
    seed: int = 0,
    round_to: int | None = 2,
    prune_heads: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """The benchmark model of the sweep and the latency benchmarks: ``model_name`` with random weights
    (seeded), in eval mode, with ``ratio`` of its channels removed by one L2-magnitude pruning step
    (on random weights every criterion gives the same structure; only the shapes matter for speed).
    ``prune_heads``: remove whole attention heads (each kept head keeps its head dim) instead of
    dimensions inside every head.
    """
    torch.manual_seed(seed)
    model = create_vit(model_name, **kwargs).eval()
    if ratio > 0:
        prune_once(
            model,
            PruningConfig(
                importance="l2",
                pruning_ratio=ratio,
                round_to=round_to,
                prune_num_heads=prune_heads,
                prune_head_dims=not prune_heads,
            ),
        )
    return model


def _vit_kwargs(blob: dict[str, Any]) -> dict[str, Any]:
    """VisionTransformer arguments from the checkpoint's ``config`` (dim/depth/heads + recipe keys)."""
    cfg, shape = blob["config"], list(blob.get("input", [1, 32, 32]))
    try:
        return dict(
            img_size=int(shape[-1]),
            in_chans=int(shape[0]),
            patch_size=int(cfg.get("patch_size", 4)),
            num_classes=int(cfg.get("num_classes", 10)),
            embed_dim=int(cfg["dim"]),
            depth=int(cfg["depth"]),
            num_heads=int(cfg["heads"]),
        )
    except KeyError as exc:
        raise ConfigError(f"checkpoint config {cfg} lacks {exc}; expected dim, depth and heads") from exc


def load_vit_checkpoint(path: str | Path) -> tuple[VisionTransformer, dict[str, Any]]:
    """Load a checkpoint in the ``vit_tiny_fmnist.pt`` format: ``{config, state_dict, input,
    normalize, pad}``. Returns the float32 model (eval mode) and the metadata without weights."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"ViT checkpoint {str(path)!r} does not exist")
    blob = load_tensors(path, "checkpoint")
    if (
        not isinstance(blob, dict)
        or not isinstance(blob.get("config"), dict)
        or not isinstance(blob.get("state_dict"), dict)
    ):
        raise ConfigError(
            f"{path} is not a ViT checkpoint in the vit_tiny_fmnist.pt format (expected a dict with "
            "'config' and 'state_dict')"
        )
    try:
        model = VisionTransformer(**_vit_kwargs(blob))
        model.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
    except (TypeError, KeyError, RuntimeError, AttributeError) as exc:
        raise ConfigError(f"{path}: its config and weights do not make a ViT ({first_line(exc)})") from None
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model.eval(), meta


def save_vit_checkpoint(
    model: VisionTransformer, path: str | Path, recipe: dict[str, Any] | None = None, **meta: Any
) -> Path:
    """Write an unpruned timm ``VisionTransformer`` in the ``vit_tiny_fmnist.pt`` format (float16
    weights), atomically. ``recipe`` (epochs, lr, ...) is stored beside dim/depth/heads in ``config``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pe = model.patch_embed
    config = {
        "dim": model.embed_dim,
        "depth": len(model.blocks),
        "heads": model.blocks[0].attn.num_heads,  # type: ignore[union-attr]
        "patch_size": pe.patch_size[0],
        "num_classes": model.num_classes,
        **(recipe or {}),
    }
    shape = [pe.proj.in_channels, *pe.img_size]
    blob = {
        "config": config,
        "input": shape,
        **meta,
        "state_dict": {k: v.detach().half().cpu() for k, v in model.state_dict().items()},
    }
    with staged(path) as tmp:
        torch.save(blob, tmp)
    return path
