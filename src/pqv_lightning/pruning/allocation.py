"""A width per coupled group, allocated to meet a cost budget at the least loss of importance.

Uniform allocation removes the same share of every group's channels. Here each group (the embedding
width, every block's head dims, every block's MLP hidden units) gets its own width: starting from
the unpruned model, the allocator repeatedly narrows the group whose next step costs the least
importance per unit of cost saved (latency, as predicted by a :class:`WidthCostModel`), until the
predicted cost meets the budget (HALP-style greedy allocation, Shen et al. 2022).

* **Importance of a unit** (:func:`removal_costs`): the squared L2 norm of every weight coupled to
  it (:func:`~pqv_lightning.pruning.sparsity.unit_norms`), divided by its group's mean, times the
  number of those weights relative to the mean unit of all groups. A unit of average strength thus
  costs what it weighs: removing one embedding channel (which every layer reads) costs far more than
  removing one MLP unit, and inside a group the weakest go first.
* **Cost of a width** (:class:`WidthCostModel`): every Linear layer's cost as a function of its
  input and output widths (a table measured on the target runtime, interpolated bilinearly), plus
  the rest of the network (attention products, norms, the runtime's overhead: ``rest``), which is
  calibrated so that the model predicts whole-network measurements.

Pure functions: no export, no timing (:mod:`pqv_lightning.latency_budget` measures the table).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..outputs import main_tensor
from ..widths import head_width_step
from .reconstruction import rows_per_input
from .sparsity import CoupledGroup, unit_norms

__all__ = [
    "CostTables",
    "LinearSite",
    "WidthCostModel",
    "allocate_widths",
    "fisher_diagonal",
    "group_levels",
    "linear_sites",
    "removal_costs",
]

#: a layer shape ``(tokens, in, out)`` -> its costs on a grid: ``(fractions_in, fractions_out, ms[i][j])``
CostTables = dict[tuple[int, int, int], tuple[list[float], list[float], list[list[float]]]]

#: at most this many widths per group the allocator chooses from (a step of 1/32 of the group)
LEVELS = 32


@dataclass(frozen=True)
class LinearSite:
    """A Linear layer as widths see it: ``tokens`` rows per call, its widths, and the groups whose units
    set them (``*_per_unit`` features per unit; ``None``: not pruned)."""

    name: str
    tokens: int
    in_features: int
    out_features: int
    in_group: str | None = None
    in_per_unit: int = 0
    out_group: str | None = None
    out_per_unit: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(tokens, in_features, out_features)`` of the unpruned layer: the key of its cost table."""
        return (self.tokens, self.in_features, self.out_features)

    def widths(self, kept: Mapping[str, int], units: Mapping[str, int]) -> tuple[int, int]:
        """Input and output width when every group keeps ``kept`` of its ``units``."""
        w_in, w_out = self.in_features, self.out_features
        if self.in_group is not None:
            w_in -= self.in_per_unit * (units[self.in_group] - kept[self.in_group])
        if self.out_group is not None:
            w_out -= self.out_per_unit * (units[self.out_group] - kept[self.out_group])
        return w_in, w_out


