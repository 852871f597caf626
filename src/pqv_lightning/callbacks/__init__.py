"""Lightning callbacks of pqv-lightning."""

from .mobile_export import MobileExport
from .structured_pruning import CHECKPOINT_KEY, StructuredPruning

__all__ = ["CHECKPOINT_KEY", "MobileExport", "StructuredPruning"]
