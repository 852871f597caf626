"""Structured pruning of Vision Transformers without a Trainer.

:class:`StructuredPruner` wraps one Torch-Pruning ``BasePruner`` (DepGraph groups) for a whole
iterative schedule and adds what a training loop needs around each event:

* importance from accumulated training gradients (:mod:`pqv_lightning.pruning.importance`),
* optimizers re-pointed at the replacement parameters with their state sliced
  (:mod:`pqv_lightning.pruning.optim`),
* model-family attributes re-synchronised through the adapter registry
  (:mod:`pqv_lightning.pruning.adapters`),
* a small JSON-able ``state_dict`` from which a fresh, unpruned copy of the model is reshaped
  (:func:`restore_structure`), and from which the schedule continues exactly.

Example (plain PyTorch)::

    pruner = StructuredPruner(model, PruningConfig(importance="taylor", pruning_ratio=0.5, iterative_steps=2))
    for step, (x, y) in enumerate(loader):
        F.cross_entropy(model(x), y).backward()
        pruner.accumulate()                 # Taylor statistics from this step's gradients
        opt.step(); opt.zero_grad()
        if step in (100, 200):
            event = pruner.step(optimizers=[opt])
            print(event.params_after, event.macs_after)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..checks import check_example_tensor, check_forward, check_int
from ..errors import ConfigError
from ..outputs import main_tensor
from ..progress import Progress
from ..widths import head_width_step
from . import tp_fixes
from .adapters import ModelAdapter, example_inputs_for, find_adapter, no_adapter_error
from .budget import budget_measure, count_macs, count_params, ratio_resolution, search_ratio
from .config import RATIO_SCHEDULES, RECONSTRUCT_LAYERS, PruningConfig, check_budget_value
from .events import PruningEvent
from .importance import (
    IMPORTANCE,
    GradientStatistics,
    SeededRandomImportance,
    StatisticsImportance,
    check_trainable,
    make_importance,
    tracked_weights,
)
from .optim import record_parameter_replacements, remap_optimizer, restore_requires_grad
from .reconstruction import LayerFit, reconstruct_linears
from .sparsity import CoupledGroup, GroupSparsity, add_sparsity_gradient, coupled_groups, units_below_threshold
from .tp_fixes import FixedBasePruner

__all__ = ["StructuredPruner", "prune_once", "ratio_for_budget", "restore_structure"]


@contextlib.contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to ``phases[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


STATE_VERSION = 1

tp_fixes.install()  # channel chunks of token tensors (fused SwiGLU): see pruning/tp_fixes.py


class StructuredPruner:
    """Iterative structured pruning of one model (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        config: PruningConfig | None = None,
        *,
        example_inputs: torch.Tensor | None = None,
        adapter: ModelAdapter | None = None,
        measure: bool = True,
    ):
        config = _check_model_and_config(model, config)
        self.model = model
        found = adapter or find_adapter(model)
        if found is None:
            raise no_adapter_error(model)
        self.adapter: ModelAdapter = found
        if example_inputs is None:
            example_inputs = example_inputs_for(model, self.adapter)
        else:
            check_example_tensor("example_inputs", example_inputs)
        #: the budget asked for (``config.budget``); absolute numbers once the unpruned model is measured
        self.budget = config.budget
        if self.budget:  # the channel ratio the budget needs (global allocation: the schedule's nominal ratio)
            ratio = ratio_for_budget(model, config, example_inputs=example_inputs, adapter=self.adapter)
            config = dataclasses.replace(config, pruning_ratio=ratio, target_macs=None, target_params=None)
        #: the configuration this pruner runs: the one given, with a budget's ratio derived
        self.config = config
        # a clear error instead of one inside the trace; the output width is checked again after every event
        output = main_tensor(check_forward("example_inputs", model, example_inputs))
        self._output_shape = tuple(output.shape) if output is not None else None
        self.input_shape = list(example_inputs.shape)
        self.measure = measure
        self.ignored_names = self._resolve_ignored(config.ignored_layers, example_inputs)
        #: layers the adapter keeps whole whatever ignored_layers says (name -> why)
        self.kept_whole = self.adapter.kept_whole(model)
        self.ignored_names += [n for n in self.kept_whole if n not in self.ignored_names]
        # the family's own width constraint (nn.MultiheadAttention: embed_dim divisible by its heads) with the user's
        multiple = math.lcm(config.round_to or 1, self.adapter.width_multiple(model))
        self.round_to: int | None = multiple if multiple > 1 else None
        attn = self.adapter.attention_modules(model)
        kept_ids = {id(model.get_submodule(n)) for n in self.kept_whole}
        if config.prune_num_heads and self.adapter.whole_heads and not attn:
            raise ConfigError(
                f"prune_num_heads=True: {type(model).__name__} has no attention heads its adapter knows "
                "of; allowed: prune_num_heads=False"
            )
        if config.prune_num_heads and (not self.adapter.whole_heads or all(id(a.qkv) in kept_ids for a in attn)):
            why = (
                next(iter(self.kept_whole.values()), "") if self.adapter.whole_heads else "its adapter prunes no heads"
            )
            raise ConfigError(
                f"prune_num_heads=True: whole attention heads of {type(model).__name__} cannot be "
                f"removed ({why}); allowed: prune_num_heads=False"
            )
        self.adapter.check_prunable(model, self.ignored_names)
        if config.reconstruct and not self._reconstruction_layers():
            method = RECONSTRUCT_LAYERS[config.reconstruct_layers]
            raise ConfigError(
                f"reconstruct=True, reconstruct_layers={config.reconstruct_layers!r}: the adapter of "
                f"{type(model).__name__} names no layers to refit (ModelAdapter.{method}); allowed: "
                "reconstruct=False"
            )
        ignored_modules = [model.get_submodule(n) for n in self.ignored_names]
        ignored_ids = {id(p) for m in ignored_modules for p in m.parameters()}
        scored = [(n, p) for n, p in tracked_weights(model).items() if id(p) not in ignored_ids]
        check_trainable(scored, config.importance)

        kind = IMPORTANCE[config.importance].statistics
        self.stats = GradientStatistics(model, kind) if kind is not None else None  # type: ignore[arg-type]
        self.importance = make_importance(config.importance, self.stats, seed=config.seed)
        self._attn_names = {id(a.qkv): a.name for a in attn}
        num_heads = {a.qkv: a.num_heads for a in attn}
        was_training = model.training
        try:
            # DepGraph traces a forward with autograd (asserts grad mode) and leaves eval() on.
            # A tracing input that requires grad keeps frozen first layers in the graph.
            with torch.enable_grad():
                self._tp = FixedBasePruner(
                    model,
                    example_inputs.detach().clone().requires_grad_(True),
                    importance=self.importance,
                    pruning_ratio=config.pruning_ratio or 0.0,  # group_widths: its nominal ratio, set below
                    iterative_steps=config.iterative_steps,
                    iterative_pruning_ratio_scheduler=RATIO_SCHEDULES[config.ratio_schedule],
                    ignored_layers=ignored_modules,
                    global_pruning=config.global_pruning,
                    round_to=self.round_to,
                    num_heads=num_heads,
                    prune_num_heads=config.prune_num_heads,
                    prune_head_dims=config.prune_head_dims,
                    head_pruning_ratio=config.effective_head_ratio,
                    unwrapped_parameters=self.adapter.unwrapped_parameters(model),
                    in_channel_groups={},  # TP 1.6.1 mutates shared default dicts
                    out_channel_groups=self.adapter.out_channel_groups(model),
                )
        finally:
            model.train(was_training)
        if self._tp.initial_total_channels == 0:
            if config.ignored_layers:
                raise ValueError(
                    f"ignored_layers={config.ignored_layers!r} cover every prunable layer of "
                    f"{type(model).__name__}; nothing would be pruned"
                )
            raise ValueError(f"no prunable layers found in {type(model).__name__}")
        self._example_inputs = example_inputs.detach()
        self.initial_params = count_params(model)
        self.initial_macs = count_macs(model, self._example()) if measure else 0
        self._macs_now = self.initial_macs  # the model's MACs as it is now (the next event's "before")
        self._check_has_effect()
        self._initial_widths = self._prunable_out_widths()
        self.events: list[PruningEvent] = []
        self._groups: list[CoupledGroup] | None = None  # coupled groups of the current structure
        self._budget_full = 0.0
        if self.budget:  # absolute numbers from now on
            name, target = next(iter(self.budget.items()))
            full = self.initial_macs if name == "target_macs" else self.initial_params
            if name == "target_macs" and not measure:
                full = count_macs(model, self._example())
            self._budget_full = float(full)
            self.budget = {name: target * full if target < 1 else float(target)}
        #: group name -> units it keeps after the last event (``config.group_widths``), checked
        self.group_widths = self._check_group_widths() if config.group_widths is not None else None
        # the schedule's cumulative ratios before any event settles its own (global budgets)
        self._nominal_ratios = [float(r) for r in self._tp.per_step_pruning_ratio]
        if self.stats is not None:
            self.stats.attach()

    # ------------------------------------------------------------------ helpers
    def _check_has_effect(self) -> None:
        """Refuse options that would make the ratio rule prune nothing, rather than prune nothing silently:
        ``round_to`` not below any prunable width, or a head ratio that removes no head."""
        config = self.config
        if not config.pruning_ratio or config.pruning_ratio <= 0:  # set once the budget is resolved
            return
        widths = self._prunable_out_widths()
        if config.round_to is not None and widths and config.round_to >= max(widths.values()):
            raise ConfigError(
                f"round_to={config.round_to} is not below any prunable width of "
                f"{type(self.model).__name__} (the largest is {max(widths.values())}): nothing would "
                f"be pruned; allowed: round_to < {max(widths.values())}"
            )
        ratio = config.effective_head_ratio
        heads = [int(n) for n in self._tp.num_heads.values()] if config.prune_num_heads else []
        if heads and ratio > 0 and not config.global_pruning and all(max(1, int(h * (1 - ratio))) >= h for h in heads):
            fewest = min(h for h in heads if h > 1) if any(h > 1 for h in heads) else 1
            allowed = (
                f"a head_pruning_ratio >= {1 / fewest:.4g} (one of {fewest} heads)"
                if fewest > 1
                else "prune_num_heads=False (every attention has one head)"
            )
            raise ConfigError(
                f"prune_num_heads=True, head_pruning_ratio={ratio!r} removes no head: attention with "
                f"{sorted(set(heads))} heads keeps them all; allowed: {allowed}"
            )

    def _check_output_width(self, event: int) -> None:
        """The network's output shape never changes (a classifier keeps its classes)."""
        if self._output_shape is None:
            return
        was_training = self.model.training
        with torch.no_grad():
            out = main_tensor(self.model.eval()(self._example()))
        self.model.train(was_training)
        assert out is not None
        if tuple(out.shape) != self._output_shape:
            raise ConfigError(
                f"pruning event {event} changed the output of {type(self.model).__name__} from "
                f"{list(self._output_shape)} to {list(out.shape)}: the layer that produces it was pruned. Keep it "
                f"whole with ignored_layers=[...] (ignored now: {self.ignored_names}) or an adapter whose "
                "classifier_names names it"
            )

    def _example(self) -> torch.Tensor:
        """The tracing input on the model's current device and floating dtype (it may have moved)."""
        p = next(self.model.parameters())
        return self._example_inputs.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)

    def _resolve_ignored(self, patterns: Sequence[str] | None, example: torch.Tensor) -> list[str]:
        if patterns is None:  # the classifier; for an adapter that names none, the layer that runs last
            return list(self.adapter.classifier_names(self.model)) or _last_layer(self.model, example)
        if isinstance(patterns, str):
            raise ConfigError(f"ignored_layers={patterns!r} must be a list of module names or glob patterns")
        names = [n for n, _ in self.model.named_modules() if n]
        chosen: list[str] = []
        for pat in patterns:
            hits = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ConfigError(
                    f"ignored_layers entry {pat!r} matches no module of {type(self.model).__name__}; "
                    f"module names look like {names[:4]}..."
                )
            chosen.extend(h for h in hits if h not in chosen)
        return chosen

    def _prunable_out_widths(self) -> dict[str, int]:
        ignored = tuple(self.ignored_names)
        out = {}
        for name, m in self.model.named_modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not any(
                name == i or name.startswith(i + ".") for i in ignored
            ):
                out[name] = m.weight.shape[0]
        return out

    @property
    def completed_events(self) -> int:
        return int(self._tp.current_step)

    @property
    def iterative_steps(self) -> int:
        return self.config.iterative_steps

    def current_heads(self) -> dict[str, int]:
        return {self._attn_names[id(q)]: int(n) for q, n in self._tp.num_heads.items() if id(q) in self._attn_names}

    def widths(self) -> dict[str, list[int]]:
        out = {}
        for name, m in self.model.named_modules():
            if isinstance(m, nn.Linear):
                out[name] = [m.in_features, m.out_features]
            elif isinstance(m, nn.modules.conv._ConvNd):
                out[name] = [m.in_channels, m.out_channels]
            elif isinstance(m, nn.LayerNorm):
                out[name] = [int(m.normalized_shape[-1])] * 2
        return out

    def ratio_reached(self) -> float:
        now = self._prunable_out_widths()
        total = sum(self._initial_widths.values())
        return 1.0 - sum(now.get(k, 0) for k in self._initial_widths) / total if total else 0.0

    def coupled_groups(self) -> list[CoupledGroup]:
        """The groups of the current structure with every coupled parameter slice (cached until
        the structure changes)."""
        if self._groups is None:
            self._groups = coupled_groups(self)
        return self._groups

    def prunable_channels(self, groups: list[CoupledGroup] | None = None) -> int:
        """Root channels over ``groups`` (default: the current structure's), what the ratio and
        threshold rules remove from."""
        return sum(g.n_units * g.heads for g in (self.coupled_groups() if groups is None else groups))

    @torch.no_grad()
    def regularize(self, reg: GroupSparsity) -> float:
        """Add the group-sparsity gradient (:func:`pqv_lightning.pruning.sparsity.add_sparsity_gradient`) to
        the live parameters' ``.grad``; call after backward, before ``optimizer.step()``. Returns
        the penalty's value."""
        return add_sparsity_gradient(self.coupled_groups(), reg)

    def _threshold_prune(self, groups: list[CoupledGroup]) -> int:
        """Remove the units below ``config.threshold`` (see :class:`PruningConfig`); returns the root
        channels removed."""
        assert self.config.threshold is not None
        removed = 0
        dg = self._tp.DG
        round_to = self.round_to or 1
        for g in groups:
            # attention groups: a head's width moves in steps that keep heads x width a multiple of round_to
            step = head_width_step(round_to, g.heads)
            units = units_below_threshold(g, self.config.threshold, keep_at_least=max(1, step))
            # keep the strongest of them so that the width is a multiple (or unchanged when none fits)
            kept = min(g.n_units, -(-(g.n_units - len(units)) // step) * step)
            units = units[: g.n_units - kept]
            if len(units) == 0:
                continue
            idxs = g.root_indices(units)
            dg.get_pruning_group(g.root, g.handler, idxs).prune()
            removed += len(idxs)
        return removed

    def _check_group_widths(self) -> dict[str, int]:
        """``config.group_widths`` against the groups of the model: known names, widths a group can
        take (at most its width, a multiple of its step); sets the schedule to the nominal channel
        ratio they amount to."""
        assert self.config.group_widths is not None
        groups = {g.name: g for g in self.coupled_groups()}
        unknown = sorted(set(self.config.group_widths) - set(groups))
        if unknown:
            raise ConfigError(
                f"group_widths names {unknown}, which are not coupled groups of {type(self.model).__name__}; "
                f"its groups: {sorted(groups)}"
            )
        self._initial_units = {name: g.n_units for name, g in groups.items()}
        self._initial_heads = {name: g.heads for name, g in groups.items()}
        removed = 0
        for name, kept in self.config.group_widths.items():
            g = groups[name]
            step = head_width_step(self.round_to or 1, g.heads)
            if kept > g.n_units or (kept != g.n_units and kept % step):
                raise ConfigError(
                    f"group_widths[{name!r}]={kept}: allowed a width <= {g.n_units} that is a multiple of {step} "
                    f"(round_to={self.round_to}, {g.heads} heads)"
                )
            removed += (g.n_units - kept) * g.heads
        nominal = removed / max(1, self.prunable_channels())
        schedule = RATIO_SCHEDULES[self.config.ratio_schedule]
        self._tp.per_step_pruning_ratio = [float(r) for r in schedule(nominal, self.iterative_steps)]
        return dict(self.config.group_widths)

    def event_widths(self, event: int) -> dict[str, int]:
        """Units every ``group_widths`` group keeps after ``event`` (1-based): the schedule's share of the
        way from its width before the first event to its final width, in steps of its width rule."""
        assert self.group_widths is not None
        fractions = RATIO_SCHEDULES[self.config.ratio_schedule](1.0, self.iterative_steps)
        out = {}
        for name, kept in self.group_widths.items():
            start = self._initial_units[name]
            step = head_width_step(self.round_to or 1, self._initial_heads[name])
            out[name] = start - int((start - kept) * fractions[event] + 1e-9) // step * step
        out = {k: max(v, self.group_widths[k]) for k, v in out.items()}
        return out

    def unit_scores(self, group: CoupledGroup) -> torch.Tensor:
        """The criterion's score of every unit of ``group`` (an attention group's head dims: the mean over
        its heads, as Torch-Pruning ranks them)."""
        dg = self._tp.DG
        full = dg.get_pruning_group(group.root, group.handler, list(range(group.n_units * group.heads)))
        scores = self.importance(full)
        if scores is None:
            return torch.zeros(group.n_units)
        return scores.detach().float().cpu().view(group.heads, group.n_units).mean(0)

    def _prune_to_widths(self, widths: dict[str, int]) -> int:
        """Remove each named group's least important units down to ``widths``; returns the root channels
        removed. Every group is scored before any is pruned (one consistent state, as in Torch-Pruning)."""
        plan = []
        for g in self.coupled_groups():
            if g.name in widths and g.n_units > widths[g.name]:
                order = torch.argsort(self.unit_scores(g), stable=True)
                plan.append((g, order[: g.n_units - widths[g.name]]))
        dg = self._tp.DG
        removed = 0
        for g, units in plan:
            idxs = g.root_indices(units)
            dg.get_pruning_group(g.root, g.handler, idxs).prune()
            removed += len(idxs)
        self._groups = None
        return removed

    def event_budget(self, event: int) -> float:
        """The MACs / parameters a global-allocation budget allows after ``event`` (1-based): the
        budget's reduction shared out like the schedule's nominal ratios, so event ``k`` of ``n``
        removes ``nominal[k] / nominal[n]`` of what the whole run removes (the last event: the budget)."""
        assert self.budget
        absolute = next(iter(self.budget.values()))
        last = self._nominal_ratios[-1]
        share = self._nominal_ratios[event] / last if last > 0 else 1.0
        return self._budget_full - (self._budget_full - absolute) * min(1.0, share)

    def _global_ratio_for_budget(self) -> float:
        """The smallest cumulative ratio at which this event, ranking channels globally with the
        scores gathered for it, meets its share of the budget (:meth:`event_budget`). Each trial prunes
        a copy of the model with a pruner that carries this one's statistics and initial channel counts;
        trials are placed by interpolation (:func:`search_ratio`)."""
        assert self.budget
        name = next(iter(self.budget))
        event = self.completed_events + 1
        absolute = self.event_budget(event)
        stats_state = self.stats.state_dict() if self.stats is not None else None
        done = float(self._tp.per_step_pruning_ratio[self.completed_events])
        config = dataclasses.replace(self.config, iterative_steps=1, threshold=None)

        def after(ratio: float) -> int:
            trial_model = copy.deepcopy(self.model)
            trial = StructuredPruner(
                trial_model,
                dataclasses.replace(config, pruning_ratio=ratio),
                example_inputs=self._example_inputs,
                adapter=self.adapter,
                measure=False,
            )
            trial._tp._scope_initial_channels = dict(self._tp._scope_initial_channels)
            if stats_state is not None and trial.stats is not None:
                trial.stats.load_state_dict(stats_state)
            trial.step()
            return budget_measure(trial_model, name, self._example())

        # global ranking: one step of the ratio removes one channel of all the prunable channels
        resolution = 1.0 / max(1, int(self._tp.initial_total_channels))
        now = budget_measure(self.model, name, self._example())
        if now <= absolute:  # already within this event's share: the smallest step the schedule allows
            return done + resolution
        # the measure of a global ranking has cliffs (a ratio where many channels of one layer go at once):
        # more passes than the smooth uniform case needs
        ratio, _ = search_ratio(after, absolute, done, now, resolution, max_passes=14)
        if ratio is None:
            raise ConfigError(
                f"{name}={absolute:,.0f} cannot be reached with global allocation at event {event} of "
                f"{self.iterative_steps} (tried cumulative ratios up to 0.99)"
            )
        return ratio

    # ------------------------------------------------------------------ statistics
    def accumulate(self) -> bool:
        """Fold the current gradients into the statistics (gradient criteria; no-op otherwise)."""
        return self.stats.step() if self.stats is not None else True

    # ------------------------------------------------------------------ one event
    def step(
        self,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
        calibration: Sequence[torch.Tensor] | None = None,
        progress: Progress | None = None,
    ) -> PruningEvent:
        """Run the next pruning event on the live model and return what it did.

        ``optimizers`` are re-pointed at the new parameters with sliced state; ``.grad`` is cleared
        (call it after the optimizer step, as the callback does). ``reduce_mean``
        averages gradient statistics (and the reconstruction's sums) over processes first (DDP).
        ``calibration``: batches of network inputs for ``config.reconstruct``. ``progress(done, total,
        layer)`` is called after each refitted layer (:mod:`pqv_lightning.progress`).
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "pruning under torch.inference_mode() would create inference tensors; prune in a training hook"
            )
        if self.completed_events >= self.iterative_steps:
            raise RuntimeError(f"all {self.iterative_steps} pruning events have already run")
        if self.stats is not None:
            if reduce_mean is not None:
                self.stats.all_reduce(reduce_mean)
            if self.stats.steps == 0:
                raise RuntimeError(
                    f"importance={self.config.importance!r}: no gradient statistics were gathered before "
                    "this pruning event (call accumulate() after backward, before optimizer.step())"
                )
            assert isinstance(self.importance, StatisticsImportance)
            self.importance.bind_names(self.model)
        if isinstance(self.importance, SeededRandomImportance):
            self.importance.start_event(self.completed_events + 1)
        stat_steps = self.stats.steps if self.stats is not None else 0
        stat_samples = self.stats.samples if self.stats is not None else 0
        params_before = count_params(self.model)
        macs_before = self._macs_now
        was_training = self.model.training
        phases: dict[str, float] = {}  # where the event's time goes (PruningEvent.phase_seconds)
        t0 = time.perf_counter()
        # Gradients are consumed by then (statistics are separate); dropping them halves the copying.
        if self.budget and self.config.global_pruning:
            # global allocation: every event's ratio is settled on copies with this event's scores, so the
            # run follows the schedule in MACs / parameters and the last event lands on the budget
            with _timed(phases, "budget"):
                self._tp.per_step_pruning_ratio[self.completed_events + 1] = self._global_ratio_for_budget()
        self.model.zero_grad(set_to_none=True)
        with _timed(phases, "reference"):
            reference = self._reconstruction_reference(calibration)
        channels_before = self.prunable_channels()
        removed_by_threshold = 0
        with record_parameter_replacements() as log, torch.enable_grad():
            with _timed(phases, "score_and_remove"):  # Torch-Pruning: scores every group, removes channels
                if self.group_widths is not None:  # a width per group: this event's share of the way
                    self._tp.current_step += 1
                    self._prune_to_widths(self.event_widths(self.completed_events))
                else:
                    self._tp.step()
            with _timed(phases, "threshold"):
                after_ratio = coupled_groups(self)
                removed_by_ratio = channels_before - self.prunable_channels(after_ratio)
                if self.config.threshold is not None:
                    removed_by_threshold = self._threshold_prune(after_ratio)
        self._groups = None
        with _timed(phases, "optimizer"):
            live = list(self.model.parameters())
            remapped = sum(remap_optimizer(opt, log, live) for opt in optimizers)
            restore_requires_grad(log, live)
            self.adapter.sync_attributes(self.model, self.current_heads())
        fits = []
        if reference is not None:
            assert calibration is not None
            with _timed(phases, "reconstruction"):
                fits = self._reconstruct(reference, log, calibration, reduce_mean, progress)
            del reference
        self.model.train(was_training)
        seconds = time.perf_counter() - t0
        if self.stats is not None:
            self.stats.reset()
            self.stats.attach()
        with _timed(phases, "measure"):  # MACs after the event (a traced forward pass)
            macs_after = count_macs(self.model, self._example()) if self.measure else 0
        event = PruningEvent(
            index=self.completed_events,
            target_ratio=float(self._tp.per_step_pruning_ratio[self.completed_events]),
            ratio_reached=self.ratio_reached(),
            params_before=params_before,
            params_after=count_params(self.model),
            macs_before=macs_before,
            macs_after=macs_after,
            seconds=seconds,
            phase_seconds={k: round(v, 4) for k, v in phases.items() if k != "threshold" or self.config.threshold},
            widths=self.widths(),
            heads=self.current_heads(),
            optimizer_params_remapped=remapped,
            statistics_steps=stat_steps,
            statistics_samples=stat_samples,
            removed_by_ratio=removed_by_ratio,
            removed_by_threshold=removed_by_threshold,
            reconstruction_error_before=statistics.fmean(f.before for f in fits) if fits else None,
            reconstruction_error_after=statistics.fmean(f.after for f in fits) if fits else None,
        )
        self._macs_now = event.macs_after
        self.events.append(event)
        self._check_output_width(event.index)
        if event.target_ratio > 0 and event.removed_by_ratio == 0 and event.removed_by_threshold == 0:
            warnings.warn(
                f"pruning event {event.index}: nothing was removed (target ratio {event.target_ratio:.3f}; "
                "round_to, ignored_layers or the head rule leave no channel to remove at this ratio)",
                stacklevel=2,
            )
        return event

    def _reconstruction_reference(self, calibration: Sequence[torch.Tensor] | None) -> nn.Module | None:
        """A frozen copy of the network before this event, when it will be reconstructed."""
        if not self.config.reconstruct:
            return None
        if not calibration:
            raise RuntimeError(
                "PruningConfig(reconstruct=True): pass calibration input batches to step() "
                "(StructuredPruning collects them from the statistics window)"
            )
        return copy.deepcopy(self.model).eval().requires_grad_(False)

    def _reconstruction_layers(self) -> list[str]:
        return self.config.layers_to_refit(self.adapter, self.model)

    def _reconstruct(
        self,
        reference: nn.Module,
        log: Any,
        calibration: Sequence[torch.Tensor],
        reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None,
        progress: Progress | None = None,
    ) -> list[LayerFit]:
        """Refit ``config.reconstruct_layers``; the kept output indices come from the event's replacement log."""
        chains = log.chains()
        layers = self._reconstruction_layers()
        keep_out: dict[str, torch.Tensor | None] = {}
        for name in layers:
            weight = self.model.get_submodule(name).weight
            root, ops = chains.get(id(weight), (weight, []))
            index = torch.arange(root.shape[0])
            for keep, dim in ops:
                if dim == 0:
                    index = index[keep.cpu()]
            keep_out[name] = index if ops else None
        return reconstruct_linears(
            self.model,
            reference,
            layers,
            calibration,
            keep_out,
            ridge=self.config.reconstruct_ridge,
            reduce_mean=reduce_mean,
            stages=self.adapter.reconstruction_stages(self.model) or None,
            progress=progress,
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the pruned structure and continue the schedule.

        Plain Python types only, so checkpoints load with ``torch.load(weights_only=True)``.
        """
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "input_shape": list(self.input_shape),
            "history": [[n, bool(o), [int(i) for i in idx]] for n, o, idx in self._tp.pruning_history()],
            "current_step": int(self._tp.current_step),
            "ratios": [float(r) for r in self._tp.per_step_pruning_ratio],
            "scope_initial_channels": {str(k): int(v) for k, v in self._tp._scope_initial_channels.items()},
            "num_heads": self.current_heads(),
            "initial_params": int(self.initial_params),
            "initial_macs": int(self.initial_macs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay a saved structure on this (still unpruned) model and restore the schedule."""
        _check_state(state)
        if self.completed_events:
            raise RuntimeError("load_state_dict needs a pruner whose model has not been pruned yet")
        if state["current_step"] > self.iterative_steps:
            raise ValueError(
                f"the checkpoint ran {state['current_step']} pruning events but this run allows only "
                f"iterative_steps={self.iterative_steps}"
            )
        was_training = self.model.training
        with torch.enable_grad():
            self._tp.DG.load_pruning_history([list(h) for h in state["history"]])
        self.model.train(was_training)
        qkv_by_id = {id(q): q for q in self._tp.num_heads}
        by_name = {name: qkv_by_id[i] for i, name in self._attn_names.items() if i in qkv_by_id}
        for name, heads in state["num_heads"].items():
            qkv = by_name.get(name)
            if qkv is not None:
                self._tp.num_heads[qkv] = int(heads)
                if qkv in self._tp.out_channel_groups:
                    self._tp.out_channel_groups[qkv] = int(heads)
        self._tp._scope_initial_channels = dict(state["scope_initial_channels"])
        self._tp.current_step = int(state["current_step"])
        if "ratios" in state and len(state["ratios"]) == len(self._tp.per_step_pruning_ratio):
            self._tp.per_step_pruning_ratio = [float(r) for r in state["ratios"]]  # the ratios events settled
        saved_widths = state.get("config", {}).get("group_widths")
        if self.group_widths is not None and saved_widths:  # the run's own widths (a latency search may differ)
            self.group_widths = {str(k): int(v) for k, v in saved_widths.items()}
        self._groups = None
        self.adapter.sync_attributes(self.model, state["num_heads"])
        self.initial_params = int(state.get("initial_params", self.initial_params))
        self.initial_macs = int(state.get("initial_macs", self.initial_macs))
        self._macs_now = count_macs(self.model, self._example()) if self.measure else 0
        if self.stats is not None:
            self.stats.reset()
            self.stats.attach()


def _check_state(state: Any) -> None:
    if not isinstance(state, dict) or "history" not in state:
        raise ValueError("not a pqv_lightning pruning state (no 'history')")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"pruning state version {state.get('version')!r} is not supported (expected {STATE_VERSION})")


def restore_structure(model: nn.Module, state: dict[str, Any], adapter: ModelAdapter | None = None) -> nn.Module:
    """Reshape a freshly built, unpruned ``model`` in place to the structure saved in ``state``
    (from :meth:`StructuredPruner.state_dict`), so that a pruned ``state_dict`` loads into it."""
    _check_state(state)
    adapter = adapter or find_adapter(model)
    if adapter is None:
        raise no_adapter_error(model)
    was_training = model.training
    example = example_inputs_for(model, adapter, tuple(state["input_shape"]))
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(
            model,
            example.requires_grad_(True),
            unwrapped_parameters=adapter.unwrapped_parameters(model),
            verbose=False,
        )
        dg.load_pruning_history([list(h) for h in state["history"]])
    adapter.sync_attributes(model, state["num_heads"])
    model.train(was_training)
    return model


def prune_once(model: nn.Module, config: PruningConfig | None = None, **kwargs: Any) -> PruningEvent:
    """One-shot pruning: run every event of ``config`` back to back on ``model`` (in place).

    Only criteria that need no training statistics make sense here (``l1``, ``l2``, ``random``),
    unless ``kwargs['calibrate']`` is a callable that runs forward/backward passes: it is called
    before each event and its gradients are folded into the statistics. With
    ``config.reconstruct``, ``kwargs['calibration']`` (batches of network inputs) feeds the
    least-squares reconstruction after each event, and ``kwargs['progress']`` is told of each refitted
    layer (:mod:`pqv_lightning.progress`).
    """
    calibrate = kwargs.pop("calibrate", None)
    calibration = kwargs.pop("calibration", None)
    progress = kwargs.pop("progress", None)
    if calibrate is not None and not callable(calibrate):
        raise ConfigError(f"calibrate={calibrate!r} must be a callable that runs forward/backward passes on the model")
    pruner = StructuredPruner(model, config, **kwargs)
    event = None
    for _ in range(pruner.iterative_steps):
        if pruner.stats is not None:
            if calibrate is None:
                raise ValueError(
                    f"importance={pruner.config.importance!r} needs calibrate=callable for one-shot pruning"
                )
            model.zero_grad(set_to_none=True)
            calibrate(model)
            pruner.accumulate()
        event = pruner.step(calibration=calibration, progress=progress)
    assert event is not None
    return event


def _last_layer(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The Linear / conv layer that runs last in a forward pass (a classifier's output layer), as a
    one-element list; empty when there is none."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: order.append(name))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order[-1:]


def _check_model_and_config(model: Any, config: Any) -> PruningConfig:
    """``model`` is an nn.Module; ``config`` None (the defaults) or a valid :class:`PruningConfig`."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    config = PruningConfig() if config is None else config
    if not isinstance(config, PruningConfig):
        raise ConfigError(f"config must be a PruningConfig, got {type(config).__name__}")
    config.validate()
    return config


def ratio_for_budget(
    model: nn.Module,
    config: PruningConfig | None = None,
    *,
    target_macs: float | None = None,
    target_params: float | None = None,
    example_inputs: torch.Tensor | None = None,
    adapter: ModelAdapter | None = None,
    max_passes: int = 8,
) -> float:
    """The smallest channel ``pruning_ratio`` at which ``model`` pruned with ``config`` has at most
    ``target_macs`` MACs or ``target_params`` parameters (absolute, or a fraction of the unpruned model
    when < 1; default: ``config``'s budget). ``model`` is not changed: every trial prunes a copy, and
    the trials are placed by interpolation (:func:`search_ratio`), so the search costs a few pruning
    passes (at most ``max_passes``; 2-7 on the families tried: ViT, DeiT-S, ResNet, ConvNeXt).

    With uniform allocation (``global_pruning=False``, the default) each layer keeps the same share of
    its channels whichever criterion picks them, so the structure, and with it MACs and parameters,
    depends on the ratio alone: the ratio found here lands on the budget within one channel group at
    the last event of any schedule. With global allocation the structure depends on the scores the run
    gathers: the uniform ratio returned here is only the schedule's nominal ratio (and the check that
    the budget is reachable); :class:`StructuredPruner` settles every event's ratio with that event's
    scores.

    Raises:
        ConfigError: neither or both targets, a target <= 0 or >= the unpruned model, or a budget this
            model cannot reach with its ignored layers.
    """
    config = _check_model_and_config(model, config)
    given = {k: v for k, v in (("target_macs", target_macs), ("target_params", target_params)) if v is not None}
    budget = given or config.budget
    if len(budget) != 1:
        raise ConfigError(
            f"give exactly one of target_macs / target_params (got target_macs={target_macs!r}, "
            f"target_params={target_params!r})"
        )
    check_int("max_passes", max_passes, minimum=1)
    adapter = adapter or find_adapter(model)
    if adapter is None:
        raise no_adapter_error(model)
    if example_inputs is None:
        example_inputs = example_inputs_for(model, adapter)
    ((name, target),) = budget.items()
    check_budget_value(name, target)
    full = budget_measure(model, name, example_inputs)
    absolute = target * full if target < 1 else target
    if absolute >= full:
        raise ConfigError(
            f"{name}={target!r} is not below the unpruned model ({full:,}); allowed: a fraction in "
            f"(0, 1) or an absolute count below {full:,}"
        )

    def after(ratio: float) -> int:
        trial = copy.deepcopy(model)
        prune_once(
            trial,
            config.structure_trial(ratio),
            example_inputs=example_inputs,
            adapter=adapter,
        )
        return budget_measure(trial, name, example_inputs)

    ratio, smallest = search_ratio(after, absolute, 0.0, full, ratio_resolution(model), max_passes=max_passes)
    if ratio is None:
        raise ConfigError(
            f"{name}={target!r} ({absolute:,.0f}) cannot be reached: pruning up to 99 % of the channels "
            f"leaves at least {smallest:,.0f} (ignored layers and the layers its adapter keeps whole keep the rest)"
        )
    return ratio
