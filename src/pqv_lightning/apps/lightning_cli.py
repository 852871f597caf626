"""LightningCLI for the plugin: ``pqv fit --config x.yaml`` (configs in ``examples/configs/``).

The model is :class:`~pqv_lightning.models.ImageClassifier` (any timm model by name, or a
Fashion-MNIST ViT checkpoint); the data is any LightningDataModule subclass
(``pqv_lightning.data.FashionMNISTDataModule``, ``pqv_lightning.data.ImageFolderDataModule``...);
the plugin's callbacks go under ``trainer.callbacks`` as ``class_path: pqv_lightning.StructuredPruning``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from ..errors import ConfigError
from ..models import ImageClassifier

__all__ = ["run_cli"]


def _config_error_in(exc: BaseException | None, seen: set[int] | None = None) -> ConfigError | None:
    """The first ConfigError in an exception's cause/context chain (jsonargparse wraps the errors a
    callback's constructor raises in its own ``ValueError``)."""
    seen = seen or set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """LightningCLI; a value a class refused while the config was instantiated (e.g. a callback's
    ``importance='fisher'``) surfaces as that :class:`ConfigError`, which ``pqv`` prints as one line."""
    try:
        return LightningCLI(ImageClassifier, save_config_kwargs={"overwrite": True}, args=args, run=run,
                            subclass_mode_data=True)
    except ValueError as exc:
        refused = _config_error_in(exc)
        if refused is None:
            raise
        raise refused from exc
