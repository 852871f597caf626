"""LightningCLI for the plugin: ``pqv fit --config x.yaml`` (configs in ``examples/configs/``).

The model is :class:`~pqv_lightning.models.ImageClassifier` (any timm model by name, or a
Fashion-MNIST ViT checkpoint); the data is any LightningDataModule subclass
(``pqv_lightning.data.FashionMNISTDataModule``, ``pqv_lightning.data.ImageFolderDataModule``...);
the plugin's callbacks go under ``trainer.callbacks`` as ``class_path: pqv_lightning.StructuredPruning``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from ..models import ImageClassifier

__all__ = ["run_cli"]


def run_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(ImageClassifier, save_config_kwargs={"overwrite": True}, args=args, run=run,
                        subclass_mode_data=True)
