"""Measuring a network for a budget (MACs, parameters) and searching the channel ratio that meets one.

The search itself (:func:`search_ratio`) only sees a ``measure(ratio)`` callable; the pruner supplies
one that prunes a copy (:func:`pqv_lightning.pruning.ratio_for_budget`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["budget_measure", "count_macs", "count_params", "interpolate", "ratio_resolution", "search_ratio"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (matmuls, convs and attention; PyTorch's counter)."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example_inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops() // 2)


def budget_measure(model: nn.Module, name: str, example_inputs: torch.Tensor) -> int:
    """What a budget named ``name`` counts: MACs for ``target_macs``, else parameters."""
    return count_macs(model, example_inputs) if name == "target_macs" else count_params(model)


def ratio_resolution(model: nn.Module) -> float:
    """The step in channel ratio below which no layer's width can change: one channel of the widest layer."""
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    widths += [m.out_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return 1.0 / max(widths or [1])


def search_ratio(
    measure: Callable[[float], float],
    absolute: float,
    lo: float,
    lo_value: float,
    resolution: float,
    *,
    top: float = 0.99,
    max_passes: int = 8,
) -> tuple[float | None, float]:
    """The smallest ratio in ``(lo, top]`` whose ``measure`` (MACs / parameters after pruning a copy) is at
    most ``absolute``, to within ``resolution``, and the smallest measure seen; ``(None, smallest)``
    when none is found. ``lo`` (measure ``lo_value``) does not meet the budget.

    Every pruning pass is expensive, so trials are placed by interpolation, not bisection: MACs and
    parameters are close to a quadratic in the kept share ``k = 1 - ratio`` (products of two pruned
    widths, linear terms, and what is never pruned), fitted through the passes seen so far and solved
    for the budget; once the crossing is bracketed, a trial lands half a resolution step beyond the
    prediction on the side the last one did not cover, so an accurate fit closes the bracket in two
    passes. Interpolation that leaves the bracket falls back to its midpoint. The measure need not fall
    monotonically at extreme ratios (Torch-Pruning leaves a group whole once a ratio would empty it), so
    the search never jumps to ``top`` unless the fit points there. At most ``max_passes`` passes; the
    smallest ratio known to meet the budget is returned then.
    """
    points: dict[float, float] = {lo: float(lo_value)}
    hi: float | None = None
    last_met: bool | None = None
    widths: list[float] = []  # the bracket's width before every pass
    for _ in range(max_passes):
        upper = top if hi is None else hi
        if hi is not None and hi - lo <= resolution:
            break
        if hi is None and lo >= top:
            break
        widths.append(upper - lo)
        if hi is not None and len(widths) >= 3 and widths[-1] > widths[-3] / 2:
            guess = (lo + hi) / 2  # interpolation stalls (a flat step of the measure): bisect once
        else:
            guess = interpolate(points, absolute, lo, upper, hi is not None)
            if last_met is not None and hi is not None:  # close the bracket from the side not yet covered
                guess += resolution / 2 if not last_met else -resolution / 2
        # strictly inside (lo, upper); top itself may be tried once nothing below it meets the budget
        guess = min(max(guess, lo + resolution / 2), upper - resolution / 2 if hi is not None else top)
        if guess in points:
            guess = (lo + upper) / 2
        value = float(measure(guess))
        points[guess] = value
        last_met = value <= absolute
        if last_met:
            hi = guess
        else:
            lo = guess
    return hi, min(points.values())


def interpolate(points: dict[float, float], absolute: float, lo: float, upper: float, bracketed: bool) -> float:
    """Where a quadratic in the kept share through three (ratio, measure) ``points`` crosses ``absolute``:
    the bracket's ends and the point nearest the budget besides them once ``bracketed`` (close points on
    one flat step of the measure would make the fit extrapolate wildly), else the nearest to the budget;
    the midpoint of ``(lo, upper)`` when the fit gives no crossing there."""
    ends = [(lo, points[lo]), (upper, points[upper])] if bracketed else []
    rest = sorted(
        (p for p in points.items() if p[0] not in (lo, upper) or not bracketed), key=lambda p: abs(p[1] - absolute)
    )
    near = (ends + rest)[:3]
    ks = [1.0 - r for r, _ in near]
    ys = [v for _, v in near]
    try:
        if len(near) == 1:  # y = a k^2
            coeffs = [ys[0] / ks[0] ** 2, 0.0, 0.0]
        elif len(near) == 2:  # y = a k^2 + c
            a = (ys[0] - ys[1]) / (ks[0] ** 2 - ks[1] ** 2)
            coeffs = [a, 0.0, ys[0] - a * ks[0] ** 2]
        else:
            coeffs = [
                float(c)
                for c in torch.linalg.solve(
                    torch.tensor([[k * k, k, 1.0] for k in ks], dtype=torch.float64),
                    torch.tensor(ys, dtype=torch.float64),
                )
            ]
    except (ZeroDivisionError, RuntimeError):
        return (lo + upper) / 2
    a, b, c = coeffs
    c -= absolute
    if abs(a) < 1e-12:
        roots = [-c / b] if abs(b) > 1e-12 else []
    else:
        disc = b * b - 4 * a * c
        roots = [(-b + sign * math.sqrt(disc)) / (2 * a) for sign in (1, -1)] if disc >= 0 else []
    inside = [1.0 - k for k in roots if lo < 1.0 - k < upper]
    return min(inside, key=lambda r: abs(r - (lo + upper) / 2)) if inside else (lo + upper) / 2