@torch.no_grad()
def linear_sites(model: nn.Module, groups: Sequence[CoupledGroup], example: torch.Tensor) -> list[LinearSite]:
    """Every Linear layer of ``model``, the rows it sees per call on ``example`` (batch 1) and the groups
    (of ``groups``, the model's current structure) that set its widths."""
    rows = rows_per_input(model, example)
    by_param: dict[tuple[int, int], tuple[str, int]] = {}  # (id(weight), dim) -> (group, features per unit)
    for g in groups:
        for s in g.slices:
            if s.dim in (0, 1) and s.param.dim() == 2:
                by_param[id(s.param), s.dim] = (g.name, len(s.idxs) // g.n_units)
    sites = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name not in rows:
            continue
        out_g = by_param.get((id(module.weight), 0))
        in_g = by_param.get((id(module.weight), 1))
        sites.append(
            LinearSite(
                name,
                rows[name],
                module.in_features,
                module.out_features,
                in_g[0] if in_g else None,
                in_g[1] if in_g else 0,
                out_g[0] if out_g else None,
                out_g[1] if out_g else 0,
            )
        )
    return sites


def fisher_diagonal(
    model: nn.Module, batches: Sequence[torch.Tensor], *, micro_batch: int = 8, seed: int = 0
) -> dict[int, torch.Tensor]:
    """The diagonal of the Fisher information of ``model``'s predictive distribution on ``batches`` of
    inputs, no labels needed: labels are drawn from the model's own softmax (a fixed ``seed``), and
    the squared gradients of micro-batches of ``micro_batch`` inputs are averaged. ``{id(parameter):
    tensor}``; the model's ``.grad`` and mode are left as they were (gradients cleared)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            for x in batch.split(micro_batch):
                model.zero_grad(set_to_none=True)
                logits = main_tensor(model(x))
                if logits is None:
                    raise ValueError(f"fisher_diagonal: {type(model).__name__} returned no logits")
                logits = logits.float()
                with torch.no_grad():
                    labels = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).squeeze(1)
                torch.nn.functional.cross_entropy(logits, labels.to(logits.device), reduction="sum").backward()
                for p in params:
                    if p.grad is not None:
                        total[id(p)] += p.grad.detach().float().square() / len(x)
                count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {k: v / max(1, count) for k, v in total.items()}


@torch.no_grad()
def removal_costs(
    groups: Sequence[CoupledGroup], fisher: Mapping[int, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Per group, the importance each unit's removal costs, weakest first (see the module docstring).

    With ``fisher`` (:func:`fisher_diagonal` of the same parameters), a unit costs its OBD saliency
    ``1/2 sum F w^2`` over every coupled weight: the loss increase its removal is expected to cause,
    in the same units for every group."""
    if fisher is not None:
        out = {}
        for g in groups:
            total = torch.zeros(g.n_units)
            for s in g.slices:
                f = fisher.get(id(s.param))
                if f is None:
                    continue
                weighted = (f.to(s.param.device) * s.param.detach().float().square()).cpu()
                part = weighted if s.whole else weighted.index_select(s.dim, s.idxs.cpu())
                other = tuple(d for d in range(part.dim()) if d != s.dim)
                entries = part.sum(other) if other else part
                total.index_add_(0, s.units.cpu(), entries)
            out[g.name] = torch.sort(total / 2).values
        return out
    sizes = {g.name: sum(len(s.idxs) * (s.param.numel() // s.param.shape[s.dim]) for s in g.slices) for g in groups}
    per_unit = {g.name: sizes[g.name] / g.n_units for g in groups}
    mean_size = sum(sizes.values()) / max(1, sum(g.n_units for g in groups))
    out = {}
    for g in groups:
        energy = unit_norms(g, "l2").detach().float().cpu() ** 2
        mean = float(energy.mean())
        relative = energy / mean if mean > 0 else torch.ones_like(energy)
        out[g.name] = torch.sort(relative * (per_unit[g.name] / mean_size)).values
    return out


def group_levels(group: CoupledGroup, round_to: int | None, min_share: float) -> list[int]:
    """The widths (units kept) the allocator may give ``group``, widest first: multiples of its width
    step (``round_to`` over its heads), at most :data:`LEVELS` of them, none below ``min_share`` of
    its units (nor below one step)."""
    step = head_width_step(round_to or 1, group.heads)
    floor = max(step, math.ceil(group.n_units * min_share / step) * step)
    stride = max(1, math.ceil((group.n_units - floor) / step / LEVELS)) * step
    levels = [group.n_units]
    width = (group.n_units - stride) // step * step
    while width >= floor:
        levels.append(width)
        width -= stride
    return levels


@dataclass
class WidthCostModel:
    """Predicted cost (ms) of the network when every group keeps a given number of units.

    ``tables`` maps a layer shape ``(tokens, in, out)`` to measured costs on a grid of kept fractions
    ``(fractions_in, fractions_out, ms[i][j])``; a layer's cost is interpolated bilinearly in its
    kept fractions (a fixed width has fraction 1). ``rest`` is ``(a, b)``: everything else costs
    ``a + b * f``, with ``f`` the kept share of all prunable channels (:meth:`calibrate`).
    """

    sites: list[LinearSite]
    units: dict[str, int]
    heads: dict[str, int]
    tables: CostTables
    rest: tuple[float, float] = (0.0, 0.0)
    _channels: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        missing = sorted({s.shape for s in self.sites} - set(self.tables))
        if missing:
            raise ConfigError(f"WidthCostModel: no cost table for layer shapes {missing}")
        self._channels = sum(n * self.heads[g] for g, n in self.units.items())

    def kept_share(self, kept: Mapping[str, int]) -> float:
        return sum(kept[g] * self.heads[g] for g in self.units) / max(1, self._channels)

    def layers(self, kept: Mapping[str, int]) -> float:
        """What the Linear layers cost at ``kept``."""
        total = 0.0
        for s in self.sites:
            w_in, w_out = s.widths(kept, self.units)
            f_in, f_out, ms = self.tables[s.shape]
            total += _bilinear(f_in, f_out, ms, w_in / s.in_features, w_out / s.out_features)
        return total

    def predict(self, kept: Mapping[str, int]) -> float:
        a, b = self.rest
        return self.layers(kept) + a + b * self.kept_share(kept)

    def calibrate(self, measured: Sequence[tuple[Mapping[str, int], float]]) -> None:
        """Fit ``rest`` so that the model predicts whole-network measurements ``(kept, ms)``: a line in
        the kept share by least squares (through two of them exactly), or a constant offset from one."""
        points = [(self.kept_share(k), ms - self.layers(k)) for k, ms in measured]
        if not points:
            raise ValueError("calibrate needs at least one measurement")
        mean_f = sum(f for f, _ in points) / len(points)
        mean_r = sum(r for _, r in points) / len(points)
        spread = sum((f - mean_f) ** 2 for f, _ in points)
        b = sum((f - mean_f) * (r - mean_r) for f, r in points) / spread if spread > 1e-12 else 0.0
        self.rest = (mean_r - b * mean_f, b)


def _bilinear(xs: Sequence[float], ys: Sequence[float], zs: Sequence[Sequence[float]], x: float, y: float) -> float:
    """Bilinear interpolation of ``zs[i][j]`` (at ``xs[i], ys[j]``, both ascending) at ``(x, y)``, linear
    extrapolation outside."""
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), max(len(xs) - 2, 0))
    j = min(max(bisect.bisect_right(ys, y) - 1, 0), max(len(ys) - 2, 0))
    if len(xs) == 1:
        tx, i1 = 0.0, i
    else:
        i1 = i + 1
        tx = (x - xs[i]) / (xs[i1] - xs[i])
    if len(ys) == 1:
        ty, j1 = 0.0, j
    else:
        j1 = j + 1
        ty = (y - ys[j]) / (ys[j1] - ys[j])
    low = zs[i][j] * (1 - tx) + zs[i1][j] * tx
    high = zs[i][j1] * (1 - tx) + zs[i1][j1] * tx
    return low * (1 - ty) + high * ty


def allocate_widths(
    levels: Mapping[str, Sequence[int]],
    costs: Mapping[str, torch.Tensor],
    predict: Callable[[Mapping[str, int]], float],
    target: float,
) -> dict[str, int]:
    """Units kept per group: from the widest level of every group, repeatedly move the group whose next
    level loses the least importance (``costs``: per group, each unit's removal cost, weakest first) per
    unit of predicted cost saved, until ``predict(kept) <= target``.

    Raises:
        ValueError: the narrowest levels still predict more than ``target`` (the message says how much).
    """
    kept = {g: int(v[0]) for g, v in levels.items()}
    position = dict.fromkeys(levels, 0)
    current = predict(kept)
    while current > target:
        best: tuple[float, str, float] | None = None
        for g, options in levels.items():
            nxt = position[g] + 1
            if nxt >= len(options):
                continue
            trial = {**kept, g: int(options[nxt])}
            cost = predict(trial)
            saving = current - cost
            if saving <= 0:
                continue
            start, stop = options[0] - kept[g], options[0] - options[nxt]
            loss = float(costs[g][start:stop].sum())
            if best is None or loss / saving < best[0]:
                best = (loss / saving, g, cost)
        if best is None:
            raise ValueError(f"the narrowest widths allowed predict {current:.4g}, above the target {target:.4g}")
        _, g, current = best
        position[g] += 1
        kept[g] = int(levels[g][position[g]])
    return kept
