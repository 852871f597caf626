"""Legacy target: torch.ao quantization + TorchScript + Lite Interpreter ``.ptl``.

TorchScript, torch.ao.quantization and the Lite Interpreter are deprecated (the mobile runtime
stopped at 2.1); prefer the ``pte`` (ExecuTorch) target for phones. Kept because existing apps
still load ``.ptl`` files, and because it is the only path to the four PyTorch quantized engines.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .eager_quant import quantize_linears_dynamic
from .precisions import FP16, FP32, Int8Dynamic, Int8Static, Precision, resolve_precision
from .targets import PROBE_HEAD, PROBE_RESET, PROBE_TAIL, TARGETS, Built, ExportTarget, PrecisionJob, register_target

__all__ = ["TorchScriptTarget", "quantize_torch_ao", "script_for_mobile"]


def quantize_torch_ao(
    model: nn.Module,
    precision: str | Precision,
    engine: str,
    example: torch.Tensor,
    calibration: Sequence[torch.Tensor],
) -> nn.Module:
    """A quantized copy for the given torch quantized engine (the caller selects the engine).

    Only Linear layers (and, for ``int8-static``, the patch-embedding conv: PyTorch has no dynamic
    conv kernels) are quantized; LayerNorm, softmax, GELU and residual adds stay float."""
    precision = resolve_precision(precision)
    apply = TARGETS["ptl"].handler(precision)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(deprecated|reduce_range).*")  # torch.ao's own notices
        return apply(copy.deepcopy(model).eval().float(), PrecisionJob(precision, example, calibration, engine=engine))


def script_for_mobile(model: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, list[str], list[str]]:
    """Trace, freeze and (where this torch has XNNPACK) mobile-optimize. Returns (module, applied, skipped)."""
    applied, skipped = ["torch.jit.trace"], []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(model, example, check_trace=False)
        # Quantized layers keep their packed weights as attributes. Frozen into constants, the x86 /
        # FBGEMM packed weights were written twice into a .ptl (each serialization unpacks them into a
        # new tensor, so the archive cannot share one copy): int8 files came out at half the fp32
        # size instead of a quarter. Kept as attributes they are stored once, at the same speed.
        packed = [
            f"{name}._packed_params"
            for name, module in model.named_modules()
            if isinstance(getattr(module, "_packed_params", None), (nn.Module, torch.ScriptObject))
        ]
        try:
            scripted = torch.jit.freeze(scripted.eval(), preserved_attrs=packed)
            applied.append(
                "torch.jit.freeze (constant folding, dropout removal, conv-bn folding; packed "
                "quantized weights kept as attributes, stored once)"
            )
        except Exception as exc:  # pragma: no cover - freeze works for every variant we export
            skipped.append(f"torch.jit.freeze: {type(exc).__name__}: {exc}")
        if torch._C._is_xnnpack_enabled():
            from torch.utils.mobile_optimizer import optimize_for_mobile

            try:
                scripted = optimize_for_mobile(scripted)
                applied.append("torch.utils.mobile_optimizer.optimize_for_mobile")
            except Exception as exc:  # never lose the end of a long fit to the mobile optimizer
                skipped.append(f"optimize_for_mobile: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        else:
            skipped.append(
                "optimize_for_mobile: this torch build has no XNNPACK (torch._C._is_xnnpack_enabled() is False)"
            )
    return scripted, applied, skipped


@register_target
class TorchScriptTarget(ExportTarget):
    format = "ptl"
    suffix = ".ptl"
    runtime = "Lite Interpreter"
    unsupported_options = {
        "attention_matmuls": ("torch.ao dynamic quantization covers nn.Linear only; use format 'onnx'")
    }
    engine_dependent = True
    memory_probe = (
        PROBE_HEAD
        + """
if sys.argv[4] != "-":
    torch.backends.quantized.engine = sys.argv[4]
from torch.jit.mobile import _load_for_lite_interpreter
"""
        + PROBE_RESET
        + """
model = _load_for_lite_interpreter(sys.argv[1])
with torch.no_grad():
    for _ in range(3):
        model(x)
"""
        + PROBE_TAIL
    )

    def write(self, reference, precision, engine, example, calibration, path, options: dict[str, Any]) -> Built:
        # handlers: (fp32 copy, precision, engine, example, calibration) -> module to script
        quantized = quantize_torch_ao(reference, precision, engine, example, calibration)
        scripted, applied, skipped = script_for_mobile(quantized, example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # serialized in memory, written by Python: torch's file writer aborts the whole process
            # (std::terminate) on a full disk, a Python write raises OSError and the export goes on
            program = scripted._save_to_buffer_for_lite_interpreter()
        with open(path, "wb") as fh:
            fh.write(program)
        return Built(applied=applied, skipped=skipped)

    def start_runtime(self) -> None:
        import torch.jit.mobile  # noqa: F401

    def load(self, path, example, threads):
        from torch.jit.mobile import _load_for_lite_interpreter

        return _load_for_lite_interpreter(path)


@TorchScriptTarget.handles(FP32)
def _fp32(model, job: PrecisionJob):
    return model


@TorchScriptTarget.handles(FP16)
def _fp16(model, job: PrecisionJob):
    return quantize_linears_dynamic(model, torch.float16)


@TorchScriptTarget.handles(Int8Dynamic)
def _int8_dynamic(model, job: PrecisionJob):
    precision = job.precision
    assert isinstance(precision, Int8Dynamic)
    # weights per channel or per tensor as ``precision.per_channel`` says (every engine runs both); Linear
    # layers whose weight the model reads itself (BEiT, EVA attention) stay fp32 (eager_quant)
    return quantize_linears_dynamic(model, torch.qint8, per_channel=precision.per_channel)


@TorchScriptTarget.handles(Int8Static)
def _int8_static(model, job: PrecisionJob):
    precision, engine, example, calibration = job.precision, job.engine, job.example, job.calibration
    assert isinstance(precision, Int8Static) and engine is not None
    # the engine's default activation observer; weights per channel or per tensor as ``precision.per_channel``
    # says (the engines' own defaults differ: x86 / FBGEMM per channel, QNNPACK per tensor)
    from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig
    from torch.ao.quantization.observer import default_per_channel_weight_observer, default_weight_observer
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    weight = default_per_channel_weight_observer if precision.per_channel else default_weight_observer
    qconfig = QConfig(activation=get_default_qconfig(engine).activation, weight=weight)
    mapping = QConfigMapping().set_object_type(nn.Linear, qconfig).set_object_type(nn.Conv2d, qconfig)
    prepared = prepare_fx(model, mapping, (example,))
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    return convert_fx(prepared)
