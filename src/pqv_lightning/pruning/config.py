"""What to prune and how: :class:`PruningConfig` (every option's default, allowed values and
documentation live here; ``StructuredPruning`` and the apps are built from it), the ratio schedules
and the budget value check."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..checks import check_bool, check_choice, check_int, check_number
from ..errors import ConfigError
from ..widths import WIDTH_RULE_DEFAULTS
from .importance import IMPORTANCE
from .reconstruction import check_ridge
from .sparsity import check_threshold

__all__ = [
    "DEFAULT_PRUNING_RATIO",
    "RATIO_SCHEDULES",
    "RECONSTRUCT_LAYERS",
    "PruningConfig",
    "check_budget_value",
    "cubic_schedule",
    "linear_schedule",
]


def linear_schedule(ratio: float, steps: int) -> list[float]:
    """Cumulative target after event k (k = 0..steps): ``ratio * k / steps``."""
    return [ratio * k / steps for k in range(steps + 1)]


def cubic_schedule(ratio: float, steps: int) -> list[float]:
    """Cumulative target after event k: ``ratio * (1 - (1 - k / steps) ** 3)`` (gradual pruning)."""
    return [ratio * (1 - (1 - k / steps) ** 3) for k in range(steps + 1)]


RATIO_SCHEDULES = {"linear": linear_schedule, "cubic": cubic_schedule}

#: ``PruningConfig.reconstruct_layers`` -> the :class:`ModelAdapter` method that names those layers
RECONSTRUCT_LAYERS = {"all": "reconstruction_layers", "residual": "residual_writers"}
#: the channel ratio of a :class:`PruningConfig` that sets neither a ratio nor a budget
DEFAULT_PRUNING_RATIO = 0.25


@dataclass
class PruningConfig:
    """What to prune and how (Torch-Pruning semantics).

    Args:
        importance: a name in :data:`~pqv_lightning.pruning.importance.IMPORTANCE`: ``"taylor"``,
            ``"hessian"`` (gradient statistics), ``"l1"``, ``"l2"`` (group weight magnitude),
            ``"random"``, or one you registered.
        pruning_ratio: final fraction of channels removed from every prunable dimension (embedding
            width, head dims, MLP hidden), in ``[0, 1)``. Parameters shrink roughly by
            ``(1 - ratio)^2``. Unset (``None``): 0.25, or derived from the budget.
        target_macs, target_params: a budget instead of a ratio (give one, and no ``pruning_ratio``):
            the final model's MACs / parameters, as a fraction of the unpruned model when < 1, else
            absolute. The pruner derives the channel ratio from it before the first event
            (:func:`ratio_for_budget`, a few pruning passes on copies) and the last event lands on the
            budget within one channel group; with ``global_pruning=True`` every event's ratio is settled
            on copies with that event's scores (needs a deterministic criterion).
        iterative_steps: number of pruning events; the ratio grows linearly to its final value.
        prune_num_heads: remove whole attention heads. Unset (``None``): ``False``, or what
            an export target's preference
            (:func:`pqv_lightning.widths.width_rule`).
        head_pruning_ratio: final fraction of heads removed when ``prune_num_heads`` (defaults to
            ``pruning_ratio``).
        prune_head_dims: remove dimensions inside every head (all heads keep equal ``head_dim``).
            Unset (``None``): ``True``, or what an export target's preference
            (:func:`pqv_lightning.widths.width_rule`).
        round_to: keep channel counts multiples of this (e.g. 8 for SIMD/tensor-core friendly shapes).
        ignored_layers: dotted module names or glob patterns (relative to the pruned model) whose
            output channels are never pruned. ``None`` means the classifier head(s).
        global_pruning: rank channels across layers instead of the same ratio per layer.
        seed: seed of the ``random`` criterion.
        ratio_schedule: how the cumulative ratio grows over the events: ``"linear"`` (equal steps,
            Torch-Pruning's default) or ``"cubic"`` (Zhu & Gupta 2017: large steps first, small ones
            late, ``r_k = r (1 - (1 - k/n)^3)``).
        threshold: threshold mode, alongside the ratio: at every event, after the ratio's removals,
            also remove the units (channels with every coupled weight, see
            :mod:`pqv_lightning.pruning.sparsity`) whose L2 norm is below ``threshold`` times the mean unit
            norm of their group, e.g. ``0.05``; in ``(0, 1)``. Meant for group-sparsity training,
            which drives units to zero. ``pruning_ratio=0`` leaves the threshold alone in charge.
        reconstruct: after every event, refit Linear layers by least squares, in forward order, so
            that the pruned network reproduces the one before the event on calibration inputs
            (:mod:`pqv_lightning.pruning.reconstruction`); the event then needs ``calibration``
            batches (:meth:`StructuredPruner.step`).
        reconstruct_layers: which layers: ``"all"`` (every Linear the model adapter names, a ViT's
            ``qkv``, ``proj``, ``fc1``, ``fc2`` and the classifier head) or ``"residual"`` (only the
            layers that write into the residual stream, ``proj`` and ``fc2``). On the bundled
            Fashion-MNIST ViT, one-shot 25 % / 50 % channels without training: 88.9 % / 80.4 % with
            ``"residual"``, 90.5 % / 90.0 % with ``"all"`` (unpruned 90.9 %;
            ``benchmarks/reconstruction_probe.py``).
        reconstruct_ridge: the ridge of that fit, relative to the mean diagonal of ``XᵀX``.
        group_widths: a width per coupled group instead of one ratio for all: ``{group name: units kept
            after the last event}`` (a group is named by its root layer and direction, e.g.
            ``"blocks.0.mlp.fc1:out"``; an attention group's units are its head dims, kept equal in every
            head; groups not named keep their width). Usually the result of a latency allocation
            (:func:`pqv_lightning.latency_budget.widths_for_latency`); every event moves each group's
            width the schedule's share of the way, removing its least important units by the criterion.
            Not with ``pruning_ratio``, a budget, ``global_pruning`` or ``prune_num_heads``.
    """

    importance: str = "taylor"
    pruning_ratio: float | None = None
    iterative_steps: int = 1
    prune_num_heads: bool | None = None
    head_pruning_ratio: float | None = None
    prune_head_dims: bool | None = None
    round_to: int | None = None
    ignored_layers: list[str] | None = None
    global_pruning: bool = False
    seed: int = 0
    ratio_schedule: str = "linear"
    threshold: float | None = None
    reconstruct: bool = False
    reconstruct_layers: str = "all"
    reconstruct_ridge: float = 1e-3
    target_macs: float | None = None
    target_params: float | None = None
    group_widths: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if self.pruning_ratio is None and not self.budget and self.group_widths is None:
            self.pruning_ratio = DEFAULT_PRUNING_RATIO
        for name, default in WIDTH_RULE_DEFAULTS.items():
            if getattr(self, name) is None:  # unset: the default (an export target's preference comes in
                setattr(self, name, default)  # from the caller: ``width_rule``)

    def validate(self) -> None:
        check_choice("ratio_schedule", self.ratio_schedule, sorted(RATIO_SCHEDULES))
        if not isinstance(self.importance, str):
            raise ConfigError(
                f"importance={self.importance!r} must be a registered name; allowed: {IMPORTANCE.names()}"
            )
        IMPORTANCE.check(self.importance)
        for name in (*WIDTH_RULE_DEFAULTS, "global_pruning", "reconstruct"):
            check_bool(name, getattr(self, name))
        budget = self.budget
        if len(budget) > 1:
            raise ConfigError(f"give one budget, not both: {budget}")
        for name, value in budget.items():
            check_budget_value(name, value)
            if self.pruning_ratio is not None:
                raise ConfigError(
                    f"give a pruning_ratio ({self.pruning_ratio!r}) or a budget ({name}={value!r}), not both"
                )
            if self.global_pruning and not IMPORTANCE[self.importance].deterministic:
                raise ConfigError(
                    f"a budget ({name}={value!r}) with global_pruning=True needs a deterministic "
                    f"criterion, not importance={self.importance!r}"
                )
        if self.group_widths is not None:
            self._check_group_widths()
        elif not budget:
            _check_ratio("pruning_ratio", self.pruning_ratio)
        if self.head_pruning_ratio is not None:
            _check_ratio("head_pruning_ratio", self.head_pruning_ratio)
            if not self.prune_num_heads:
                raise ConfigError(
                    f"head_pruning_ratio={self.head_pruning_ratio!r} has no effect with "
                    "prune_num_heads=False; allowed: prune_num_heads=True, or no head_pruning_ratio"
                )
        check_int("iterative_steps", self.iterative_steps, minimum=1)
        if self.round_to is not None:
            check_int("round_to", self.round_to, minimum=1)
        check_int("seed", self.seed)
        if self.ignored_layers is not None and (
            not isinstance(self.ignored_layers, (list, tuple))
            or not all(isinstance(n, str) for n in self.ignored_layers)
        ):
            raise ConfigError(
                f"ignored_layers={self.ignored_layers!r} must be None or a list of module names or glob "
                "patterns, e.g. ['head', 'blocks.0.*']"
            )
        if self.threshold is not None:
            check_threshold(self.threshold)
        check_choice("reconstruct_layers", self.reconstruct_layers, list(RECONSTRUCT_LAYERS))
        check_ridge(self.reconstruct_ridge, "reconstruct_ridge")

    def _check_group_widths(self) -> None:
        widths = self.group_widths
        if not isinstance(widths, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1 for k, v in widths.items()
        ):
            raise ConfigError(
                f"group_widths={widths!r} must be a dict of group name -> units kept (an int >= 1), e.g. "
                "{'blocks.0.mlp.fc1:out': 512}"
            )
        given = {
            "pruning_ratio": self.pruning_ratio,
            **self.budget,
            "global_pruning": self.global_pruning or None,
            "prune_num_heads": self.prune_num_heads or None,
        }
        clash = {k: v for k, v in given.items() if v is not None}
        if clash:
            raise ConfigError(f"group_widths sets every group's width: give it or {clash}, not both")

    def layers_to_refit(self, adapter: Any, model: Any) -> list[str]:
        """The Linear layers ``reconstruct`` refits in ``model``, as its adapter names them
        (``reconstruct_layers``: :data:`RECONSTRUCT_LAYERS`)."""
        return list(getattr(adapter, RECONSTRUCT_LAYERS[self.reconstruct_layers])(model))

    def structure_trial(self, ratio: float = 0.0) -> PruningConfig:
        """This configuration's structure at channel ``ratio``, for trials on copies of the model (the
        budget and latency searches): one event by L2 magnitude, uniform allocation, no threshold, no
        reconstruction. With uniform allocation the widths depend on the ratio alone, so a trial needs
        neither gradient statistics nor calibration data."""
        return dataclasses.replace(
            self,
            pruning_ratio=ratio,
            target_macs=None,
            target_params=None,
            group_widths=None,
            iterative_steps=1,
            importance="l2",
            global_pruning=False,
            threshold=None,
            reconstruct=False,
        )

    @property
    def budget(self) -> dict[str, float]:
        """``{"target_macs": x}``, ``{"target_params": x}`` or ``{}``: the budgets that are set."""
        return {
            k: v for k, v in (("target_macs", self.target_macs), ("target_params", self.target_params)) if v is not None
        }

    @property
    def effective_head_ratio(self) -> float:
        if not self.prune_num_heads:
            return 0.0
        ratio = self.pruning_ratio if self.head_pruning_ratio is None else self.head_pruning_ratio
        return ratio or 0.0


def _check_ratio(name: str, value: Any) -> None:
    check_number(name, value, minimum=0, maximum=1, max_open=True)


def check_budget_value(name: str, value: Any) -> None:
    """A MAC / parameter budget is a finite number > 0 (a fraction when < 1, else absolute)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{name}={value!r} is out of range; allowed: a fraction in (0, 1) of the unpruned model "
            "or an absolute count"
        )
