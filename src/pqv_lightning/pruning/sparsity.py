"""Group-sparsity regularization and threshold pruning over dependency groups, without a Trainer.

PQV-Mobile's magnitude method "applies L1 or L2 norm regularization to penalize non-zero parameters,
dropping connections below a certain threshold". Here the penalty acts on the units that structured
pruning removes together: a **unit** is one channel of a DepGraph group with *every* weight coupled
to it — the Linear/Conv rows of the layers that produce it and the columns of the layers that read
it, their biases, the LayerNorm affine entries and the ``cls_token`` / ``pos_embed`` columns (for the
embedding width); for attention, one within-head offset taken in every head, i.e. the matching rows
of q, k and v and the column of ``proj`` (removed together when head dims are pruned).

With ``θ_u`` the weights of unit ``u`` and ``λ`` the strength:

* ``"l2"`` (group lasso): ``R = λ Σ_u γ_u ‖θ_u‖₂`` — drives whole units to exactly zero;
* ``"l1"``: ``R = λ Σ_u γ_u ‖θ_u‖₁`` — every coupled weight shrinks towards zero.

``γ_u = alpha ** ((n_max - n_u) / (n_max - n_min))`` with ``n_u = ‖θ_u‖₂`` ranked within the unit's
group: the weakest unit of a group shrinks ``alpha`` times harder than the strongest (Torch-Pruning's
``GroupNormPruner`` weighting; ``alpha=1`` treats all alike). ``γ`` is a weight, not a function to
differentiate: :func:`add_sparsity_gradient` adds ``λ γ_u θ / ‖θ_u‖₂`` (``"l2"``) or
``λ γ_u sign(θ)`` (``"l1"``) to ``.grad`` — the gradient of ``R`` at fixed ``γ``. Unlike
Torch-Pruning's ``GroupNormPruner`` (which adds ``λ γ θ``, a per-group weight decay, and leaves
LayerNorm alone), the penalty is a true group lasso and covers LayerNorm, whose affine parameters
carry the embedding width of a ViT.

Threshold mode (:func:`units_below_threshold`): at a pruning event, the units whose ``‖θ_u‖₂`` fell
below ``threshold`` times the mean unit norm of their group are removed.

Example (plain PyTorch)::

    pruner = StructuredPruner(model, PruningConfig(importance="l2", pruning_ratio=0.25))
    reg = GroupSparsity("l2", strength=1e-3)
    for x, y in loader:
        F.cross_entropy(model(x), y).backward()
        add_sparsity_gradient(coupled_groups(pruner), reg)   # after backward, before step
        opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch_pruning import ops

from ..errors import ConfigError

if TYPE_CHECKING:
    from .pruner import StructuredPruner

__all__ = [
    "SPARSITY_NORMS",
    "CoupledGroup",
    "GroupSparsity",
    "ParamSlice",
    "add_sparsity_gradient",
    "check_threshold",
    "coupled_groups",
    "sparsity_penalty",
    "unit_norms",
    "unit_weights",
    "units_below_threshold",
]

SPARSITY_NORMS: tuple[str, ...] = ("l1", "l2")


@dataclass(frozen=True)
class GroupSparsity:
    """A group-sparsity penalty: ``norm`` (``"l1"`` / ``"l2"``), ``strength`` λ ≥ 0 and the
    importance weighting ``alpha`` ≥ 1 (see the module docstring)."""

    norm: str = "l2"
    strength: float = 1e-4
    alpha: float = 4.0

    def __post_init__(self) -> None:
        if self.norm not in SPARSITY_NORMS:
            raise ConfigError(f"regularization={self.norm!r} is not supported; allowed: {list(SPARSITY_NORMS)}")
        _check_number("reg_strength", self.strength, 0.0, "a number >= 0")
        _check_number("reg_alpha", self.alpha, 1.0, "a number >= 1")


def _check_number(name: str, value: Any, minimum: float, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name}={value!r} is out of range; allowed: {allowed}")


def check_threshold(value: Any) -> None:
    """A threshold is relative to the mean unit norm of a group: a number in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value < 1:
        raise ConfigError(
            f"threshold={value!r} is out of range; allowed: a number in (0, 1) (relative to the "
            "mean unit norm of each group)"
        )


