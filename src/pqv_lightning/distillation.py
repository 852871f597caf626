"""Knowledge distillation, the pure part: the loss and the frozen teacher (no Lightning here).

:class:`pqv_lightning.KnowledgeDistillation` is the Lightning glue around these functions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_bool, check_number
from .errors import ConfigError
from .export.eager_quant import quantize_linears_dynamic
from .hostcpu import BF16_FEATURES, has_any_feature
from .outputs import logits_of

__all__ = [
    "TEACHER_PRECISIONS",
    "DistillationConfig",
    "check_teacher_precision",
    "resolve_teacher_precision",
    "distillation_loss",
    "frozen_teacher",
    "split_loss",
    "teacher_logits",
]

#: How the teacher runs: ``fp32``; ``bf16`` (autocast on the input's device); ``fp16`` (a half
#: copy, CUDA only); ``int8-dynamic`` (PyTorch dynamic int8 Linear layers, CPU only); ``auto``
#: (:func:`resolve_teacher_precision`: bf16 where the device computes it natively, else fp32).
TEACHER_PRECISIONS = ("fp32", "bf16", "fp16", "int8-dynamic", "auto")


@dataclass(frozen=True)
class DistillationConfig:
    """How a student learns from its teacher (``KnowledgeDistillation`` is built from it).

    Args:
        alpha: weight of the distillation term, in ``[0, 1]``: the loss becomes
            ``(1 - alpha) * loss + alpha * distillation``.
        tau: softmax temperature, > 0.
        teacher_precision: how the teacher runs, one of :data:`TEACHER_PRECISIONS`: ``"fp32"``,
            ``"bf16"`` (autocast: 1.1x the cost of no teacher on a CPU with bf16 instructions, but
            3.9x on one without, where fp32 costs 1.25x), ``"fp16"`` (CUDA only),
            ``"int8-dynamic"`` (dynamic int8 Linear layers on the CPU) or ``"auto"`` (bf16 where
            the run's device computes bf16 natively, else fp32; see
            :func:`resolve_teacher_precision`).
        hard_labels: distil the teacher's top-1 class instead of its soft distribution.
    """

    alpha: float = 0.5
    tau: float = 1.0
    teacher_precision: str = "fp32"
    hard_labels: bool = False

    def validate(self) -> None:
        check_number("alpha", self.alpha, minimum=0, maximum=1)
        check_number("tau", self.tau, minimum=0, min_open=True)
        check_teacher_precision(self.teacher_precision)
        check_bool("hard_labels", self.hard_labels)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0, hard: bool = False
) -> torch.Tensor:
    """``tau² · KL(softmax(teacher/tau) ‖ softmax(student/tau))`` averaged over the batch (Hinton et
    al.), or with ``hard=True`` the cross-entropy of the student against the teacher's top-1 class.

    ``tau²`` keeps the gradient scale of the soft term independent of ``tau``. Logits are compared in
    float32 whatever their dtype.
    """
    if student.shape != teacher.shape:
        raise ConfigError(
            f"the teacher's output shape {tuple(teacher.shape)} differs from the student's "
            f"{tuple(student.shape)}; allowed: a teacher with the same number of classes"
        )
    check_number("tau", tau, minimum=0, min_open=True)
    student, teacher = student.float(), teacher.float().detach()
    if hard:
        return F.cross_entropy(student, teacher.argmax(-1))
    log_p_student = F.log_softmax(student / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher / tau, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * tau**2


def frozen_teacher(network: nn.Module, precision: str = "fp32") -> nn.Module:
    """An independent, frozen copy of ``network`` (eval mode, no gradients) in ``precision``.

    The copy shares nothing with ``network``: pruning the student later never touches it. ``"auto"``
    is resolved for the device ``network`` is on (:func:`resolve_teacher_precision`).
    """
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    precision = resolve_teacher_precision(precision, device)
    teacher = copy.deepcopy(network).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if precision == "int8-dynamic":
        teacher = quantize_linears_dynamic(teacher.cpu().float(), torch.qint8)
    elif precision == "fp16":
        teacher = teacher.half()
    return teacher


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """The teacher's logits for ``x`` (float32, on ``x``'s device), run the way ``precision`` says
    (``"auto"``: resolved for ``x``'s device)."""
    precision = resolve_teacher_precision(precision, x.device)
    if precision == "int8-dynamic":
        return _logits(teacher(x.detach().float().cpu())).float().to(x.device)
    if precision == "fp16":
        return _logits(teacher(x.detach().half())).float()
    if precision == "bf16":
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return _logits(teacher(x.detach())).float()
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _logits(teacher(x.detach().float())).float()


def _logits(output: Any) -> torch.Tensor:
    logits = logits_of(output)
    if logits is None:
        raise ConfigError(
            f"the teacher returns a {type(output).__name__}; allowed: logits, or an output with a 'logits' tensor"
        )
    return logits


def check_teacher_precision(precision: str, device: torch.device | None = None) -> None:
    """One of :data:`TEACHER_PRECISIONS`; given the run's ``device``, also that it can run there:
    ``fp16`` needs CUDA, ``int8-dynamic`` runs on the CPU (it may still teach a GPU student)."""
    if precision not in TEACHER_PRECISIONS:
        raise ConfigError(f"teacher_precision={precision!r}; allowed: {list(TEACHER_PRECISIONS)}")
    if device is not None and precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"teacher_precision='fp16' needs a CUDA device (this run is on {device.type}); on a "
            "CPU use 'bf16' or 'int8-dynamic'"
        )


def resolve_teacher_precision(precision: str, device: torch.device, cpu: dict[str, str] | None = None) -> str:
    """The precision the teacher really runs in on ``device``: ``precision`` itself, except ``"auto"``:
    ``bf16`` on a CUDA device that supports it and on a CPU with bf16 instructions
    (:data:`~pqv_lightning.hostcpu.BF16_FEATURES`; ``cpu``: another CPU's ``/proc/cpuinfo`` entries),
    else ``fp32`` (bf16 emulated on an AVX2-only CPU made each step 3.9x slower than without a
    teacher; ``benchmarks/results/distillation_overhead_avx2.md``)."""
    check_teacher_precision(precision)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if has_any_feature(BF16_FEATURES, cpu) else "fp32"
    return "fp32"


def split_loss(output: Any) -> tuple[torch.Tensor | None, Any]:
    """The loss of a ``training_step`` output (a tensor, or a dict with ``"loss"``), and a function of the
    new loss that rebuilds the output around it."""
    if isinstance(output, torch.Tensor):
        return output, lambda loss: loss
    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"], lambda loss: {**output, "loss": loss}
    return None, None
