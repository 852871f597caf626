"""ONNX target: ``torch.onnx.export(dynamo=True)`` + ONNX Runtime quantization → ``.onnx``.

Needs the ``onnx`` extra (``pip install 'pqv-lightning[onnx]'``: onnx, onnxscript, onnxruntime).

* One self-contained file (weights inside; models over the 2 GB protobuf limit are refused), with
  a free batch dimension.
* One handler per precision config (registered with ``ONNXTarget.handles``), applied to the fp32
  export:
* ``fp32``: as exported. ``fp16``: ``onnxruntime.transformers.float16`` with fp32 input/output.
* ``int8-dynamic``: ``quantize_dynamic`` (int8 weights, activations quantized per call); the
  attention products ``q @ k.T`` and ``attn @ v`` stay fp32 unless the precision sets
  ``attention_matmuls`` (``int8-dynamic-attention``: both inputs quantized per call).
* ``int8-static``: ``quantize_static``, QDQ format, per-channel weights, restricted to
  MatMul / Gemm / Conv (LayerNorm and the residual adds stay float), calibrated on the data given;
  this includes the attention products (int8 ``q @ k.T`` and ``attn @ v``, the softmax float).
* Every quantization starts from ``quant_pre_process`` (shape inference + graph optimization), as
  ONNX Runtime recommends.
* Runs with ONNX Runtime's CPU provider, fixed threads, and **idle-thread spinning off**, so that
  its threads do not steal the cores from whatever is timed next in the same process.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..settings import logger_levels
from .intx import MATMULNBITS_GROUPS, check_intx_groups
from .precisions import FP16, FP32, Int4Weight, Int8Dynamic, Int8Static, Precision, resolve_precision
from .targets import PROBE_HEAD, PROBE_RESET, PROBE_TAIL, TARGETS, Built, ExportTarget, PrecisionJob, register_target

__all__ = ["ONNXTarget", "export_onnx", "ort_session"]

_PROTOBUF_LIMIT = 2 * 1024**3
STATIC_OP_TYPES = ("MatMul", "Gemm", "Conv")


def ort_session(model: str | bytes, threads: int, spinning: bool = False):
    """An ONNX Runtime CPU session for ``model`` (a path or serialized bytes) with ``threads``
    intra-op threads; the one place sessions are made. Idle spinning is off by
    default: spinning threads make everything else in the process slower (turn it on only where
    ONNX Runtime has the process to itself, as ONNX Runtime's own default does)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _quiet():
    """The exporter and quantizer print progress and advice on every call; keep errors only."""
    with (
        logger_levels(("onnxruntime", "onnxscript", "torch.onnx", ""), logging.ERROR),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(None),
    ):
        warnings.simplefilter("ignore")
        yield


def _calibration_reader(input_name: str, batches: Sequence[torch.Tensor]):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a list of batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter([{input_name: b.float().cpu().numpy()} for b in batches])

        def get_next(self):
            return next(self._items, None)

    return Reader()


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    precision: str | Precision,
    path: str,
    calibration: Sequence[torch.Tensor] = (),
) -> dict[str, Any]:
    """Export a copy of ``model`` to ONNX at ``precision`` (written to ``path``). Returns details
    (``applied``: what the precision's handler did)."""
    import onnx

    precision = resolve_precision(precision)
    apply = TARGETS["onnx"].handler(precision)
    model = copy.deepcopy(model).eval().float()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if weight_bytes >= _PROTOBUF_LIMIT:
        raise ValueError(
            f"the model has {weight_bytes / 2**30:.2f} GiB of weights; a single .onnx file holds < 2 GiB "
            "(external-data exports are not supported by this target)"
        )
    details: dict[str, Any] = {"opset": None, "dynamic_batch": True}
    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".onnx-") as work, _quiet():
        fp32 = str(Path(work) / "fp32.onnx")
        pair = torch.cat([example, example])  # a batch of 2: a batch of 1 would specialize the batch dimension
        torch.onnx.export(
            model,
            (pair,),
            fp32,
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
        details["opset"] = next(
            (o.version for o in onnx.load(fp32, load_external_data=False).opset_import if o.domain in ("", "ai.onnx")),
            None,
        )
        # handlers: (fp32 .onnx, output path, work folder, precision, calibration) -> details
        details.update(apply(fp32, PrecisionJob(precision, calibration=calibration, path=path, work_dir=work)))
    return details


def _pre_processed(fp32: str, work: str, applied: list[str]) -> str:
    """``quant_pre_process`` (shape inference + graph optimization), as ONNX Runtime recommends
    before quantizing. Its symbolic shape inference fails on some graphs (Swin V2's ``Expand``: "object
    of type 'NoneType' has no len()"); then it runs without it (ONNX's own shape inference stays), and
    ``applied`` says so."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = str(Path(work) / "pre.onnx")
    try:
        quant_pre_process(fp32, pre)
        applied.append("quant_pre_process")
    except (TypeError, ValueError, KeyError) as exc:
        quant_pre_process(fp32, pre, skip_symbolic_shape=True)
        applied.append(f"quant_pre_process without symbolic shape inference (it failed: {type(exc).__name__})")
    return pre


@register_target
class ONNXTarget(ExportTarget):
    format = "onnx"
    suffix = ".onnx"
    runtime = "ONNX Runtime (CPU)"
    extra = "onnx"
    requires = ("onnx", "onnxscript", "onnxruntime")
    memory_probe = (
        PROBE_HEAD
        + """
import onnxruntime as ort
# the probe imports only the runtime (not pqv_lightning), so its peak RSS is the runtime's own;
# its session settings mirror ort_session()
options = ort.SessionOptions()
options.intra_op_num_threads = int(sys.argv[3])
options.inter_op_num_threads = 1
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
feed = x.numpy()
"""
        + PROBE_RESET
        + """
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
for _ in range(3):
    session.run(None, {session.get_inputs()[0].name: feed})
"""
        + PROBE_TAIL
    )

    def check_model(self, model: nn.Module, precision: Precision) -> None:
        if isinstance(precision, Int4Weight):
            check_intx_groups(model, precision, MATMULNBITS_GROUPS)

    def write(self, reference, precision, engine, example, calibration, path, options: dict[str, Any]) -> Built:
        details = export_onnx(reference, example, precision, path, calibration)
        applied = ["torch.onnx.export(dynamo=True, external_data=False)", *details.pop("applied")]
        return Built(applied=applied, details=details)

    def start_runtime(self) -> None:
        import onnxruntime  # noqa: F401 - its import is the runtime's memory

    def load(self, path, example, threads):
        session = ort_session(path, threads)
        name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: x.float().contiguous().numpy()})[0])

        return run


@ONNXTarget.handles(FP32)
def _fp32(fp32: str, job: PrecisionJob) -> dict[str, Any]:
    path = job.path
    assert path is not None
    Path(fp32).replace(path)
    return {"applied": []}


@ONNXTarget.handles(FP16)
def _fp16(fp32: str, job: PrecisionJob) -> dict[str, Any]:
    path = job.path
    assert path is not None
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(fp32), keep_io_types=True), path)
    return {"applied": ["onnxruntime float16 conversion (fp32 input/output)"]}


@ONNXTarget.handles(Int8Dynamic)
def _int8_dynamic(fp32: str, job: PrecisionJob) -> dict[str, Any]:
    path, work, precision = job.path, job.work_dir, job.precision
    assert isinstance(precision, Int8Dynamic) and path is not None and work is not None
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # MatMulConstBOnly=False: the MatMuls of two activations (q @ k.T, attn @ v) become MatMulInteger too
    applied: list[str] = []
    quantize_dynamic(
        _pre_processed(fp32, work, applied),
        path,
        weight_type=QuantType.QInt8,
        per_channel=precision.per_channel,
        extra_options={"MatMulConstBOnly": not precision.attention_matmuls},
    )
    scales = "per-channel" if precision.per_channel else "per-tensor"
    applied.append(f"quantize_dynamic (int8 {scales} weights)")
    if precision.attention_matmuls:
        applied.append("attention matmuls (q @ k.T, attn @ v) int8, both inputs quantized per call")
    return {
        "applied": applied,
        "quantized_op_types": "ONNX Runtime dynamic defaults (MatMul, Gemm, Attention, ...)",
        "attention_matmuls": "int8" if precision.attention_matmuls else "fp32",
    }


@ONNXTarget.handles(Int8Static)
def _int8_static(fp32: str, job: PrecisionJob) -> dict[str, Any]:
    path, work, precision, calibration = job.path, job.work_dir, job.precision, job.calibration
    assert isinstance(precision, Int8Static) and path is not None and work is not None
    from onnxruntime.quantization import QuantFormat, quantize_static

    applied: list[str] = []
    quantize_static(
        _pre_processed(fp32, work, applied),
        path,
        _calibration_reader("input", calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=precision.per_channel,
        op_types_to_quantize=list(STATIC_OP_TYPES),
    )
    scales = "per-channel" if precision.per_channel else "per-tensor"
    return {
        "applied": [*applied, f"quantize_static (QDQ, {scales}, MatMul/Gemm/Conv)"],
        "quantized_op_types": list(STATIC_OP_TYPES),
    }


def _scopes(node) -> list[str]:
    """The module paths the dynamo exporter recorded for an ONNX node (``['', 'blocks', 'blocks.0', ...]``)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return [str(s) for s in ast.literal_eval(prop.value)]
    return []


@ONNXTarget.handles(Int4Weight)
def _int4_weight(fp32: str, job: PrecisionJob) -> dict[str, Any]:
    path, precision = job.path, job.precision
    assert isinstance(precision, Int4Weight) and path is not None and precision.group_size is not None
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    graph = onnx.load(fp32)
    kept = [
        node.name
        for node in graph.graph.node
        if node.op_type == "MatMul"
        and any(s == k or s.startswith(k + ".") for s in _scopes(node) for k in precision.keep_float)
    ]
    quantizer = MatMulNBitsQuantizer(graph, block_size=precision.group_size, is_symmetric=True, nodes_to_exclude=kept)
    quantizer.process()
    # the exporter's per-node debug metadata (module scopes, class names) is read above; dropped, it would
    # otherwise be ~40 % of a small int4 file (quantize_dynamic / quantize_static rewrite it away themselves)
    for node in quantizer.model.model.graph.node:
        del node.metadata_props[:]
    quantizer.model.save_model_to_file(path, use_external_data_format=False)
    count = sum(node.op_type == "MatMulNBits" for node in quantizer.model.model.graph.node)
    return {
        "applied": [
            f"MatMulNBitsQuantizer: int4 weights (blocks of {precision.group_size}, symmetric), fp32 activations, in "
            f"{count} MatMul nodes (weights constant; Gemm and the keep_float layers {list(precision.keep_float)} stay fp32)"
        ],
        "intx_layers": count,
    }
