"""Lightning callbacks of pqv-lightning."""

from .structured_pruning import CHECKPOINT_KEY, StructuredPruning

__all__ = ["CHECKPOINT_KEY", "StructuredPruning"]
