"""Keep optimizers valid when Torch-Pruning replaces parameters.

Torch-Pruning 1.6.1 never edits a parameter in place: every pruned tensor becomes a new
``nn.Parameter`` built by ``index_select`` in ``BasePruningFunc._prune_parameter_and_grad``. An
optimizer built before the event would silently go on updating the dead tensors. We record every
replacement (old tensor, new tensor, kept indices, dim) during the event and then re-point each
optimizer param group at the new tensors, slicing per-parameter state (Adam's ``exp_avg`` /
``exp_avg_sq``, SGD momentum, ...) to the kept indices. The optimizer object itself is kept, so LR
schedulers and Lightning's optimizer wrappers keep working, and scalar state such as ``step``
continues (bias correction is not restarted).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch_pruning.pruner import function as tpf

__all__ = ["Replacement", "record_parameter_replacements", "remap_optimizer"]

if not hasattr(tpf.BasePruningFunc, "_prune_parameter_and_grad"):  # pragma: no cover - version guard
    raise ImportError("pqv_lightning needs torch-pruning 1.6.1 (BasePruningFunc._prune_parameter_and_grad is missing)")


@dataclass
class Replacement:
    """One parameter replacement: ``new = old.index_select(dim, keep)``."""

    old: torch.Tensor
    new: torch.Tensor
    keep: torch.Tensor
    dim: int


@dataclass
class ReplacementLog:
    entries: list[Replacement] = field(default_factory=list)

    def chains(self) -> dict[int, tuple[torch.Tensor, list[tuple[torch.Tensor, int]]]]:
        """Map id(final tensor) -> (original tensor, [(keep, dim), ...] applied in order)."""
        origin: dict[int, tuple[torch.Tensor, list[tuple[torch.Tensor, int]]]] = {}
        for r in self.entries:
            root, ops = origin.pop(id(r.old), (r.old, []))
            origin[id(r.new)] = (root, [*ops, (r.keep, r.dim)])
        return origin


@contextlib.contextmanager
def record_parameter_replacements() -> Iterator[ReplacementLog]:
    """Context manager that logs every parameter Torch-Pruning replaces inside it."""
    original = tpf.BasePruningFunc._prune_parameter_and_grad
    log = ReplacementLog()

    def wrapped(self, weight, keep_idxs, pruning_dim):
        new = original(self, weight, keep_idxs, pruning_dim)
        keep = torch.as_tensor(list(keep_idxs), dtype=torch.long)
        log.entries.append(Replacement(weight, new, keep, pruning_dim))
        return new

    tpf.BasePruningFunc._prune_parameter_and_grad = wrapped
    try:
        yield log
    finally:
        tpf.BasePruningFunc._prune_parameter_and_grad = original


@torch.no_grad()
def remap_optimizer(optimizer: torch.optim.Optimizer, log: ReplacementLog, live_params: Iterable[nn.Parameter]) -> int:
    """Point ``optimizer`` at the replacement parameters and slice their state. Returns how many
    parameters were remapped. Param-group membership and hyper-parameters are preserved."""
    live = {id(p): p for p in live_params}
    remap = {id(root): (live[nid], ops) for nid, (root, ops) in log.chains().items() if nid in live}
    count = 0
    for group in optimizer.param_groups:
        new_params = []
        for p in group["params"]:
            if id(p) not in remap:
                new_params.append(p)
                continue
            q, ops = remap[id(p)]
            state = optimizer.state.pop(p, None)
            if state:
                new_state = {}
                for key, value in state.items():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape == p.shape:
                        for keep, dim in ops:
                            value = value.index_select(dim, keep.to(value.device))
                    new_state[key] = value
                optimizer.state[q] = new_state
            new_params.append(q)
            count += 1
        group["params"] = new_params
    return count


def restore_requires_grad(log: ReplacementLog, live_params: Iterable[nn.Parameter]) -> None:
    """Torch-Pruning makes every new Parameter trainable; give back the original flag."""
    live = {id(p): p for p in live_params}
    for nid, (root, _) in log.chains().items():
        if nid in live:
            live[nid].requires_grad_(root.requires_grad)
