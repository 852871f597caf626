"""pqv-lightning: structured pruning, quantization and mobile export of Vision Transformers as
PyTorch Lightning callbacks.

The names below are imported on first use (PEP 562), so that ``import pqv_lightning.export.benchmark``
— what every latency worker process runs — does not pay for Lightning, timm and Torch-Pruning when it
only loads an exported file. ``from pqv_lightning import MobileExport`` works as before.
"""

from __future__ import annotations

from ._lazy import lazy_names
from ._version import __version__

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ("CHECKPOINT_KEY", "KnowledgeDistillation", "MobileExport", "QuantizationAwareTraining", "StructuredPruning"),
        "pqv_lightning.callbacks",
    ),
    **dict.fromkeys(("load_pruned_checkpoint", "restore_pruned_module"), "pqv_lightning.callbacks.checkpoint"),
    **dict.fromkeys(
        ("ModelAdapter", "find_adapter", "locate_model", "register_adapter"), "pqv_lightning.pruning.adapters"
    ),
    **dict.fromkeys(("MobileExportConfig", "export_mobile"), "pqv_lightning.export"),
    **dict.fromkeys(("distillation_loss", "frozen_teacher"), "pqv_lightning.distillation"),
    **dict.fromkeys(("GradientStatistics", "make_importance"), "pqv_lightning.pruning.importance"),
    **dict.fromkeys(("GroupSparsity", "add_sparsity_gradient", "coupled_groups"), "pqv_lightning.pruning.sparsity"),
    **dict.fromkeys(
        (
            "PruningConfig",
            "PruningEvent",
            "StructuredPruner",
            "count_macs",
            "count_params",
            "prune_once",
            "restore_structure",
        ),
        "pqv_lightning.pruning",
    ),
}

__all__ = [*_EXPORTS, "__version__"]

__getattr__, __dir__ = lazy_names(__name__, globals(), _EXPORTS)
