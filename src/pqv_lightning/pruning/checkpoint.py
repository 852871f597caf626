"""Loading checkpoints of pruned models.

A checkpoint written while :class:`~pqv_lightning.StructuredPruning` was active holds the pruned
``state_dict`` *and* ``checkpoint["pqv_structured_pruning"]``: the pruning history, head counts and
the dotted path of the pruned network. ``LightningModule.load_from_checkpoint`` alone fails, since
``__init__`` builds the original, unpruned shapes. :func:`load_pruned_checkpoint` first replays the
structure on the freshly built network, then loads the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
from torch import nn

from ..errors import ConfigError, InputNotFoundError
from .adapters import locate_model
from .pruner import restore_structure

__all__ = ["CHECKPOINT_KEY", "check_checkpoint_shapes", "load_pruned_checkpoint", "restore_pruned_module"]

#: Top-level checkpoint key holding the pruned structure (written for weights-only checkpoints too).
CHECKPOINT_KEY = "pqv_structured_pruning"

M = TypeVar("M", bound=pl.LightningModule)


def restore_pruned_module(module: nn.Module, checkpoint: dict[str, Any]) -> nn.Module:
    """Reshape ``module`` (freshly built, unpruned) to the structure stored in ``checkpoint``.

    A no-op for checkpoints without pruning state whose shapes match ``module``. Use it in your own
    loading code before ``module.load_state_dict(checkpoint["state_dict"])``.

    Raises:
        ValueError: the checkpoint has no pruning state but its tensor shapes differ from ``module``
            (it was saved from a pruned model without the structure, or belongs to another model).
    """
    state = checkpoint.get(CHECKPOINT_KEY)
    if not state or not state.get("history"):
        check_checkpoint_shapes(module, checkpoint)
        return module
    _, model, adapter = locate_model(module, state.get("model_attr") or None)
    restore_structure(model, state, adapter)
    return module


def check_checkpoint_shapes(module: nn.Module, checkpoint: dict[str, Any], limit: int = 3) -> None:
    """Raise one clear ``ValueError`` when ``checkpoint["state_dict"]`` has tensors whose shapes differ
    from ``module``'s and the checkpoint holds no pruned structure that would explain them.

    Names missing on either side are left to ``load_state_dict``'s own ``strict`` handling.
    """
    if checkpoint.get(CHECKPOINT_KEY):
        return
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, dict):
        return
    current = module.state_dict()
    diff = [(k, tuple(v.shape), tuple(current[k].shape)) for k, v in saved.items()
            if k in current and hasattr(v, "shape") and tuple(v.shape) != tuple(current[k].shape)]
    if diff:
        shown = "; ".join(f"{k}: checkpoint {list(a)} vs module {list(b)}" for k, a, b in diff[:limit])
        more = f" (and {len(diff) - limit} more)" if len(diff) > limit else ""
        raise ConfigError(
            f"the checkpoint's weights have other shapes than {type(module).__name__} in {len(diff)} tensors "
            f"({shown}{more}), and the checkpoint has no {CHECKPOINT_KEY!r} entry that would rebuild a pruned "
            "structure: it was saved from a pruned model without StructuredPruning in the Trainer (or by an older "
            "pqv-lightning), or it belongs to another model. Save it again with StructuredPruning in the Trainer, "
            "or build a module of the checkpoint's shapes"
        )


@contextlib.contextmanager
def _pre_load_hook(module_class: type[pl.LightningModule]) -> Iterator[None]:
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
