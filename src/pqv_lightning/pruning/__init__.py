"""Structured pruning without Lightning: the pruner, importance criteria, group sparsity, the
optimizer remap, model adapters and checkpoint restore.

Modules (each usable on its own, none imports Lightning):

* :mod:`.config` — :class:`PruningConfig` (every pruning option, once) and the ratio schedules;
* :mod:`.pruner` — :class:`StructuredPruner`, :func:`prune_once`, :func:`ratio_for_budget`,
  :func:`restore_structure`;
* :mod:`.events` — :class:`PruningEvent`;
* :mod:`.schedule` — :class:`EventSchedule`: when a training loop's events run;
* :mod:`.budget` — MAC / parameter counts and the budget's ratio search;
* :mod:`.importance` — the criteria registry (:data:`IMPORTANCE`) and :class:`GradientStatistics`;
* :mod:`.sparsity` — group-lasso regularization over dependency groups;
* :mod:`.reconstruction` — least-squares refit of the residual-writing layers after an event;
* :mod:`.optim` — carrying optimizer state across a pruning step;
* :mod:`.adapters` — what the pruner needs to know about a model family (:data:`ADAPTERS`);
  :mod:`.adapters_hf` — the Hugging Face ``transformers`` families, registered by class name;
* :mod:`.tp_fixes` — Torch-Pruning 1.6.1 fixes: channel chunks in its dependency graph, cumulative
  head pruning and ``round_to`` on head dims (:class:`~.tp_fixes.FixedBasePruner`);
* :mod:`.checkpoint` — rebuilding a pruned module from a checkpoint.
"""

from . import adapters_hf  # noqa: F401 - registers the Hugging Face adapters (by class name)
from .budget import count_macs, count_params
from .config import PruningConfig, check_budget_value, cubic_schedule, linear_schedule
from .events import PruningEvent
from .pruner import StructuredPruner, prune_once, ratio_for_budget, restore_structure
from .reconstruction import LayerFit, reconstruct_linears
from .schedule import EventSchedule

__all__ = [
    "EventSchedule",
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
