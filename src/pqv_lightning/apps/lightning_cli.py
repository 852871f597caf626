"""LightningCLI for the plugin: ``pqv fit --config x.yaml`` (configs in ``examples/configs/``).

The model is :class:`~pqv_lightning.classifier.ImageClassifier` (any timm model by name, or a
Fashion-MNIST ViT checkpoint); the data is any LightningDataModule subclass
(``pqv_lightning.data.FashionMNISTDataModule``, ``pqv_lightning.data.ImageFolderDataModule``...);
the plugin's callbacks go under ``trainer.callbacks`` as ``class_path: pqv_lightning.StructuredPruning``.
"""

from __future__ import annotations

import logging
import warnings
from argparse import ArgumentError
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from ..classifier import ImageClassifier
from ..errors import ConfigError, InputNotFoundError
from ..settings import logger_levels

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


def _check_config_files(args: list[str]) -> None:
    """Every ``--config`` / ``-c`` file exists and is UTF-8 text (YAML), before LightningCLI reads it."""
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        if not Path(path).is_file():
            raise InputNotFoundError(f"--config {path}: no such file")
        try:
            Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--config {path}: not a YAML text file (byte {exc.start} is not UTF-8)") from None


def run_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """LightningCLI; a value a class refused while the config was instantiated (e.g. a callback's
    ``importance='fisher'``) surfaces as that :class:`ConfigError`, which ``pqv`` prints as one line."""
    _check_config_files(args or [])
    try:
        # exit_on_error=False: a parse error is raised (one line from pqv) instead of printing the usage.
        # ``pqv fit`` passes sys.argv on as args, which LightningCLI warns about: our doing, not the user's.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
        # the seed LightningCLI sets is in the saved config.yaml; its two log lines would come before a
        # one-line error of the config (the seed is set before the classes are instantiated)
        warnings.filterwarnings("ignore", message="No seed found, seed set to")
        with logger_levels(["lightning.fabric.utilities.seed"], logging.WARNING):
            return LightningCLI(
                ImageClassifier,
                save_config_kwargs={"overwrite": True},
                args=args,
                run=run,
                subclass_mode_data=True,
                parser_kwargs={"exit_on_error": False},
            )
    except ArgumentError as exc:
        raise ConfigError(" ".join(str(exc).split())) from exc
    except ValueError as exc:
        refused = _config_error_in(exc)
        if refused is None:
            raise
        raise refused from exc
