"""Structured pruning without Lightning: the pruner, importance criteria, group sparsity, the
optimizer remap, model adapters and checkpoint restore.

Modules (each usable on its own, none imports Lightning):

* :mod:`.pruner` — :class:`StructuredPruner`, :func:`prune_once`, :class:`PruningConfig`, events,
  schedules, budgets, MAC/parameter counts, :func:`restore_structure`;
* :mod:`.importance` — the criteria registry (:data:`IMPORTANCE`) and :class:`GradientStatistics`;
* :mod:`.sparsity` — group-lasso regularization over dependency groups;
* :mod:`.reconstruction` — least-squares refit of the residual-writing layers after an event;
* :mod:`.optim` — carrying optimizer state across a pruning step;
* :mod:`.adapters` — what the pruner needs to know about a model family (:data:`ADAPTERS`);
  :mod:`.adapters_hf` — the Hugging Face ``transformers`` families, registered by class name;
* :mod:`.tp_fixes` — a Torch-Pruning fix that acts inside its dependency graph (channel chunks);
* :mod:`.checkpoint` — rebuilding a pruned module from a checkpoint.
"""

from . import adapters_hf  # noqa: F401 - registers the Hugging Face adapters (by class name)
from .pruner import (
    PruningConfig,
    PruningEvent,
    StructuredPruner,
    check_budget_value,
    count_macs,
    count_params,
    cubic_schedule,
    linear_schedule,
    prune_once,
    ratio_for_budget,
    restore_structure,
)
from .reconstruction import LayerFit, reconstruct_linears

__all__ = [
    "LayerFit",
    "PruningConfig",
    "PruningEvent",
    "StructuredPruner",
    "check_budget_value",
    "count_macs",
    "count_params",
    "cubic_schedule",
    "linear_schedule",
    "prune_once",
    "ratio_for_budget",
    "reconstruct_linears",
    "restore_structure",
]
