"""Lightning glue for :class:`pqv_lightning.pruning.StructuredPruner`."""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import math
from collections import Counter
from dataclasses import asdict, replace
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch import callbacks as cb
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from ..checks import check_forward, check_int, check_number, check_shape
from ..errors import ConfigError
from ..export.targets import TARGETS
from ..latency_budget import LatencyBudget, check_global_heads, ratio_for_latency, widths_for_latency
from ..progress import progress_bar
from ..pruning import EventSchedule, PruningConfig, PruningEvent, StructuredPruner
from ..pruning.adapters import check_model_attr, example_inputs_for, locate_model
from ..pruning.checkpoint import CHECKPOINT_KEY, check_checkpoint_shapes
from ..pruning.sparsity import GroupSparsity
from ..widths import width_rule
from .strategies import refuse_sharding_strategies

__all__ = ["CHECKPOINT_KEY", "StructuredPruning"]

_SHADOWED = ("on_save_checkpoint", "on_load_checkpoint")
#: the events of a callback that is not told how many (gradual pruning; one-shot ``PruningConfig``: 1)
ITERATIVE_STEPS = 4
# the defaults of the options below are these classes' own (one source: tests/test_options.py)
_P, _S = PruningConfig, EventSchedule


class _WriteStructure:
    """The ``on_save_checkpoint`` left on a pruned LightningModule once the Trainer is done with it.

    Lightning skips callbacks' ``on_save_checkpoint`` for weights-only saves, but always calls the
    module's, so a pruned module keeps writing its (now frozen) structure into every checkpoint.
    Unlike a closure over the callback it pickles and deep-copies with the module (``ddp_spawn``,
    ``torch.save(module)``, ``copy.deepcopy``): it holds only the module and plain data.
    """

    def __init__(self, module: pl.LightningModule, structure: dict[str, Any]) -> None:
        self.module, self.structure = module, structure

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        type(self.module).on_save_checkpoint(self.module, checkpoint)
        checkpoint[CHECKPOINT_KEY] = self.structure