@dataclass
class ParamSlice:
    """The part of one parameter that belongs to a group: entries ``idxs`` along ``dim``, entry
    ``i`` belonging to unit ``units[i]``."""

    param: nn.Parameter
    dim: int
    idxs: torch.Tensor
    units: torch.Tensor

    @property
    def whole(self) -> bool:
        """True when the slice is the whole parameter along ``dim``, in order (no indexing needed)."""
        n = self.param.shape[self.dim]
        return len(self.idxs) == n and bool(torch.equal(self.idxs, torch.arange(n)))

    def entry_sums(self, norm: str) -> torch.Tensor:
        """Per sliced entry: the sum of squares (``"l2"``) or of absolute values (``"l1"``), float32."""
        p = self.param if self.whole else self.param.index_select(self.dim, self.idxs.to(self.param.device))
        x = p.float()
        x = x.square() if norm == "l2" else x.abs()
        other = tuple(d for d in range(x.dim()) if d != self.dim)
        return x.sum(other) if other else x


@dataclass
class CoupledGroup:
    """One DepGraph group as the regularizer sees it: ``n_units`` removal units and the parameter
    slices coupled to them. ``unit_size`` root channels per head (``heads`` > 1 for attention
    groups, whose unit ``u`` is root channels ``u, u + unit_size, ...``). ``root`` / ``handler``
    re-create the Torch-Pruning group to remove units (threshold mode)."""

    name: str
    n_units: int
    heads: int
    slices: list[ParamSlice] = field(default_factory=list)
    root: Any = None
    handler: Any = None

    def root_indices(self, units: torch.Tensor) -> list[int]:
        """Root channel indices of ``units`` (every head's copy of each unit)."""
        return sorted(int(u) + h * self.n_units for u in units.tolist() for h in range(self.heads))


def _param_slices(dep: Any, idxs: list[int], root_idxs: list[int], n_units: int, is_out: bool) -> list[ParamSlice]:
    target = dep.target.module
    index = torch.as_tensor(idxs, dtype=torch.long)
    units = torch.as_tensor(root_idxs, dtype=torch.long) % n_units
    if dep.target.type == ops.OPTYPE.PARAMETER:  # cls_token, pos_embed, ...: the node's module is the Parameter
        dim = int(dep.target.pruning_dim) % target.dim()
        return [ParamSlice(target, dim, index, units)]
    if not isinstance(target, nn.Module):
        return []
    weight, bias = getattr(target, "weight", None), getattr(target, "bias", None)
    out: list[ParamSlice] = []
    if isinstance(weight, nn.Parameter):
        if is_out:
            out.append(ParamSlice(weight, 0, index, units))
            if isinstance(bias, nn.Parameter):
                out.append(ParamSlice(bias, 0, index, units))
        elif weight.dim() > 1 and not isinstance(target, nn.LayerNorm):
            out.append(ParamSlice(weight, 1, index, units))
    return out


def coupled_groups(pruner: StructuredPruner) -> list[CoupledGroup]:
    """The groups the pruner would prune now (same traversal, same attention re-rooting and head
    grouping as its events), with every coupled parameter slice. Build them again after an event:
    pruning replaces the parameters."""
    tpp = pruner._tp
    dg = tpp.DG
    names = {m: n for n, m in pruner.model.named_modules()}
    groups = []
    for group in dg.get_all_groups(ignored_layers=tpp.ignored_layers, root_module_types=tpp.root_module_types):
        is_attention, _ = tpp._is_atten_group(group)
        if is_attention:
            group = tpp._downstream_node_as_root_if_attention(group)
            if group is None:
                continue
        heads = int(tpp._get_channel_groups(group))
        root_dep = group[0].dep
        n_root = len(group[0].idxs)
        if n_root == 0 or n_root % heads:
            continue
        n_units = n_root // heads
        slices: list[ParamSlice] = []
        for item in group.items:
            dep = item.dep
            is_out = dg.is_out_channel_pruning_fn(dep.handler)
            if not is_out and not dg.is_in_channel_pruning_fn(dep.handler):
                continue
            slices += _param_slices(dep, list(item.idxs), list(item.root_idxs), n_units, is_out)
        seen: set[tuple[int, int]] = set()
        unique = []
        for s in slices:  # a parameter reached twice through the graph counts once
            key = (id(s.param), s.dim)
            if key not in seen:
                seen.add(key)
                unique.append(s)
        root_name = names.get(root_dep.target.module, str(root_dep.target.module))
        direction = "out" if dg.is_out_channel_pruning_fn(root_dep.handler) else "in"
        groups.append(
            CoupledGroup(f"{root_name}:{direction}", n_units, heads, unique, root_dep.target.module, root_dep.handler)
        )
    return groups


