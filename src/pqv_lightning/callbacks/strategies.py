"""Which of Lightning's strategies a callback that changes the network's modules mid-fit can run under."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch import strategies as st

from ..errors import ConfigError

__all__ = ["refuse_sharding_strategies"]

SUPPORTED = "single device, 'ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true'"


def refuse_sharding_strategies(trainer: pl.Trainer, who: str, why: str) -> None:
    """Raise ConfigError, naming ``who`` and ``why``, for a strategy that shards or flattens parameters
    (FSDP, DeepSpeed, model parallel) or restores the checkpoint after its own setup."""
    refused = tuple(
        getattr(st, n) for n in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy") if hasattr(st, n)
    )
    strategy = trainer.strategy
    if isinstance(strategy, refused) or strategy.restore_checkpoint_after_setup:
        raise ConfigError(
            f"{who} does not support strategy {type(strategy).__name__}: it shards or flattens parameters, so {why}. "
            f"Supported: {SUPPORTED}"
        )
