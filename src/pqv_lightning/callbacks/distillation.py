"""Lightning glue for :mod:`pqv_lightning.distillation`: distil from a frozen teacher while fine-tuning."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from ..checks import check_bool, check_forward, first_line
from ..distillation import (
    DistillationConfig,
    check_teacher_precision,
    distillation_loss,
    frozen_teacher,
    resolve_teacher_precision,
    split_loss,
    teacher_logits,
)
from ..errors import ConfigError, InputNotFoundError
from ..models import load_vit_checkpoint
from ..outputs import logits_of
from ..pruning.adapters import check_model_attr, example_inputs_for, locate_model

__all__ = ["KnowledgeDistillation"]

_D = DistillationConfig  # the defaults of its options below are its own (tests/test_options.py)


class KnowledgeDistillation(Callback):
    r"""Distil the network a LightningModule trains from a frozen teacher, without changing the module.

    The loss that ``training_step`` returns becomes
    ``(1 - alpha) * loss + alpha * tau² * KL(teacher/tau ‖ student/tau)`` on the logits (or, with
    ``hard_labels=True``, the cross-entropy against the teacher's top-1 class). The combined loss goes
    back to Lightning as the step's loss, so AMP loss scaling, ``accumulate_grad_batches``, gradient
    clipping and DDP treat it like any loss. The student's input and logits are captured with a
    forward hook on the network (its first call in each training step); the teacher sees the same input.

    Teacher: by default a frozen copy of the network taken when ``fit`` starts — before any
    :class:`~pqv_lightning.StructuredPruning` event, so it is the unpruned model and is never pruned
    (eval mode, no gradients). Or pass ``teacher``: an ``nn.Module``, or the path of a checkpoint in the
    ``vit_tiny_fmnist.pt`` format (e.g. a larger model with the same classes).

    Resume: with the default teacher, checkpoints store its weights in the callback state (one more
    copy of the unpruned weights per checkpoint; ``store_teacher=False`` drops it, and a resumed fit then
    re-creates the teacher from the network as it is then, which is wrong once the network was
    pruned, so that combination is refused). A given teacher is rebuilt from the module or path given.

    Logged every step: ``distill/kd_loss`` (the distillation term), ``distill/task_loss`` (the module's
    own loss) and ``distill/teacher_agreement`` (top-1 agreement of student and teacher on the batch).

    ``alpha``, ``tau``, ``teacher_precision`` and ``hard_labels`` are
    :class:`~pqv_lightning.distillation.DistillationConfig`'s, documented there once (the defaults here
    are read from it; a test checks that they agree).

    Args (the callback's own):
        teacher: None (a frozen copy of the network at fit start), an ``nn.Module`` or a checkpoint path.
        model_attr: dotted path of the network inside the LightningModule (as for StructuredPruning).
        store_teacher: keep the default teacher's weights in checkpoints (needed to resume exactly).

    Example::

        trainer = pl.Trainer(max_epochs=2, callbacks=[
            StructuredPruning(pruning_ratio=0.5, iterative_steps=4, interval="step", frequency=30),
            KnowledgeDistillation(alpha=0.5, tau=2.0),
        ])
        trainer.fit(lit_module, datamodule=dm)   # lit_module.training_step is unchanged

    Raises:
        ConfigError: bad ``alpha``, ``tau`` or ``teacher_precision``; a teacher path that is not a
            checkpoint; a teacher whose output shape differs from the student's (at the first step);
            ``fp16`` off CUDA; a training step whose output has no loss tensor.
    """

    def __init__(
        self,
        alpha: float = _D.alpha,
        tau: float = _D.tau,
        teacher: nn.Module | str | None = None,
        teacher_precision: Literal["fp32", "bf16", "fp16", "int8-dynamic", "auto"] = _D.teacher_precision,  # type: ignore[assignment]
        hard_labels: bool = _D.hard_labels,
        model_attr: str | None = None,
        store_teacher: bool = True,
    ) -> None:
        super().__init__()
        self.config = DistillationConfig(
            alpha=alpha, tau=tau, teacher_precision=teacher_precision, hard_labels=hard_labels
        )
        self.config.validate()
        check_bool("store_teacher", store_teacher)
        check_model_attr(model_attr)
        if teacher is not None and not isinstance(teacher, (nn.Module, str, Path)):
            raise ConfigError(f"teacher={teacher!r}; allowed: None, an nn.Module or a checkpoint path")
        if isinstance(teacher, (str, Path)) and not Path(teacher).is_file():
            raise InputNotFoundError(f"teacher={str(teacher)!r}: no such checkpoint file")
        self.alpha, self.tau, self.hard_labels = float(alpha), float(tau), hard_labels
        self.teacher_source = teacher
        self.teacher_precision = teacher_precision
        self._precision: str = teacher_precision  # "auto" resolved for the run's device at fit start
        self.model_attr = model_attr
        self.store_teacher = store_teacher
        self.teacher: nn.Module | None = None
        self._fp32_teacher: nn.Module | None = None
        self._skeleton: nn.Module | None = None  # the unpruned architecture, to load a stored teacher into
        self._restored: dict[str, torch.Tensor] | None = None
        self._captured: tuple[torch.Tensor, torch.Tensor] | None = None
        self._capturing = False

    # ------------------------------------------------------------------ identity / state
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, tau=self.tau, model_attr=self.model_attr)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.teacher_source is not None or not self.store_teacher or self.teacher is None:
            return {"teacher": None}
        assert self._fp32_teacher is not None
        return {"teacher": {k: v.detach().cpu() for k, v in self._fp32_teacher.state_dict().items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("teacher")

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _, network, _ = locate_model(pl_module, self.model_attr)
        # Before a checkpoint restore reshapes the network: the architecture a stored teacher loads into.
        self._skeleton = copy.deepcopy(network).cpu() if self.teacher_source is None else None
        self._restored = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _, network, adapter = locate_model(pl_module, self.model_attr)
        check_teacher_precision(self.teacher_precision, pl_module.device)
        self._precision = resolve_teacher_precision(self.teacher_precision, pl_module.device)
        if self._precision != self.teacher_precision:
            rank_zero_info(
                f"KnowledgeDistillation: teacher_precision='auto' -> {self._precision!r} on this "
                f"{pl_module.device.type} ({_why(self._precision, pl_module.device)})"
            )
        if self.teacher_source is not None:
            source = self._load_given_teacher()
        elif self._restored is not None:  # resumed: the teacher of the interrupted run
            assert self._skeleton is not None
            self._skeleton.load_state_dict(self._restored)
            source = self._skeleton
        else:
            if trainer.ckpt_path is not None and not self.store_teacher:
                raise ConfigError(
                    "resuming with store_teacher=False: the checkpoint holds no teacher, and the "
                    "network may already be pruned; pass teacher=... or resume from a checkpoint "
                    "written with store_teacher=True"
                )
            source = network  # at fit start: synchronised across DDP ranks, not pruned yet
        self._fp32_teacher = frozen_teacher(source, "fp32").to(pl_module.device)
        self.teacher = (
            self._fp32_teacher if self._precision == "fp32" else frozen_teacher(self._fp32_teacher, self._precision)
        )
        if self._precision != "int8-dynamic":
            self.teacher = self.teacher.to(pl_module.device)
        self._skeleton = self._restored = None
        self._check_teacher_fits(network, adapter)
        self._wrap_training_step(pl_module, network)

    def _check_teacher_fits(self, network: nn.Module, adapter: Any) -> None:
        """A dry forward of teacher and student on the network's own input shape, before the first
        step: a teacher for other inputs (channels, size) or other classes fails here, by name."""
        try:
            example = example_inputs_for(network, adapter)
        except (ConfigError, NotImplementedError):
            return  # the input size is not known before the first batch: checked there
        student = logits_of(check_forward("the network", network, example))
        assert self.teacher is not None
        teacher = check_forward("teacher", _TeacherRun(self.teacher, self._precision), example, "the teacher")
        if isinstance(student, torch.Tensor) and tuple(teacher.shape) != tuple(student.shape):
            raise ConfigError(
                f"teacher: its output shape {tuple(teacher.shape)} differs from the student's "
                f"{tuple(student.shape)}; allowed: a teacher with the same number of classes"
            )

    def _load_given_teacher(self) -> nn.Module:
        if isinstance(self.teacher_source, nn.Module):
            return self.teacher_source
        assert self.teacher_source is not None  # None: the default teacher, built elsewhere
        try:
            return load_vit_checkpoint(self.teacher_source)[0]
        except ValueError as exc:
            raise ConfigError(f"teacher={str(self.teacher_source)!r}: {exc}") from exc

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        pl_module.__dict__.pop("training_step", None)

    # ------------------------------------------------------------------ the step
    def _capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if not self._capturing or self._captured is not None:
            return
        # the input: the first positional argument, or (Hugging Face: model(pixel_values=x)) the first tensor keyword
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        logits = logits_of(output)
        if x is not None and logits is not None:
            self._captured = (x, logits)

    def _wrap_training_step(self, pl_module: pl.LightningModule, network: nn.Module) -> None:
        # An instance attribute shadows the module's own training_step for this fit (removed in teardown):
        # the combined loss is what Lightning receives, so it is scaled, accumulated and clipped as usual.
        # The capturing forward hook lives only inside the step: outside it (validation, export when fit
        # ends, a torch.save of the network) the network carries no reference to this callback.
        pl_module.__dict__.pop("training_step", None)
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._captured, self._capturing = None, True
            hook = network.register_forward_hook(self._capture, with_kwargs=True)
            try:
                output = original(*args, **kwargs)
            finally:
                self._capturing = False
                hook.remove()
            loss, rebuild = split_loss(output)
            if loss is None:
                if output is None:
                    return None  # the module skipped this batch
                raise ConfigError(
                    "KnowledgeDistillation needs training_step to return the loss tensor or a dict "
                    f"with 'loss'; got {type(output).__name__}"
                )
            if self._captured is None:
                raise ConfigError(
                    "KnowledgeDistillation saw no forward call of the network in this training_step "
                    "(set model_attr to the network the loss is computed from)"
                )
            x, student = self._captured
            self._captured = None
            assert self.teacher is not None
            try:
                teacher = teacher_logits(self.teacher, x, self._precision)
            except RuntimeError as exc:  # e.g. a teacher for other input channels
                raise ConfigError(
                    f"teacher cannot run on the training input of shape {list(x.shape)} ({first_line(exc)})"
                ) from exc
            kd = distillation_loss(student, teacher, self.tau, self.hard_labels)
            total = (1.0 - self.alpha) * loss + self.alpha * kd
            agreement = (student.detach().argmax(-1) == teacher.argmax(-1)).float().mean()
            pl_module.log_dict(
                {
                    "distill/kd_loss": kd.detach(),
                    "distill/task_loss": loss.detach(),
                    "distill/teacher_agreement": agreement,
                },
                on_step=True,
                on_epoch=False,
            )
            return rebuild(total)

        pl_module.training_step = training_step  # type: ignore[method-assign]


def _why(precision: str, device: torch.device) -> str:
    if device.type == "cpu":
        return (
            "it has bf16 instructions" if precision == "bf16" else "it has no bf16 instructions: bf16 would be emulated"
        )
    return "it supports bf16" if precision == "bf16" else "no native bf16 here"


class _TeacherRun(nn.Module):
    """The teacher as :func:`teacher_logits` runs it, for a dry forward (``check_forward`` calls it)."""

    def __init__(self, teacher: nn.Module, precision: str) -> None:
        super().__init__()
        self.teacher, self.precision = teacher, precision

    def train(self, mode: bool = True) -> _TeacherRun:  # the teacher stays in eval mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return teacher_logits(self.teacher, x, self.precision)