def unit_norms(group: CoupledGroup, norm: str = "l2") -> torch.Tensor:
    """``‖θ_u‖₂`` (``"l2"``) or ``‖θ_u‖₁`` (``"l1"``) of every unit of ``group`` (float32, differentiable)."""
    total = None
    for s in group.slices:
        per_entry = s.entry_sums(norm)
        part = torch.zeros(group.n_units, device=per_entry.device).index_add(0, s.units.to(per_entry.device), per_entry)
        total = part if total is None else total + part.to(total.device)
    if total is None:
        return torch.zeros(group.n_units)
    return total.sqrt() if norm == "l2" else total


def unit_weights(norms: torch.Tensor, alpha: float) -> torch.Tensor:
    """``γ_u = alpha ** ((n_max - n_u) / (n_max - n_min))``: 1 for the strongest unit, ``alpha`` for the
    weakest; all ones when the norms are equal."""
    norms = norms.detach()
    lo, hi = norms.min(), norms.max()
    if alpha == 1 or float(hi - lo) <= 0:
        return torch.ones_like(norms)
    return torch.pow(torch.as_tensor(alpha, dtype=norms.dtype, device=norms.device), (hi - norms) / (hi - lo))


def sparsity_penalty(groups: list[CoupledGroup], reg: GroupSparsity) -> torch.Tensor:
    """``R = λ Σ_groups Σ_u γ_u ‖θ_u‖`` as a differentiable scalar (``γ`` held fixed)."""
    total = torch.zeros(())
    for g in groups:
        weights = unit_weights(unit_norms(g, "l2"), reg.alpha)
        n = unit_norms(g, reg.norm)
        total = total.to(n.device) + (weights.to(n.device) * n).sum()
    return reg.strength * total


@torch.no_grad()
def add_sparsity_gradient(groups: list[CoupledGroup], reg: GroupSparsity, eps: float = 1e-12) -> float:
    """Add ``∂R/∂θ`` (at fixed ``γ``) to the ``.grad`` of every coupled parameter; returns ``R``.

    Call after ``backward()`` (gradients unscaled) and before ``optimizer.step()``. Parameters without
    a gradient get one. A unit at exactly zero gets no push (``"l2"``: its subgradient 0 is taken).
    """
    if reg.strength == 0:
        return 0.0
    value = 0.0
    for g in groups:
        l2 = unit_norms(g, "l2")
        gamma = unit_weights(l2, reg.alpha)
        if reg.norm == "l2":
            value += float((gamma * l2).sum())
            coef = reg.strength * gamma / l2.clamp_min(eps)
        else:
            value += float((gamma * unit_norms(g, "l1")).sum())
            coef = reg.strength * gamma
        for s in g.slices:
            p = s.param
            whole = s.whole
            v = p if whole else p.index_select(s.dim, s.idxs.to(p.device))
            shape = [1] * v.dim()
            shape[s.dim] = len(s.idxs)
            c = coef.to(device=p.device)[s.units.to(p.device)].view(shape)
            term = (v * c) if reg.norm == "l2" else (torch.sign(v) * c)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if whole:
                p.grad.add_(term.to(p.grad.dtype))
            else:
                p.grad.index_add_(s.dim, s.idxs.to(p.device), term.to(p.grad.dtype))
    return reg.strength * value


@torch.no_grad()
def units_below_threshold(group: CoupledGroup, threshold: float, keep_at_least: int = 1) -> torch.Tensor:
    """Units of ``group`` whose ``‖θ_u‖₂`` is below ``threshold`` times the group's mean unit norm,
    weakest first, leaving at least ``keep_at_least`` units."""
    check_threshold(threshold)
    norms = unit_norms(group, "l2")
    below = (norms < threshold * norms.mean()).nonzero().flatten()
    below = below[torch.argsort(norms[below])]
    room = max(0, group.n_units - keep_at_least)
    return below[:room]
