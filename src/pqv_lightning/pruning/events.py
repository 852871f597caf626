"""What one pruning event did: :class:`PruningEvent` (also what the callbacks log)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PruningEvent"]


@dataclass
class PruningEvent:
    """What one pruning event did."""

    index: int  # 1-based event number
    target_ratio: float  # cumulative channel ratio asked for at this event
    ratio_reached: float  # fraction of prunable output channels actually removed so far
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    seconds: float  # wall time of the structural change (scoring, removal, optimizer remap, reconstruction)
    widths: dict[str, list[int]] = field(default_factory=dict)  # layer -> [in, out] after the event
    heads: dict[str, int] = field(default_factory=dict)  # attention module -> heads after the event
    optimizer_params_remapped: int = 0
    statistics_steps: int = 0  # optimizer steps whose gradients scored this event (gradient criteria)
    statistics_samples: int = 0  # gradient evaluations folded in (micro-batches for hessian)
    removed_by_ratio: int = 0  # prunable channels (group root channels) the ratio rule removed at this event
    removed_by_threshold: int = 0  # ... and the threshold rule (threshold mode)
    # reconstruction: mean relative error of the refitted layers on the calibration inputs, before / after
    reconstruction_error_before: float | None = None
    reconstruction_error_after: float | None = None
    #: where the time went: ``budget`` (settling a global budget's ratio), ``reference`` (the frozen copy
    #: reconstruction fits against), ``score_and_remove`` (Torch-Pruning's step), ``threshold``,
    #: ``optimizer`` (state remap, attribute sync), ``reconstruction``, ``measure`` (MACs after the event,
    #: not part of ``seconds``); a phase that did not run is absent
    phase_seconds: dict[str, float] = field(default_factory=dict)

    def timing(self) -> str:
        """``"2.31 s: score_and_remove 1.20, reconstruction 0.95, ..."`` (largest phase first)."""
        parts = sorted(self.phase_seconds.items(), key=lambda kv: -kv[1])
        return f"{self.seconds:.2f} s" + (": " + ", ".join(f"{k} {v:.2f}" for k, v in parts) if parts else "")

    def metrics(self, prefix: str = "pruning/") -> dict[str, float]:
        extra = (
            {}
            if self.reconstruction_error_after is None
            else {
                f"{prefix}reconstruction_error_before": float(self.reconstruction_error_before or 0.0),
                f"{prefix}reconstruction_error_after": float(self.reconstruction_error_after),
            }
        )
        return {
            **extra,
            **{f"{prefix}seconds_{phase}": float(s) for phase, s in self.phase_seconds.items()},
            f"{prefix}event": float(self.index),
            f"{prefix}params": float(self.params_after),
            f"{prefix}macs": float(self.macs_after),
            f"{prefix}target_ratio": self.target_ratio,
            f"{prefix}ratio_reached": self.ratio_reached,
            f"{prefix}event_seconds": self.seconds,
            f"{prefix}removed_by_ratio": float(self.removed_by_ratio),
            f"{prefix}removed_by_threshold": float(self.removed_by_threshold),
        }
