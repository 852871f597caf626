"""Importance criteria for structured pruning, and the gradient statistics they are computed from.

Gradient criteria never run extra forward/backward passes: they fold the gradients of the real
training steps into compact per-channel accumulators (:class:`GradientStatistics`):

* ``taylor``: first-order Taylor saliency ``sum_t |w_t * g_t|`` over the optimizer steps of the
  window, ``g_t`` being the (unscaled, DDP-synchronised) gradient the optimizer is about to apply;
* ``hessian``: Optimal Brain Damage saliency ``w^2 * F`` with ``F`` a diagonal empirical Fisher,
  accumulated as ``sum_k (w * g_k)^2`` over **every micro-batch** ``k`` of the window (each
  backward pass, including the ones inside Lightning's ``accumulate_grad_batches``). The gradient
  of each micro-batch is taken by a tensor hook before it is added into ``.grad``, so it is the
  per-micro-batch gradient, not the running sum. (Torch-Pruning 1.6.1's own
  ``GroupHessianImportance.accumulate_grad`` keeps only the last sample.)

For a weight of shape ``(out, in, ...)`` only two vectors are kept: the sum over everything but
dim 0 (the score of each output channel) and over everything but dim 1 (each input channel);
1-D weights (LayerNorm) keep one value per element. That is all Torch-Pruning's group importance
needs, so the statistics cost two small vectors per layer and survive checkpointing cheaply.

Magnitude (``l1``, ``l2``) and ``random`` need no statistics.

Criteria live in the registry :data:`IMPORTANCE` (name -> :class:`Criterion`); the pruner, the
callback, the CLI and the sweep read their allowed names from it. Adding one::

    import torch_pruning as tp
    from pqv_lightning.pruning.importance import IMPORTANCE, Criterion

    IMPORTANCE.register("l1-sum", Criterion(
        build=lambda stats, seed: tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum"),
        description="L1 norm of the weights, summed over the coupled layers"))

    StructuredPruning(importance="l1-sum", pruning_ratio=0.25)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function as tpf

from ..errors import ConfigError
from ..registry import Registry

__all__ = [
    "IMPORTANCE",
    "STATISTICS_KINDS",
    "Criterion",
    "GradientStatistics",
    "StatisticsImportance",
    "SeededRandomImportance",
    "make_importance",
]

#: The kinds of gradient statistics :class:`GradientStatistics` can accumulate.
STATISTICS_KINDS: tuple[str, ...] = ("taylor", "hessian")

_TRACKED_TYPES = (nn.Linear, nn.modules.conv._ConvNd, nn.LayerNorm)


def tracked_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights whose channels can be scored: those of Linear, Conv and LayerNorm modules."""
    out: dict[str, nn.Parameter] = {}
    for mname, module in model.named_modules():
        if isinstance(module, _TRACKED_TYPES) and isinstance(getattr(module, "weight", None), nn.Parameter):
            out[f"{mname}.weight" if mname else "weight"] = module.weight  # type: ignore[assignment]
    return out


