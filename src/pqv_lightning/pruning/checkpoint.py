"""Loading checkpoints of pruned models.

A checkpoint written while :class:`~pqv_lightning.StructuredPruning` was active holds the pruned
``state_dict`` *and* ``checkpoint["pqv_structured_pruning"]``: the pruning history, head counts and
the dotted path of the pruned network. ``LightningModule.load_from_checkpoint`` alone fails, since
``__init__`` builds the original, unpruned shapes. :func:`restore_pruned_module` replays the
structure on a freshly built network (no Lightning needed);
:func:`pqv_lightning.callbacks.checkpoint.load_pruned_checkpoint` wraps it around
``load_from_checkpoint``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from .adapters import locate_model
from .pruner import restore_structure

__all__ = ["CHECKPOINT_KEY", "check_checkpoint_shapes", "restore_pruned_module"]

#: Top-level checkpoint key holding the pruned structure (written for weights-only checkpoints too).
CHECKPOINT_KEY = "pqv_structured_pruning"


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
    diff = [
        (k, tuple(v.shape), tuple(current[k].shape))
        for k, v in saved.items()
        if k in current and hasattr(v, "shape") and tuple(v.shape) != tuple(current[k].shape)
    ]
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
