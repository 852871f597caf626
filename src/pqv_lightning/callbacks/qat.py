"""Lightning glue for :mod:`pqv_lightning.export.qat` (quantization-aware training on torchao)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from ..errors import ConfigError
from ..export.intx import check_intx_groups, intx_layers
from ..export.precisions import PRECISIONS, Int8DynamicIntxWeight
from ..export.qat import (
    QuantizationAwareTrainingConfig,
    describe_fake_quant,
    fake_quantized_layers,
    prepare_qat_,
    set_activation_fake_quant_,
)
from ..export.targets import TARGETS
from ..pruning.adapters import check_model_attr, locate_model
from .mobile_export import MobileExport
from .strategies import refuse_sharding_strategies
from .structured_pruning import StructuredPruning

__all__ = ["QuantizationAwareTraining"]

_C = QuantizationAwareTrainingConfig  # the defaults below are its own (tests/test_options.py)


class QuantizationAwareTraining(Callback):
    r"""Train the network for the precision it will be exported at: its Linear layers are swapped for
    torchao's fake-quantized ones (int4 or int8 weights rounded in the forward, int8 activations per
    token), so the optimizer learns weights that survive quantization. Lightning 2.0 removed its own
    QAT callback; this one runs on torchao's maintained QAT flow and composes with
    :class:`~pqv_lightning.StructuredPruning` (it starts after the last pruning event, when the
    shapes are final), :class:`~pqv_lightning.KnowledgeDistillation`, AMP, gradient accumulation
    and DDP.

    When ``fit`` ends the network stays fake-quantized (``trainer.validate``/``test`` measure what
    the exported file will compute). :class:`~pqv_lightning.MobileExport` exports the float network
    under the fake quantizers; its file at the scheme's precision computes exactly what was trained,
    and its manifest says so (``qat``, and ``from_qat`` per file). A checkpoint saved during QAT has
    the plain network's keys: :func:`~pqv_lightning.load_pruned_checkpoint` loads it (as a float
    network; :func:`~pqv_lightning.export.qat.prepare_qat_` fake-quantizes it again), and
    ``fit(ckpt_path=...)`` with this callback resumes it exactly.

    The options are :class:`~pqv_lightning.export.qat.QuantizationAwareTrainingConfig`'s (documented
    there once): ``scheme``, ``start_step``, ``start_epoch``, ``activation_delay_steps``.

    Args (the callback's own):
        model_attr: dotted path of the network inside the LightningModule (any module with Linear
            layers); default: the one network of a family ``StructuredPruning`` knows.

    Example::

        trainer = pl.Trainer(max_epochs=4, callbacks=[
            StructuredPruning(pruning_ratio=0.25, iterative_steps=2, round_to=32),
            QuantizationAwareTraining(scheme="int8-dynamic-int4-weight", activation_delay_steps=50),
            MobileExport(precisions=["fp32", "int8-dynamic-int4-weight"], formats=["pte"]),
        ])
        trainer.fit(lit_module, datamodule=dm)

    Raises:
        ConfigError: when created, for an unknown scheme or bad start; at ``setup`` (before training),
            for a sharding strategy, a network without Linear layers to quantize, a group size a layer
            cannot take (or that ``StructuredPruning``'s ``round_to`` does not guarantee), a start
            before the last pruning event, and a ``MobileExport`` that does not export the scheme.
    """

    def __init__(
        self,
        scheme: str = _C.scheme,
        start_step: int | None = _C.start_step,
        start_epoch: int | None = _C.start_epoch,
        activation_delay_steps: int = _C.activation_delay_steps,
        model_attr: str | None = None,
    ) -> None:
        super().__init__()
        self.config = QuantizationAwareTrainingConfig(
            scheme=scheme,
            start_step=start_step,
            start_epoch=start_epoch,
            activation_delay_steps=activation_delay_steps,
        )
        self.precision: Int8DynamicIntxWeight = self.config.validate()
        self.model_attr = check_model_attr(model_attr)
        #: the optimizer step at which fake quantization began (None: not yet)
        self.started_step: int | None = None
        #: the fake-quantized layers
        self.layers: list[str] = []
        self._activations: bool | None = None

    # ------------------------------------------------------------------ identity / state
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(scheme=self.precision.name, model_attr=self.model_attr)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"started_step": self.started_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.started_step = state_dict.get("started_step")

    # ------------------------------------------------------------------ checks before training
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharding_strategies(trainer, "QuantizationAwareTraining", "its layers cannot be swapped mid-fit")
        model = self._network(pl_module)
        pruning = self._pruning(trainer)
        if pruning:
            self._check_rounding(pruning)
        if not fake_quantized_layers(model):  # resumed in the same process: already prepared
            # no Linear layer to quantize, a group a width (or XNNPACK) cannot take: now, not mid-fit
            check_intx_groups(model, self.precision if not pruning else _ungrouped(self.precision))
        self._check_export(trainer)
        if self.config.start_step is not None:
            for p in pruning:
                if p.schedule.interval == "step":
                    self._check_start(self.config.start_step, p.schedule.last_step(p.config.iterative_steps))

    def _pruning(self, trainer: pl.Trainer) -> list[StructuredPruning]:
        return [c for c in trainer.callbacks if isinstance(c, StructuredPruning)]  # type: ignore[attr-defined]

    def _check_rounding(self, pruning: list[StructuredPruning]) -> None:
        group = self.precision.group_size
        if group is None:
            return
        for p in pruning:
            round_to = p.config.round_to
            if round_to is None or round_to % group:
                raise ConfigError(
                    f"QuantizationAwareTraining(scheme={self.precision.name!r}) quantizes weights in groups of "
                    f"{group} input channels, but StructuredPruning(round_to={round_to!r}) may leave widths that "
                    f"{group} does not divide; set StructuredPruning(round_to={group}) (or a multiple of it), or "
                    "use a scheme with group_size=None"
                )

    def _check_start(self, start: int, last_event: int) -> None:
        if start < last_event:
            raise ConfigError(
                f"QuantizationAwareTraining starts at optimizer step {start}, before StructuredPruning's last event "
                f"(after step {last_event}): the shapes are not final then. Allowed: a start >= {last_event}, or "
                "no start (right after the last event)"
            )

    def _check_export(self, trainer: pl.Trainer) -> None:
        name = self.precision.name
        runs = [f for f in TARGETS if TARGETS[f].supports(self.precision)]
        if not runs:
            raise ConfigError(f"QAT scheme {name!r}: no export format can run it ({self.precision.runs_on})")
        for export in [c for c in trainer.callbacks if isinstance(c, MobileExport)]:  # type: ignore[attr-defined]
            config = export.config
            if not any(
                PRECISIONS[p] == self.precision and fmt in runs for p in config.precisions for fmt in config.formats
            ):
                raise ConfigError(
                    f"QuantizationAwareTraining(scheme={name!r}) trains for a precision MobileExport does not write "
                    f"(precisions={list(config.precisions)}, formats={list(config.formats)}): add precision {name!r} "
                    f"and one of the formats that run it, {runs}"
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        per_epoch = (
            math.ceil(batches / trainer.accumulate_grad_batches)
            if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0
            else None
        )
        start = self.config.start_step
        if start is None and self.config.start_epoch is not None and per_epoch is not None:
            start = self.config.start_epoch * per_epoch
        if start is not None and per_epoch is not None:
            for p in self._pruning(trainer):
                self._check_start(start, p.schedule.last_step(p.config.iterative_steps, per_epoch))
        if self.started_step is not None and not fake_quantized_layers(self._network(pl_module)):
            self._prepare(trainer, pl_module, resumed=True)  # resumed from a checkpoint taken during QAT

    # ------------------------------------------------------------------ the start, and the activations
    def _network(self, pl_module: pl.LightningModule) -> nn.Module:
        # any network with Linear layers: model_attr names it, else a pruning adapter's family finds it
        if self.model_attr:
            try:
                return pl_module.get_submodule(self.model_attr)
            except AttributeError as exc:
                raise ConfigError(f"model_attr={self.model_attr!r}: the LightningModule has no such submodule") from exc
        return locate_model(pl_module)[1]

    def _due(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        if batch_idx % trainer.accumulate_grad_batches:
            return False  # never inside a gradient-accumulation window
        if not all(p._done() for p in self._pruning(trainer)):
            return False
        if self.config.start_step is not None:
            return trainer.global_step >= self.config.start_step
        if self.config.start_epoch is not None:
            return trainer.current_epoch >= self.config.start_epoch
        return True

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, resumed: bool = False) -> None:
        network = self._network(pl_module)
        trained = describe_fake_quant(network)
        if trained is None:
            self.layers = prepare_qat_(network, self.precision)
        else:  # fake-quantized by an earlier fit (or by hand): go on if it is this scheme
            wanted = (
                self.precision.weight_bits,
                self.precision.group_size,
                sorted(intx_layers(network, self.precision)),
            )
            if (trained["weight_bits"], trained["group_size"], trained["layers"]) != wanted:
                raise ConfigError(
                    f"QuantizationAwareTraining(scheme={self.precision.name!r}): the network is fake-quantized already "
                    f"for another scheme ({trained['weight_bits']}-bit weights, group {trained['group_size']}, "
                    f"{len(trained['layers'])} layers); strip_fake_quant_ it first, or use that scheme"
                )
            self.layers = trained["layers"]
        if self.started_step is None:
            self.started_step = trainer.global_step
        self._activations = None
        rank_zero_info(
            f"QuantizationAwareTraining: {'resumed; ' if resumed else ''}{len(self.layers)} Linear layers "
            f"fake-quantized for {self.precision.name!r} from optimizer step {self.started_step}"
            + (
                f", activations from step {self.started_step + self.config.activation_delay_steps}"
                if self.config.activation_delay_steps
                else ""
            )
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.started_step is None:
            rank_zero_warn(
                "QuantizationAwareTraining never started: "
                + (
                    "StructuredPruning's events did not all run"
                    if not all(p._done() for p in self._pruning(trainer))
                    else f"training ended before start_step={self.config.start_step} / start_epoch={self.config.start_epoch}"
                )
                + "; the network was trained without fake quantization"
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.started_step is None and self._due(trainer, batch_idx):
            self._prepare(trainer, pl_module)
        if self.started_step is None:
            return
        on = trainer.global_step >= self.started_step + self.config.activation_delay_steps
        if on != self._activations:
            set_activation_fake_quant_(self._network(pl_module), on)
            self._activations = on


def _ungrouped(precision: Int8DynamicIntxWeight) -> Int8DynamicIntxWeight:
    """The precision without its group: widths change until pruning ends (``round_to`` is checked instead)."""
    return replace(precision, group_size=None)
