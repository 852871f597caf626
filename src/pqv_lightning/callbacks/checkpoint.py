"""``load_from_checkpoint`` for pruned LightningModules (the Lightning side of
:mod:`pqv_lightning.pruning.checkpoint`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl

from ..errors import InputNotFoundError
from ..pruning.checkpoint import CHECKPOINT_KEY, check_checkpoint_shapes, restore_pruned_module

__all__ = ["CHECKPOINT_KEY", "check_checkpoint_shapes", "load_pruned_checkpoint", "restore_pruned_module"]

M = TypeVar("M", bound=pl.LightningModule)


@contextlib.contextmanager
def _pre_load_hook(module_class: type[pl.LightningModule]) -> Iterator[None]:
    # load_from_checkpoint builds the module (unpruned shapes) and then calls on_load_checkpoint before
    # load_state_dict: the one moment to reshape it. The hook goes on the class because the instance
    # does not exist before; it is removed again when the load returns.
    had_own = "on_load_checkpoint" in module_class.__dict__
    original = module_class.on_load_checkpoint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_pruned_module(self, checkpoint)
        original(self, checkpoint)

    module_class.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had_own:
            module_class.on_load_checkpoint = original  # type: ignore[method-assign]
        else:
            del module_class.on_load_checkpoint


def load_pruned_checkpoint(module_class: type[M], checkpoint_path: str | Path, **kwargs: Any) -> M:
    """``module_class.load_from_checkpoint(checkpoint_path, **kwargs)`` that understands pruned shapes.

    Works with full and weights-only checkpoints written under :class:`StructuredPruning`, and with
    ordinary checkpoints (then it is exactly ``load_from_checkpoint``). ``kwargs`` go to
    ``load_from_checkpoint`` (``map_location``, ``strict``, hyper-parameter overrides, ...).

    Example::

        model = load_pruned_checkpoint(LitClassifier, "checkpoints/last.ckpt", map_location="cpu")
    """
    if not (isinstance(module_class, type) and issubclass(module_class, pl.LightningModule)):
        raise TypeError(f"module_class must be a LightningModule subclass, got {module_class!r}")
    if not Path(checkpoint_path).is_file():
        raise InputNotFoundError(f"checkpoint_path={str(checkpoint_path)!r} does not exist")
    with _pre_load_hook(module_class):
        return module_class.load_from_checkpoint(checkpoint_path, **kwargs)