class StructuredPruning(Callback):
    r"""Iteratively prune a timm Vision Transformer while it fine-tunes: channels, head dims, whole
    heads and MLP units are physically removed (Torch-Pruning DepGraph groups), not masked.

    Add it to an existing ``Trainer``; the ``LightningModule`` stays unchanged.

    The pruned network is found as ``getattr(pl_module, model_attr)`` (a dotted path such as
    ``"model"`` or ``"net.backbone"``) or, when ``model_attr`` is None, as the module itself or its
    single outermost submodule of a supported class (see :func:`pqv_lightning.register_adapter`).

    Schedule: ``iterative_steps`` events (default 4, gradual), placed by the
    :class:`~pqv_lightning.pruning.EventSchedule` options (``accumulate_batches``, ``interval``,
    ``start``, ``frequency``); each event runs right after its statistics window, whose gradients
    (unscaled, synchronised across DDP ranks, non-finite steps skipped) feed the ``taylor`` /
    ``hessian`` scores. Magnitude and random criteria ignore the statistics but keep the same timing.

    After each event the optimizers hold exactly the new parameters with their state (e.g. Adam
    moments) sliced to the kept channels, LR schedulers continue, DDP is re-wrapped, and params,
    MACs, the ratio reached and the event time go to every logger (plus per-event and per-layer
    tables with ``WandbLogger``).

    Checkpoints carry the structure under ``checkpoint["pqv_structured_pruning"]`` (also in
    weights-only checkpoints), so ``trainer.fit(ckpt_path=...)`` resumes with pruned shapes and
    :func:`pqv_lightning.load_pruned_checkpoint` loads the pruned module.

    Every option is documented once, where it lives (the defaults here are read from there; a test
    checks that they agree):

    * what to prune and how — :class:`~pqv_lightning.pruning.PruningConfig`: ``importance``,
      ``pruning_ratio``, ``target_macs`` / ``target_params`` (a budget instead of a ratio),
      ``iterative_steps``, ``prune_num_heads``, ``head_pruning_ratio``, ``prune_head_dims``,
      ``round_to``, ``ignored_layers``, ``global_pruning``, ``seed``, ``ratio_schedule``,
      ``threshold``, ``reconstruct``, ``reconstruct_layers``, ``reconstruct_ridge``;
    * when — :class:`~pqv_lightning.pruning.EventSchedule`: ``accumulate_batches``, ``interval``,
      ``start``, ``frequency``;
    * group-sparsity training — :class:`~pqv_lightning.pruning.sparsity.GroupSparsity`:
      ``regularization`` (its ``norm``; None: off), ``reg_strength``, ``reg_alpha``.

    Args (the callback's own):
        iterative_steps: number of pruning events (4 here; ``PruningConfig``'s 1 is one-shot).
        model_attr: dotted path of the network inside the LightningModule.
        example_input_shape: ``[C, H, W]`` for tracing when the model cannot tell its input size.
        reg_strength_end: λ at the last event (it grows linearly from ``reg_strength``); None = constant.
            The penalty's gradient is added to the real (unscaled, DDP-synchronised) gradients in
            ``on_before_optimizer_step`` from the first optimizer step until the last event; the steps
            before the first window (``start``) form a sparse-training phase.
        reconstruct_samples: how many training inputs (the latest of the window) the least-squares
            reconstruction uses (DDP: the sums are averaged over ranks, every rank gets the same
            weights). A checkpoint saved inside a window keeps those collected so far (resume is exact).
        widths_for: the export format the pruned model is meant for (a name in
            :data:`~pqv_lightning.export.TARGETS`): its runtime's fastest width rule at equal MACs
            (``ExportTarget.pruning_defaults``) becomes the default of ``prune_num_heads`` /
            ``prune_head_dims`` (:func:`pqv_lightning.widths.width_rule`); values given explicitly
            win. ``"openvino"``: whole heads instead of head dims, 1.12x faster int8 on DeiT-base
            with AMX, at an accuracy cost (docs/pruning.md); the others change nothing.
        target_latency: a latency budget instead of a ratio: ms per batch-1 call, or below 1 a fraction of
            the unpruned model's latency, of the ``widths_for`` file at ``latency_precision`` on this host.
            When ``fit`` starts (``on_fit_start``: global rank 0, then sent to every rank) the smallest
            channel ratio that meets it is found by exporting and timing copies of the unpruned network
            round-robin against its own file (:func:`~pqv_lightning.latency_budget.ratio_for_latency`,
            uniform allocation; a few minutes for a small model); the run then prunes to that ratio. A fit
            resumed from a checkpoint takes the ratio (or widths) from it and measures nothing. Needs
            ``widths_for``; not with ``pruning_ratio`` or a MAC / parameter budget. ``latency_search``
            holds what was measured.
        latency_precision: the precision of that file (:class:`~pqv_lightning.latency_budget.LatencyBudget`).
        latency_allocation: how the widths that meet ``target_latency`` are chosen: ``"uniform"`` (one channel
            ratio) or ``"global"`` (a width per group from a per-layer latency table of the runtime,
            :func:`~pqv_lightning.latency_budget.widths_for_latency`; it sets ``group_widths``).

    Example::

        import lightning.pytorch as pl
        from pqv_lightning import StructuredPruning

        trainer = pl.Trainer(max_epochs=4, callbacks=[
            StructuredPruning(importance="taylor", pruning_ratio=0.5, iterative_steps=3,
                              accumulate_batches=16, interval="epoch", start=0, frequency=1),
        ])
        trainer.fit(lit_module, datamodule=dm)   # lit_module.model is a timm ViT / DeiT

    Raises:
        ConfigError: when created, for any argument out of range (ratios, schedule, criterion not in
            ``IMPORTANCE``, both a ratio and a budget, two budgets, a global budget with a random
            criterion, negative ``reg_strength``, ``threshold`` outside ``(0, 1)``); at
            ``setup`` (before the first step), for a budget the model cannot reach, a schedule that
            does not fit ``max_epochs`` / ``max_steps``, a strategy that reshapes or restores
            parameters behind the callback's back (FSDP, DeepSpeed, ModelParallel), a network that
            cannot be found or several candidates; when a checkpoint is loaded, for one pruned at
            another ``model_attr`` or with another history than this run can replay.
    """

    def __init__(
        self,
        importance: str = _P.importance,
        pruning_ratio: float | None = _P.pruning_ratio,
        iterative_steps: int = ITERATIVE_STEPS,
        accumulate_batches: int = _S.accumulate_batches,
        interval: Literal["epoch", "step"] = _S.interval,  # type: ignore[assignment]
        start: int = _S.start,
        frequency: int = _S.frequency,
        prune_num_heads: bool | None = _P.prune_num_heads,
        head_pruning_ratio: float | None = _P.head_pruning_ratio,
        prune_head_dims: bool | None = _P.prune_head_dims,
        round_to: int | None = _P.round_to,
        ignored_layers: list[str] | None = _P.ignored_layers,
        global_pruning: bool = _P.global_pruning,
        model_attr: str | None = None,
        example_input_shape: list[int] | None = None,
        seed: int = _P.seed,
        ratio_schedule: Literal["linear", "cubic"] = _P.ratio_schedule,  # type: ignore[assignment]
        target_macs: float | None = _P.target_macs,
        target_params: float | None = _P.target_params,
        regularization: Literal["l1", "l2"] | None = None,
        reg_strength: float = GroupSparsity.strength,
        reg_strength_end: float | None = None,
        reg_alpha: float = GroupSparsity.alpha,
        threshold: float | None = _P.threshold,
        reconstruct: bool = _P.reconstruct,
        reconstruct_layers: Literal["all", "residual"] = _P.reconstruct_layers,  # type: ignore[assignment]
        reconstruct_samples: int = 256,
        reconstruct_ridge: float = _P.reconstruct_ridge,
        widths_for: str | None = None,
        target_latency: float | None = None,
        latency_precision: str = LatencyBudget.precision,
        latency_allocation: Literal["uniform", "global"] = LatencyBudget.allocation,  # type: ignore[assignment]
        group_widths: dict[str, int] | None = _P.group_widths,
    ) -> None:
        super().__init__()
        if widths_for is not None:
            TARGETS.check(widths_for, "widths_for")
        #: a latency budget on ``widths_for``'s runtime (resolved to a channel ratio when ``fit`` starts)
        self.target_latency, self.latency_precision = target_latency, latency_precision
        self.latency_allocation = latency_allocation
        if target_latency is not None:
            if widths_for is None:
                raise ConfigError(
                    f"target_latency={target_latency!r} is measured on the runtime the model is meant for: give "
                    f"widths_for (one of {TARGETS.names()})"
                )
            decided = {
                k: v
                for k, v in (
                    ("pruning_ratio", pruning_ratio),
                    ("target_macs", target_macs),
                    ("target_params", target_params),
                    ("group_widths", group_widths),
                )
                if v is not None
            }
            if decided:
                raise ConfigError(
                    f"give target_latency={target_latency!r} or {decided}, not both: each decides the ratio"
                )
            if global_pruning:
                raise ConfigError(
                    f"target_latency={target_latency!r} is met with uniform allocation (every layer keeps the same "
                    "share of its channels); allowed: global_pruning=False"
                )
            LatencyBudget(
                target_latency, format=widths_for, precision=latency_precision, allocation=latency_allocation
            ).validate()
        #: the export format whose runtime's width rule the pruning follows (None: the defaults)
        self.widths_for = widths_for
        rule = width_rule(
            TARGETS[widths_for].pruning_defaults if widths_for else {},
            prune_num_heads=prune_num_heads,
            prune_head_dims=prune_head_dims,
        )
        if target_latency is not None and latency_allocation == "global":
            by = "you" if prune_num_heads else f"widths_for={widths_for!r}'s width rule"
            check_global_heads(bool(rule["prune_num_heads"]), by)
        self.config = PruningConfig(
            importance=importance,
            pruning_ratio=pruning_ratio,
            iterative_steps=iterative_steps,
            head_pruning_ratio=head_pruning_ratio,
            round_to=round_to,
            ignored_layers=list(ignored_layers) if isinstance(ignored_layers, tuple) else ignored_layers,
            global_pruning=global_pruning,
            seed=seed,
            ratio_schedule=ratio_schedule,
            threshold=threshold,
            reconstruct=reconstruct,
            reconstruct_layers=reconstruct_layers,
            reconstruct_ridge=reconstruct_ridge,
            target_macs=target_macs,
            target_params=target_params,
            group_widths=group_widths,
            **rule,
        )
        self.config.validate()
        self.schedule = EventSchedule(
            accumulate_batches=accumulate_batches, interval=interval, start=start, frequency=frequency
        )
        self.schedule.validate()
        self.regularization = None
        self.reg_strength_end = reg_strength_end
        if regularization is not None:
            self.regularization = GroupSparsity(regularization, reg_strength, reg_alpha)
            if reg_strength_end is not None:
                check_number("reg_strength_end", reg_strength_end, minimum=0)
        elif reg_strength_end is not None:
            raise ConfigError(f"reg_strength_end={reg_strength_end!r} needs regularization='l1' or 'l2'")
        check_int("reconstruct_samples", reconstruct_samples, 1)
        check_model_attr(model_attr)
        if example_input_shape is not None:
            check_shape("example_input_shape", example_input_shape)
        self.model_attr = model_attr
        self.example_input_shape = example_input_shape
        self.pruner: StructuredPruner | None = None
        self.events: list[PruningEvent] = []
        self._located_attr: str | None = None
        self._window_steps = 0
        self._stepped = False
        self._window_open_now = False
        self._reg_last_step: int | None = None  # optimizer step of the last event (for the growing strength)
        self.reconstruct_samples = reconstruct_samples
        self._calibration: list[torch.Tensor] = []  # network inputs of the open window (reconstruction)
        self._capture_handle: Any = None
        #: what the latency budget's search measured (:func:`~pqv_lightning.latency_budget.ratio_for_latency`)
        self.latency_search: dict[str, Any] | None = None
        #: (network, adapter, example) whose pruner waits for the latency budget's decision: from the checkpoint
        #: of a resumed fit, else measured in ``on_fit_start``
        self._pending: tuple[torch.nn.Module, Any, Any] | None = None

    @property
    def latency_budget(self) -> LatencyBudget | None:
        """The :class:`~pqv_lightning.latency_budget.LatencyBudget` of ``target_latency``, or None."""
        if self.target_latency is None or self.widths_for is None:
            return None
        return LatencyBudget(
            self.target_latency,
            format=self.widths_for,
            precision=self.latency_precision,
            allocation=self.latency_allocation,
        )

    # ------------------------------------------------------------------ identity / state
    @property
    @override
    def state_key(self) -> str:
        if self.target_latency is not None:  # the ratio is measured at fit start; the budget identifies the callback
            return self._generate_state_key(
                importance=self.config.importance,
                model_attr=self.model_attr,
                target_latency=self.target_latency,
                widths_for=self.widths_for,
                **({"latency_allocation": "global"} if self.latency_allocation == "global" else {}),
            )
        if self.config.budget:  # the ratio is derived in setup; the budget is what identifies the callback
            return self._generate_state_key(
                importance=self.config.importance, model_attr=self.model_attr, **self.config.budget
            )
        return self._generate_state_key(
            importance=self.config.importance, pruning_ratio=self.config.pruning_ratio, model_attr=self.model_attr
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        stats = self.pruner.stats.state_dict() if self.pruner is not None and self.pruner.stats is not None else None
        return {
            "window_steps": self._window_steps,
            "stats": stats,
            "events": [asdict(e) for e in self.events],
            "calibration": [t.cpu() for t in self._calibration],
            "latency_search": self.latency_search,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._window_steps = int(state_dict.get("window_steps", 0))
        self.events = [PruningEvent(**e) for e in state_dict.get("events", [])]
        self._calibration = list(state_dict.get("calibration", []))
        self.latency_search = state_dict.get("latency_search", self.latency_search)
        stats = state_dict.get("stats")
        if stats is not None and self.pruner is not None and self.pruner.stats is not None:
            self.pruner.stats.load_state_dict(stats)

    # ------------------------------------------------------------------ setup / teardown
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_strategy(trainer)
            self._check_schedule_against_trainer(trainer)
        attr, model, adapter = locate_model(pl_module, self.model_attr)
        if "_orig_mod" in attr.split("."):
            raise ConfigError(
                f"StructuredPruning found the network inside a torch.compile wrapper (pl_module.{attr}); every "
                "event would force a recompile. Compile after pruning, or pass the uncompiled module"
            )
        if self.pruner is None or self.pruner.model is not model:
            example = None
            if self.example_input_shape is not None:
                example = example_inputs_for(model, adapter, tuple(self.example_input_shape))
                check_forward("example_input_shape", model, example)
            self._located_attr = attr
            if self.target_latency is not None and self.latency_search is None:
                # decided after the checkpoint restore (Lightning restores after setup): a resumed fit's
                # checkpoint holds the decision, so only a fresh fit measures (on_fit_start)
                self.pruner, self._pending = None, (model, adapter, example)
            else:
                self._build_pruner(model, adapter, example)
        # validate/test/predict(ckpt_path=...) need the pruned shapes too
        self._install_module_hooks(pl_module)

    def _build_pruner(self, model: torch.nn.Module, adapter: Any, example: Any) -> None:
        # a budget's ratio is derived here, before training: an unreachable budget fails now
        self.pruner = StructuredPruner(model, self.config, example_inputs=example, adapter=adapter)
        self._pending = None
        if self.config.budget:
            rank_zero_info(
                f"StructuredPruning: budget {self.config.budget} -> channel ratio {self.pruner.config.pruning_ratio:.4f}"
            )
        attr = self._located_attr
        rank_zero_info(
            f"StructuredPruning: pruning {type(model).__name__} at "
            f"{'pl_module' + ('.' + attr if attr else '')}, {self.pruner.initial_params:,} params, "
            f"{self.pruner.initial_macs / 1e6:.1f} MMACs; ignored layers {self.pruner.ignored_names}"
            + "".join(
                f"; kept whole by its adapter: {count} layers ({why})"
                for why, count in Counter(self.pruner.kept_whole.values()).items()
            )
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:  # a fresh fit under a latency budget (no checkpoint decided it): measure
            model, adapter, example = self._pending
            if example is not None:  # the network may have moved to its device since setup
                example = example.to(next(model.parameters()).device)
            self._resolve_latency(trainer, model, adapter, example)
            self._build_pruner(model, adapter, example)

    def _decide_from_checkpoint(self, trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
        """Build the pending pruner with the decision of the run a checkpoint comes from (a resumed fit,
        ``validate(ckpt_path=...)``): its structure state holds the ratio or the group widths the latency
        budget was met with, so nothing is measured again; what that run measured comes along when the
        checkpoint holds this callback's state. A structure without a decision is measured."""
        assert self._pending is not None
        model, adapter, example = self._pending
        run = checkpoint[CHECKPOINT_KEY].get("config") or {}
        widths, ratio = run.get("group_widths"), run.get("pruning_ratio")
        decided = widths if self.latency_allocation == "global" else (ratio if not widths else None)
        if decided:
            self._set_decision(decided)
            state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
            self.latency_search = state.get("latency_search")
            budget = self.latency_budget
            assert budget is not None
            rank_zero_info(
                f"StructuredPruning: latency budget {budget.describe()} -> the widths of the run the checkpoint "
                "comes from (not measured again)"
            )
        else:
            self._resolve_latency(trainer, model, adapter, example)
        self._build_pruner(model, adapter, example)

    def _resolve_latency(self, trainer: pl.Trainer, model: torch.nn.Module, adapter: Any, example: Any) -> None:
        """The channel ratio that meets the latency budget, measured once (global rank 0, exporting and
        timing copies of the unpruned network) and sent to every rank, so all prune alike. A resumed fit
        does not get here: it takes the decision of its checkpoint (:meth:`_decide_from_checkpoint`)."""
        budget = self.latency_budget
        assert budget is not None
        found: tuple[Any, dict[str, Any]] | None = None
        if trainer.is_global_zero:
            reference = copy.deepcopy(model).float().cpu().eval()
            shape = tuple(example.shape) if example is not None else None
            search_for = widths_for_latency if budget.allocation == "global" else ratio_for_latency
            found = search_for(
                reference,
                budget,
                self.config,
                example_inputs=example_inputs_for(reference, adapter, shape),
            )
        received: tuple[Any, dict[str, Any]] = trainer.strategy.broadcast(found, src=0)  # type: ignore[assignment]
        self._apply_latency(*received)

    def _apply_latency(self, decided: Any, search: dict[str, Any]) -> None:
        """Prune to the latency search's decision: a channel ratio, or (global allocation) a width per group."""
        budget = self.latency_budget
        assert budget is not None
        self.latency_search = search
        self._set_decision(decided)
        if budget.allocation == "global":
            rank_zero_info(
                f"StructuredPruning: latency budget {budget.describe()} -> a width per group, predicted "
                f"{search['predicted_ms']:.2f} ms, its file measured {search['measured_ms']:.2f} ms, "
                f"{search['measured_fraction']:.3f} of the unpruned {search['unpruned_ms']:.2f} ms on this host"
            )
            return
        rank_zero_info(
            f"StructuredPruning: latency budget {budget.describe()} -> channel ratio {decided:.4f} (its file measured "
            f"{search['predicted_ms']:.2f} ms, {search['predicted_fraction']:.3f} of the unpruned "
            f"{search['unpruned_ms']:.2f} ms on this host, {len(search['trials'])} trials)"
        )

    def _set_decision(self, decided: Any) -> None:
        """Prune to a latency budget's decision: a width per group (global allocation) or a channel ratio."""
        if self.latency_allocation == "global":
            self.config = replace(
                self.config, pruning_ratio=None, group_widths={str(k): int(v) for k, v in decided.items()}
            )
        else:
            self.config = replace(self.config, pruning_ratio=float(decided))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release_capture()  # an exception inside a step skips on_train_batch_end
        for name in _SHADOWED:
            pl_module.__dict__.pop(name, None)
        if self.pruner is not None and self.pruner.completed_events:
            # the module is pruned for good: keep its structure in every later checkpoint of it
            pl_module.on_save_checkpoint = _WriteStructure(pl_module, self._structure())  # type: ignore[method-assign]
        if stage == "fit" and self.pruner is not None and self.pruner.stats is not None:
            self.pruner.stats.detach()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release_capture()
        if self.pruner is not None and self.pruner.stats is not None:
            self.pruner.stats.detach()  # no gradient hooks left on the model that gets exported

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        refuse_sharding_strategies(trainer, "StructuredPruning", "they cannot be reshaped mid-fit")
        averaging = tuple(getattr(cb, n) for n in ("StochasticWeightAveraging", "WeightAveraging") if hasattr(cb, n))
        clash = [type(c).__name__ for c in trainer.callbacks if isinstance(c, averaging)]  # type: ignore[attr-defined]
        if clash:
            raise ConfigError(
                f"StructuredPruning cannot run with {clash}: they keep a copy of the model whose shapes would go stale"
            )

    def _check_schedule_against_trainer(self, trainer: pl.Trainer) -> None:
        schedule, events = self.schedule, self.config.iterative_steps
        if schedule.interval == "epoch":
            last_window = schedule.window_opens(events - 1)
            max_epochs = trainer.max_epochs
            if max_epochs is not None and max_epochs >= 0 and last_window >= max_epochs:
                raise ConfigError(
                    f"the pruning schedule needs epoch {last_window} ({schedule.describe(events)}) but "
                    f"max_epochs={max_epochs}; allowed: start + (iterative_steps - 1) * frequency < max_epochs"
                )
        else:
            last_step = schedule.last_step(events)
            if trainer.max_steps is not None and trainer.max_steps > 0 and last_step > trainer.max_steps:
                raise ConfigError(
                    f"the pruning schedule needs optimizer step {last_step} ({schedule.describe(events)}) but "
                    f"max_steps={trainer.max_steps}"
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedule, events = self.schedule, self.config.iterative_steps
        batches = trainer.num_training_batches
        if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0:
            steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
            if schedule.interval == "epoch" and schedule.accumulate_batches > steps_per_epoch:
                raise ConfigError(
                    f"accumulate_batches={schedule.accumulate_batches} exceeds the {steps_per_epoch} optimizer steps "
                    f"of one epoch; allowed: 1..{steps_per_epoch} with interval='epoch'"
                )
            if schedule.interval == "step" and trainer.max_epochs is not None and trainer.max_epochs > 0:
                budget = steps_per_epoch * trainer.max_epochs
                if trainer.max_steps is not None and trainer.max_steps > 0:
                    budget = min(budget, trainer.max_steps)
                last_step = schedule.last_step(events)
                if last_step > budget:
                    raise ConfigError(
                        f"the pruning schedule needs optimizer step {last_step} but this fit runs {budget} steps "
                        f"(max_epochs={trainer.max_epochs})"
                    )
            if schedule.interval == "epoch":
                self._reg_last_step = schedule.last_step(events, steps_per_epoch)
        if schedule.interval == "step":
            self._reg_last_step = schedule.last_step(events)
        assert self.pruner is not None
        if self.pruner.stats is not None:
            self.pruner.stats.attach()  # parameters may have been replaced by a checkpoint replay

    # ------------------------------------------------------------------ checkpoint structure
    def _structure(self) -> dict[str, Any]:
        assert self.pruner is not None
        return {"model_attr": self._located_attr, **self.pruner.state_dict()}

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Every full save while this callback is in the Trainer: during fit, and after it
        # (``trainer.save_checkpoint("final.ckpt")``), when ``teardown`` has removed the module hooks.
        if self.pruner is not None:
            checkpoint[CHECKPOINT_KEY] = self._structure()

    def _install_module_hooks(self, pl_module: pl.LightningModule) -> None:
        # Instance attributes shadow the module's own hooks for the length of one stage. The load side
        # must be the *module's* hook: Lightning calls it before the weights load, callbacks' hooks run
        # after, too late to reshape. The save side covers weights-only saves, which skip callbacks.
        for name in _SHADOWED:
            pl_module.__dict__.pop(name, None)
        original_save, original_load = pl_module.on_save_checkpoint, pl_module.on_load_checkpoint

        def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
            original_save(checkpoint)
            if self.pruner is not None:  # None: a latency budget not decided yet, the network unpruned
                checkpoint[CHECKPOINT_KEY] = self._structure()

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            state = checkpoint.get(CHECKPOINT_KEY)
            if state is None:
                check_checkpoint_shapes(pl_module, checkpoint)
            else:
                if self._pending is not None:  # the latency decision of the run this checkpoint comes from
                    self._decide_from_checkpoint(pl_module.trainer, checkpoint)
                assert self.pruner is not None
                if state.get("model_attr") != self._located_attr:
                    raise ConfigError(
                        f"checkpoint was pruned at model_attr={state.get('model_attr')!r}, this run prunes "
                        f"{self._located_attr!r}"
                    )
                current = self.pruner.state_dict()["history"]
                if state["history"] != current:
                    if self.pruner.completed_events:
                        raise ConfigError(
                            f"this checkpoint holds the structure after {state['current_step']} pruning events, the "
                            f"model in memory has had {self.pruner.completed_events} other ones; load the checkpoint "
                            "into a fresh module (pqv_lightning.load_pruned_checkpoint)"
                        )
                    self.pruner.load_state_dict(state)
                    self.events = []
            original_load(checkpoint)

        pl_module.on_save_checkpoint = on_save_checkpoint  # type: ignore[method-assign]
        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]

    # ------------------------------------------------------------------ schedule
    def _done(self) -> bool:
        return self.pruner is None or self.pruner.completed_events >= self.config.iterative_steps

    def _window_open(self, trainer: pl.Trainer) -> bool:
        if self._done():
            return False
        assert self.pruner is not None
        opens_at = self.schedule.window_opens(self.pruner.completed_events)
        now = trainer.current_epoch if self.schedule.interval == "epoch" else trainer.global_step
        return now >= opens_at

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._window_open_now = self._window_open(trainer)
        if self.pruner is not None and self.pruner.stats is not None:
            self.pruner.stats.enabled = self._window_open_now
        if self.config.reconstruct and self._window_open_now and self._capture_handle is None:
            # on the network for this batch only (removed in on_train_batch_end): nothing stays behind
            assert self.pruner is not None
            self._capture_handle = self.pruner.model.register_forward_pre_hook(self._capture_input)

    def _capture_input(self, module: torch.nn.Module, args: tuple) -> None:
        # the hook is on only inside a training step (a network the user put in eval mode trains too)
        if not args or not torch.is_tensor(args[0]):
            return
        self._calibration.append(args[0].detach().clone())
        # keep the latest reconstruct_samples inputs
        while len(self._calibration) > 1 and sum(len(t) for t in self._calibration[1:]) >= self.reconstruct_samples:
            self._calibration.pop(0)

    def _release_capture(self) -> None:
        if self._capture_handle is not None:
            self._capture_handle.remove()
            self._capture_handle = None

    def _calibration_batches(self) -> list[torch.Tensor]:
        """The captured inputs, trimmed to ``reconstruct_samples``."""
        batches, excess = list(self._calibration), sum(len(t) for t in self._calibration) - self.reconstruct_samples
        if excess > 0:
            batches[0] = batches[0][excess:]
        return batches

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        stats = self.pruner.stats if self.pruner is not None else None
        if stats is not None and stats.criterion == "hessian" and self._window_open_now:
            stats.set_grad_scale(self._loss_scale(trainer))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True
        self._collect_statistics(trainer, optimizer)
        if self.regularization is not None and not self._done():
            # after the statistics: Taylor / Hessian scores see the task gradients only
            assert self.pruner is not None
            reg = self.reg_at(trainer.global_step)
            penalty = self.pruner.regularize(reg)
            pl_module.log_dict(
                {"pruning/reg_penalty": penalty, "pruning/reg_strength": reg.strength}, on_step=True, on_epoch=False
            )

    def reg_at(self, step: int) -> GroupSparsity:
        """The regularization at optimizer step ``step``: the strength grows linearly from
        ``reg_strength`` to ``reg_strength_end`` at the last event."""
        assert self.regularization is not None
        reg = self.regularization
        if self.reg_strength_end is None or not self._reg_last_step:
            return reg
        progress = min(1.0, step / self._reg_last_step)
        strength = reg.strength + (self.reg_strength_end - reg.strength) * progress
        return GroupSparsity(reg.norm, strength, reg.alpha)

    def _collect_statistics(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        if not self._window_open_now:
            if self.pruner is not None and self.pruner.stats is not None:
                self.pruner.stats.discard_pending()
            return
        assert self.pruner is not None
        if self.pruner.stats is None:
            self._window_steps += 1
            return
        # Lightning unscales before this hook, except for optimizers that unscale in step().
        scale = self._loss_scale(trainer) if getattr(optimizer, "_step_supports_amp_scaling", False) else 1.0
        if self.pruner.stats.step(grad_scale=scale):
            self._window_steps += 1

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._release_capture()
        if not self._stepped:
            return  # inside a gradient-accumulation window: never prune here
        self._stepped = False
        if self._window_open_now and self._window_steps >= self.schedule.accumulate_batches:
            self._prune(trainer, pl_module)

    @staticmethod
    def _loss_scale(trainer: pl.Trainer) -> float:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    # ------------------------------------------------------------------ one event
    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.pruner is not None
        strategy = trainer.strategy
        distributed = trainer.world_size > 1

        def reduce_mean(t: torch.Tensor) -> torch.Tensor:
            return strategy.reduce(t, reduce_op="mean")

        calibration = self._calibration_batches() if self.config.reconstruct else None
        description = f"StructuredPruning event {self.pruner.completed_events + 1}: reconstruction"
        with progress_bar(description, enabled=trainer.is_global_zero and self.config.reconstruct) as progress:
            event = self.pruner.step(
                optimizers=trainer.optimizers,
                reduce_mean=reduce_mean if distributed else None,
                calibration=calibration,
                progress=progress,
            )
        self._window_steps = 0
        self._calibration = []
        if distributed:
            self._rewrap_ddp(trainer)
            digest = _digest(self.pruner.state_dict()["history"])
            reference = strategy.broadcast(digest, src=0)
            if reference != digest:
                raise RuntimeError(
                    f"pruning decisions differ between ranks at event {event.index} (rank {trainer.global_rank}); "
                    "refusing to continue with diverged models"
                )
        self.events.append(event)
        self._log_event(trainer, event)

    @staticmethod
    def _rewrap_ddp(trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
            # The old reducer registered hooks on the replaced parameters; drop it before re-wrapping.
            strategy.model = strategy.lightning_module
            gc.collect()
            strategy.configure_ddp()

    def _log_event(self, trainer: pl.Trainer, event: PruningEvent) -> None:
        if not trainer.is_global_zero:
            return
        rank_zero_info(
            f"StructuredPruning event {event.index}/{self.config.iterative_steps} at step {trainer.global_step}: "
            f"params {event.params_before:,} -> {event.params_after:,}, MACs {event.macs_before / 1e6:.1f}M -> "
            f"{event.macs_after / 1e6:.1f}M, channel ratio {event.ratio_reached:.3f} "
            f"(target {event.target_ratio:.3f}), {event.timing()}"
            + (
                f"; channels removed by ratio {event.removed_by_ratio}, by threshold {event.removed_by_threshold}"
                if self.config.threshold is not None
                else ""
            )
            + (
                f"; reconstruction error {event.reconstruction_error_before:.3f} -> {event.reconstruction_error_after:.3f}"
                if event.reconstruction_error_after is not None
                else ""
            )
        )
        metrics = event.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    key="pruning/events",
                    columns=[
                        "event",
                        "target_ratio",
                        "ratio_reached",
                        "params",
                        "macs",
                        "seconds",
                        "removed_by_ratio",
                        "removed_by_threshold",
                    ],
                    data=[
                        [
                            e.index,
                            e.target_ratio,
                            e.ratio_reached,
                            e.params_after,
                            e.macs_after,
                            e.seconds,
                            e.removed_by_ratio,
                            e.removed_by_threshold,
                        ]
                        for e in self.events
                    ],
                    step=trainer.global_step,
                )
                logger.log_table(
                    key=f"pruning/widths_event_{event.index}",
                    columns=["layer", "in", "out"],
                    data=[[name, io[0], io[1]] for name, io in event.widths.items()],
                    step=trainer.global_step,
                )


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
