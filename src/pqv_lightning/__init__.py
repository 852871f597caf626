"""pqv-lightning: structured pruning, quantization and mobile export of Vision Transformers as
PyTorch Lightning callbacks."""

from .callbacks import CHECKPOINT_KEY, KnowledgeDistillation, MobileExport, StructuredPruning
from .callbacks.checkpoint import load_pruned_checkpoint, restore_pruned_module
from .pruning.adapters import ModelAdapter, find_adapter, locate_model, register_adapter
from .export import MobileExportConfig, export_mobile
from .distillation import distillation_loss, frozen_teacher
from .pruning.importance import GradientStatistics, make_importance
from .pruning.sparsity import GroupSparsity, add_sparsity_gradient, coupled_groups
from .pruning.pruner import (
    PruningConfig,
    PruningEvent,
    StructuredPruner,
    count_macs,
    count_params,
    prune_once,
    restore_structure,
)

from ._version import __version__
from . import _compat

_compat.install()

__all__ = [
    "GroupSparsity",
    "add_sparsity_gradient",
    "coupled_groups",
    "CHECKPOINT_KEY",
    "KnowledgeDistillation",
    "distillation_loss",
    "frozen_teacher",
    "MobileExport",
    "MobileExportConfig",
    "export_mobile",
    "StructuredPruning",
    "load_pruned_checkpoint",
    "restore_pruned_module",
    "GradientStatistics",
    "ModelAdapter",
    "PruningConfig",
    "PruningEvent",
    "StructuredPruner",
    "count_macs",
    "count_params",
    "find_adapter",
    "locate_model",
    "make_importance",
    "prune_once",
    "register_adapter",
    "restore_structure",
    "__version__",
]
