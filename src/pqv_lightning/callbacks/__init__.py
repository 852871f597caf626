"""Lightning callbacks of pqv-lightning."""

from .distillation import KnowledgeDistillation
from .mobile_export import MobileExport
from .qat import QuantizationAwareTraining
from .structured_pruning import CHECKPOINT_KEY, StructuredPruning

__all__ = ["CHECKPOINT_KEY", "KnowledgeDistillation", "MobileExport", "QuantizationAwareTraining", "StructuredPruning"]