def _channel_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-output-channel sum, per-input-channel sum) of a non-negative elementwise score."""
    x = x.float()
    if x.dim() == 1:
        return x, None
    out = x.sum(dim=tuple(d for d in range(x.dim()) if d != 0))
    inp = x.sum(dim=tuple(d for d in range(x.dim()) if d != 1))
    return out, inp


class GradientStatistics:
    """Per-channel gradient statistics of a model, accumulated over a window of training steps.

    Usable without Lightning::

        stats = GradientStatistics(model, "taylor")
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            stats.step()          # before optimizer.step(): reads the gradients
            opt.step(); opt.zero_grad()

    For ``"hessian"``, :meth:`attach` registers gradient hooks that record every backward pass
    (micro-batch) and :meth:`step` commits them once the optimizer step is known to be finite.
    """

    def __init__(self, model: nn.Module, criterion: Literal["taylor", "hessian"]):
        if criterion not in STATISTICS_KINDS:
            raise ValueError(f"criterion={criterion!r} is not a gradient criterion; allowed: {STATISTICS_KINDS}")
        self.model = model
        self.criterion = criterion
        self.out_scores: dict[str, torch.Tensor] = {}
        self.in_scores: dict[str, torch.Tensor] = {}
        self.steps = 0  # optimizer steps folded in
        self.samples = 0  # gradient evaluations folded in (micro-batches for hessian, steps for taylor)
        self.skipped = 0  # non-finite steps ignored
        self._pending_out: dict[str, torch.Tensor] = {}
        self._pending_in: dict[str, torch.Tensor] = {}
        self._pending_samples = 0
        self._pending_calls: dict[str, int] = {}
        self._grad_scale = 1.0
        self._handles: list = []
        self.enabled = True  # hessian hooks record only while True (the callback opens it per window)

    # ------------------------------------------------------------------ accumulation
    def set_grad_scale(self, scale: float) -> None:
        """The loss scale of the coming backward pass (AMP ``GradScaler``); hooks divide it out."""
        self._grad_scale = float(scale)

    def attach(self) -> None:
        """(Re-)register the per-micro-batch hooks on the current parameters (``hessian`` only)."""
        self.detach()
        if self.criterion != "hessian":
            return
        for name, p in tracked_weights(self.model).items():
            if p.requires_grad:
                self._handles.append(p.register_hook(self._make_hook(name, p)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, name: str, param: nn.Parameter) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if not self.enabled:
                return
            with torch.no_grad():
                g = grad.detach().float()
                if self._grad_scale != 1.0:
                    g = g / self._grad_scale
                score = (param.detach().float() * g).square_()
                _add(self._pending_out, self._pending_in, name, *_channel_sums(score))
                self._pending_calls[name] = self._pending_calls.get(name, 0) + 1
                self._pending_samples = max(self._pending_samples, self._pending_calls[name])

        return hook

    def discard_pending(self) -> None:
        """Drop micro-batch terms recorded since the last :meth:`step` (outside a window)."""
        self._pending_out.clear()
        self._pending_in.clear()
        self._pending_calls.clear()
        self._pending_samples = 0

    @torch.no_grad()
    def step(self, grad_scale: float = 1.0) -> bool:
        """Fold the current optimizer step in. Returns False (and drops it) if non-finite.

        ``grad_scale``: for ``taylor``, the factor the gradients are still multiplied by (AMP with
        an optimizer that unscales inside ``step``); 1 when they are already unscaled.
        """
        if self.criterion == "taylor":
            self._pending_out.clear()
            self._pending_in.clear()
            for name, p in tracked_weights(self.model).items():
                if p.grad is None:
                    continue
                score = (p.detach().float() * p.grad.detach().float()).abs_()
                if grad_scale != 1.0:
                    score.div_(grad_scale)
                _add(self._pending_out, self._pending_in, name, *_channel_sums(score))
            self._pending_samples = 1 if self._pending_out else 0
        pending = list(self._pending_out.values()) + list(self._pending_in.values())
        ok = bool(pending) and bool(torch.isfinite(torch.stack([t.sum() for t in pending])).all())
        if ok:
            for name, t in self._pending_out.items():
                _add(self.out_scores, self.in_scores, name, t, self._pending_in.get(name))
            self.steps += 1
            self.samples += self._pending_samples
        elif pending:
            self.skipped += 1
        self.discard_pending()
        return ok

    def reset(self) -> None:
        """Forget everything (called after each pruning event: channel indices changed)."""
        self.out_scores.clear()
        self.in_scores.clear()
        self._pending_out.clear()
        self._pending_in.clear()
        self._pending_calls.clear()
        self.steps = self.samples = self.skipped = self._pending_samples = 0

    # ------------------------------------------------------------------ distributed / state
    @torch.no_grad()
    def all_reduce(self, reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Average the accumulators over processes (``reduce_mean`` is e.g. ``strategy.reduce``).

        The packed layout comes from the model's weights, not from what this rank gathered, so
        every rank sends the same shape even if one of them skipped every step (zeros stand in).
        The result is bitwise identical on every rank, hence so are the pruning decisions.
        """
        layout = []
        for name, p in sorted(tracked_weights(self.model).items()):
            layout.append((self.out_scores, name, p.shape[0] if p.dim() > 1 else p.numel()))
            if p.dim() > 1:
                layout.append((self.in_scores, name, p.shape[1]))
        device = next(self.model.parameters()).device
        parts = [d[name].to(device) if name in d else torch.zeros(n, device=device) for d, name, n in layout]
        flat = reduce_mean(torch.cat(parts))
        offset = 0
        for d, name, n in layout:
            d[name] = flat[offset : offset + n].clone()
            offset += n

    def state_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "out_scores": {k: v.detach().cpu() for k, v in self.out_scores.items()},
            "in_scores": {k: v.detach().cpu() for k, v in self.in_scores.items()},
            "steps": self.steps,
            "samples": self.samples,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("criterion") != self.criterion:
            raise ValueError(
                f"statistics were gathered for {state.get('criterion')!r}, this run uses {self.criterion!r}"
            )
        device = next(self.model.parameters()).device
        self.out_scores = {k: v.to(device) for k, v in state["out_scores"].items()}
        self.in_scores = {k: v.to(device) for k, v in state["in_scores"].items()}
        self.steps, self.samples, self.skipped = int(state["steps"]), int(state["samples"]), int(state["skipped"])

    def channel_scores(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.out_scores.get(name), self.in_scores.get(name)


def _add(out_d: dict, in_d: dict, name: str, out: torch.Tensor, inp: torch.Tensor | None) -> None:
    for d, value in ((out_d, out), (in_d, inp)):
        if value is None:
            continue
        old = d.get(name)
        if old is not None and old.shape == value.shape:
            d[name] = old.to(value.device).add_(value) if old.device != value.device else old.add_(value)
        else:
            d[name] = value.clone()


class StatisticsImportance(tp.importance.GroupMagnitudeImportance):
    """Torch-Pruning group importance read from :class:`GradientStatistics`.

    Mirrors ``GroupMagnitudeImportance``'s traversal (output rows of Linear/Conv, input columns,
    LayerNorm gamma; reduced over the group with ``group_reduction`` and normalised with
    ``normalizer``) but scores each channel with the accumulated statistic instead of ``|w|^p``.
    """

    def __init__(self, stats: GradientStatistics, group_reduction: str = "mean", normalizer: str = "mean"):
        super().__init__(p=1, group_reduction=group_reduction, normalizer=normalizer, bias=False)
        self.stats = stats
        self._names: dict[int, str] = {}

    def bind_names(self, model: nn.Module) -> None:
        """Map the live parameters to the names the statistics are keyed by (call before a step)."""
        self._names = {id(p): n for n, p in tracked_weights(model).items()}

    @torch.no_grad()
    def __call__(self, group):
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer, prune_fn = dep.layer, dep.pruning_fn
            if not isinstance(layer, tuple(self.target_types)) or getattr(layer, "weight", None) is None:
                continue
            name = self._names.get(id(layer.weight))
            if name is None:
                continue
            out_s, in_s = self.stats.channel_scores(name)
            if prune_fn in (
                tpf.prune_conv_out_channels,
                tpf.prune_linear_out_channels,
                tpf.prune_layernorm_out_channels,
            ):
                scores = out_s
            elif prune_fn in (tpf.prune_conv_in_channels, tpf.prune_linear_in_channels):
                scores = in_s
            else:
                continue
            if scores is None:
                continue
            groups = getattr(layer, "groups", 1)
            if prune_fn == tpf.prune_conv_in_channels and groups > 1:  # bound methods: ==, not is
                if groups == layer.in_channels:
                    continue  # depthwise: scored through its output channels
                # a grouped conv's weight holds in_channels / groups inputs; Torch-Pruning indexes all of
                # them, and scores each group's inputs alike (as GroupMagnitudeImportance does)
                scores = scores.repeat(groups)
            group_imp.append(scores[torch.as_tensor(idxs, device=scores.device, dtype=torch.long)])
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


class SeededRandomImportance(tp.importance.Importance):
    """Uniform random scores from a seeded generator: identical on every DDP rank."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.event = 0
        self._gen = torch.Generator().manual_seed(self.seed)

    def start_event(self, event: int) -> None:
        self.event = event
        self._gen = torch.Generator().manual_seed(self.seed * 1_000_003 + event)

    @torch.no_grad()
    def __call__(self, group):
        _, idxs = group[0]
        return torch.rand(len(idxs), generator=self._gen)


@dataclass(frozen=True)
class Criterion:
    """An importance criterion: how to build Torch-Pruning's importance object, and what it needs.

    Args:
        build: ``(statistics or None, seed) -> tp.importance.Importance``.
        statistics: the :class:`GradientStatistics` kind it reads (``"taylor"``/``"hessian"``), or
            None when it needs no gradients.
        deterministic: the same weights always give the same scores (``random`` does not, so the
            global budget search, which compares candidate ratios, refuses it).
        description: one line for docs and ``--help``.
    """

    build: Callable[[GradientStatistics | None, int], tp.importance.Importance]
    statistics: str | None = None
    deterministic: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.statistics is not None and self.statistics not in STATISTICS_KINDS:
            raise ConfigError(f"statistics={self.statistics!r}; allowed: {list(STATISTICS_KINDS)} or None")


def _from_statistics(stats: GradientStatistics | None, seed: int) -> tp.importance.Importance:
    assert stats is not None, "a criterion with statistics gets them (make_importance)"
    return StatisticsImportance(stats)


#: name -> :class:`Criterion`; what ``importance=`` accepts everywhere.
IMPORTANCE: Registry[Criterion] = Registry("importance criterion", argument="importance")
IMPORTANCE.register(
    "taylor",
    Criterion(
        _from_statistics, statistics="taylor", description="first-order Taylor saliency |w * g| over the training steps"
    ),
)
IMPORTANCE.register(
    "hessian",
    Criterion(
        _from_statistics,
        statistics="hessian",
        description="Optimal Brain Damage w^2 * diagonal empirical Fisher, per micro-batch",
    ),
)
IMPORTANCE.register(
    "l1",
    Criterion(
        lambda stats, seed: tp.importance.GroupMagnitudeImportance(p=1), description="L1 norm of the coupled weights"
    ),
)
IMPORTANCE.register(
    "l2",
    Criterion(
        lambda stats, seed: tp.importance.GroupMagnitudeImportance(p=2), description="L2 norm of the coupled weights"
    ),
)
IMPORTANCE.register(
    "random",
    Criterion(
        lambda stats, seed: SeededRandomImportance(seed),
        deterministic=False,
        description="seeded random scores (a control)",
    ),
)


def make_importance(name: str, stats: GradientStatistics | None = None, seed: int = 0) -> tp.importance.Importance:
    """Importance object for a criterion registered in :data:`IMPORTANCE`.

    Raises:
        ConfigError: ``name`` is not registered.
        ValueError: the criterion reads gradient statistics and ``stats`` is missing or of another kind.
    """
    criterion = IMPORTANCE[name]
    if criterion.statistics is not None and (stats is None or stats.criterion != criterion.statistics):
        raise ValueError(f"importance={name!r} needs GradientStatistics(model, {criterion.statistics!r})")
    return criterion.build(stats, seed)


def statistics_kind(name: str) -> str | None:
    """The :class:`GradientStatistics` kind criterion ``name`` needs, or None."""
    return IMPORTANCE[name].statistics


def __getattr__(attr: str):
    # live views of the registry, for code written against the 0.1 tuples
    if attr == "IMPORTANCE_NAMES":
        return IMPORTANCE.names()
    if attr == "GRADIENT_CRITERIA":
        return tuple(n for n, c in IMPORTANCE.items() if c.statistics is not None)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def check_trainable(weights: Iterable[tuple[str, nn.Parameter]], criterion: str) -> None:
    """Gradient criteria need gradients: refuse frozen weights that would be scored."""
    frozen = [n for n, p in weights if not p.requires_grad]
    if frozen and IMPORTANCE[criterion].statistics is not None:
        shown = ", ".join(frozen[:5]) + (f" (+{len(frozen) - 5} more)" if len(frozen) > 5 else "")
        raise ValueError(
            f"importance={criterion!r} needs gradients, but {len(frozen)} prunable weights are frozen "
            f"(requires_grad=False): {shown}. Unfreeze them, add them to ignored_layers, or use "
            "importance='l1'/'l2'/'random'"
        )
