"""OpenVINO target: ``openvino.convert_model`` (+ NNCF) → OpenVINO IR (``model_*.xml`` + ``model_*.bin``).

Needs the ``openvino`` extra (``pip install 'pqv-lightning[openvino]'``: openvino, nncf). OpenVINO
is the runtime x86 edge boxes ship with; its CPU plugin picks kernels for the host it runs on.

* One IR per precision: the ``.xml`` (graph) and a ``.bin`` of the same name (weights) beside it,
  a free batch dimension, fixed channels and image size.
* ``fp32``: weights stored fp32 **and run in fp32**: the CPU plugin would otherwise run the model in
  bf16 on hosts with bf16 units (AMX, AVX512-BF16) — the IR says so in its ``runtime_options``
  (``INFERENCE_PRECISION_HINT: f32``), which :meth:`OpenVINOTarget.load` (and :func:`compile_ir`)
  applies; a user's own runtime code must pass it too.
* ``fp16``: weights stored fp16 (half the file); the plugin computes in its default inference
  precision (recorded in the manifest: bf16 with AMX, fp32 on older x86).
* ``int8-dynamic``: NNCF weight compression (int8 symmetric weights, one scale per output channel).
  Whether the CPU plugin also quantizes the activations of those layers per call (its dynamic
  quantization, ``DYNAMIC_QUANTIZATION_GROUP_SIZE``) depends on the host: OpenVINO 2026.4 does it
  at f32 inference precision, but **not** at bf16, its default on hosts with bf16 units (AMX,
  AVX512-BF16) — there the int8 weights are decompressed into bf16 GEMMs. Export finds out by
  running the file with dynamic quantization off and on (:func:`dynamic_quantization_active`: the
  outputs differ by the int8 rounding exactly when it applies) and records the answer
  (``dynamic_quantization``) and says so in ``optimizations_applied``.
* ``int8-static``: NNCF post-training quantization (``model_type=TRANSFORMER``, which keeps
  LayerNorm, softmax and the residual adds in float), calibrated on the data given.

The manifest records what the plugin really ran: ``inference_precision`` read back from the
compiled model on this host.

The IR keeps its free batch dimension, but it is **run at a static shape**:
:meth:`OpenVINOTarget.load` compiles the model once per input shape it meets (``model.reshape(shape)``
before ``compile_model``, :func:`compile_ir` with ``shape``). With a dynamic batch the CPU plugin
infers shapes and allocates memory on every call; at batch 1 static shapes ran the int8-static IRs
of DeiT-base 1.11-1.26x faster on the Intel Xeon (AMX) host (``benchmarks/openvino_static_shapes.py``).
A user's own runtime code should do the same: ``model = core.read_model(xml);
model.reshape([1, 3, 224, 224]); core.compile_model(model, "CPU", options)``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..settings import logger_levels
from .intx import NNCF_GROUPS, check_intx_groups
from .precisions import FP16, FP32, Int4Weight, Int8Dynamic, Int8Static, Precision, resolve_precision
from .targets import PROBE_HEAD, PROBE_RESET, PROBE_TAIL, TARGETS, Built, ExportTarget, PrecisionJob, register_target

__all__ = ["OpenVINOTarget", "compile_ir", "dynamic_quantization_active", "export_openvino"]

#: the IR's rt_info section OpenVINO uses for options meant for ``compile_model``
RUNTIME_OPTIONS = "runtime_options"
#: compiled static-shape models kept per loaded IR (oldest dropped first)
_SHAPES_KEPT = 4


@contextlib.contextmanager
def _quiet():
    """NNCF and the converter log progress bars and advice on every call; keep errors only."""
    with (
        logger_levels(("nncf", "openvino", "torch"), logging.ERROR),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(None),
    ):
        warnings.simplefilter("ignore")
        yield


def runtime_options(model) -> dict[str, str]:
    """The ``compile_model`` options stored in an IR's ``rt_info`` (``runtime_options`` section)."""
    if not model.has_rt_info([RUNTIME_OPTIONS]):
        return {}
    section = model.get_rt_info()[RUNTIME_OPTIONS]  # a dict of OVAny values
    return {str(key): value.astype(str) for key, value in section.items()}


@functools.cache
def _core():
    """One ``ov.Core`` per process, shared by every compiled model (OpenVINO's recommended use). With
    a Core per compiled model, dropped while the model lived on, the fast test tier segfaulted
    reproducibly (4 of 4 runs) once the loader kept a compiled model per input shape."""
    import openvino as ov

    return ov.Core()


def compile_ir(path: str, threads: int, shape: Sequence[int] | None = None, options: Mapping[str, Any] | None = None):
    """An OpenVINO CPU ``CompiledModel`` for the IR at ``path``, with the IR's own runtime options
    (e.g. ``fp32`` files: ``INFERENCE_PRECISION_HINT=f32``), ``threads`` inference threads, one
    stream and the latency hint. ``shape``: compile for this one input shape (static shapes, the
    fast path); None keeps the IR's free batch dimension (any batch, slower per call). ``options``:
    further ``compile_model`` options, applied last (e.g. ``{"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}``)."""
    core = _core()
    model = core.read_model(path)
    if shape is not None:
        model.reshape([int(d) for d in shape])
    config = {
        **runtime_options(model),
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        **(options or {}),
    }
    return core.compile_model(model, "CPU", config)


def gemm_kernels(compiled) -> dict[str, int]:
    """How many of the compiled model's FullyConnected / MatMul layers run on each CPU kernel, e.g.
    ``{"FullyConnected brgemm_avx512_amx_I8 (i8)": 48}``: whether its int8 GEMMs use AMX, VNNI or
    plain AVX2 here. The plugin picks a kernel on the first call, so this runs one call (zeros)."""
    import numpy as np

    shape = [int(d) for d in compiled.input(0).get_shape()]
    compiled.create_infer_request().infer({0: np.zeros(shape, dtype=np.float32)})
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer in ("FullyConnected", "MatMul"):
            key = f"{layer} {info['primitiveType'].astype(str)} ({info['runtimePrecision'].astype(str)})"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def ir_gemm_kernels(
    folder: str | Path, files: Sequence[str], shape: Sequence[int], threads: int
) -> dict[str, dict[str, int]]:
    """:func:`gemm_kernels` of every OpenVINO IR (``.xml``) among ``files`` in ``folder``, compiled at
    ``shape`` with ``threads`` threads: the CPU kernels each IR's GEMMs run on here (AMX, VNNI, AVX2)."""
    return {f: gemm_kernels(compile_ir(str(Path(folder) / f), threads, shape)) for f in files if f.endswith(".xml")}


def dynamic_quantization_active(path: str, shape: Sequence[int], compiled=None) -> bool:
    """Whether the OpenVINO CPU plugin quantizes activations per call (its dynamic quantization) in
    the compressed-weight layers of the IR at ``path`` on this host, at its own settings.

    Found by running: one seeded random input through the model compiled as usual and with dynamic
    quantization off (``DYNAMIC_QUANTIZATION_GROUP_SIZE=0``), one thread each so that both sum in
    the same order. The outputs are bit-identical when the plugin does not quantize activations and
    differ by the int8 rounding when it does (DeiT-base int8-dynamic: max logit difference 0 at bf16
    inference precision, 0.025 at f32). No timing involved. ``compiled``: the IR already compiled as
    ``compile_ir(path, 1, shape)`` does (saves compiling it again)."""
    on = compiled if compiled is not None else compile_ir(path, 1, shape)
    if int(on.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) == 0:
        return False
    off = compile_ir(path, 1, shape, {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})
    x = torch.randn([int(d) for d in shape], generator=torch.Generator().manual_seed(0)).numpy()
    return not bool((on(x)[0] == off(x)[0]).all())


def _describe(compiled) -> dict[str, Any]:
    """What the CPU plugin decided for this host."""
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: its name is "f32", "bf16", ...
    out: dict[str, Any] = {"inference_precision": getattr(precision, "type_name", None) or str(precision)}
    with contextlib.suppress(Exception):  # older plugins lack the property
        out["dynamic_quantization_group_size"] = int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE"))
    return out


def export_openvino(
    model: nn.Module,
    example: torch.Tensor,
    precision: str | Precision,
    path: str,
    calibration: Sequence[torch.Tensor] = (),
) -> dict[str, Any]:
    """Convert a copy of ``model`` to an OpenVINO IR at ``precision``: ``path`` (``.xml``) and the
    ``.bin`` of the same name. Returns details (``applied``: what the precision's handler did)."""
    import nncf  # noqa: F401  (imported before _quiet(): its import sets its logger's level, undoing ours)
    import openvino as ov

    if Path(path).suffix != ".xml":
        raise ValueError(f"path={path!r}: an OpenVINO IR is written to a '.xml' file (weights beside it in '.bin')")
    precision = resolve_precision(precision)
    apply = TARGETS["openvino"].handler(precision)
    model = copy.deepcopy(model).eval().float()
    with _quiet(), torch.no_grad():
        shape = ov.PartialShape([-1, *example.shape[1:]])  # any batch, the trained image size
        ir = ov.convert_model(model, example_input=example, input=[shape])
        # handlers: (ov.Model, precision, calibration) -> (ov.Model, compress_to_fp16, runtime options, applied)
        ir, compress, options, applied = apply(ir, PrecisionJob(precision, calibration=calibration))
        for key, value in options.items():
            ir.set_rt_info(value, [RUNTIME_OPTIONS, key])
        ov.save_model(ir, path, compress_to_fp16=compress)
    return {"applied": ["openvino.convert_model", *applied], "runtime_options": options, "openvino": ov.__version__}


@register_target
class OpenVINOTarget(ExportTarget):
    format = "openvino"
    suffix = ".xml"
    companion_suffixes = (".bin",)
    runtime = "OpenVINO (CPU plugin)"
    unsupported_options = {
        "attention_matmuls": (
            "the OpenVINO CPU plugin quantizes activations per call in compressed-weight "
            "layers only; int8-static (NNCF) quantizes q and k of the attention"
        )
    }
    extra = "openvino"
    requires = ("openvino", "nncf")
    # int8 on an AMX host: the 9.375 %-pruned DeiT-base (widths 696, head dim 58) ran 1.32x faster padded
    # to 704 / 64 (benchmarks/fastest_artifact.py --pad none 64), slower than the unpruned model unpadded
    width_multiple = 64
    # whole heads instead of head dims: DeiT-base pruned 25 % both ways (9.50 GMACs each), int8-static
    # 1.12x faster with 9 heads of 64 than with 12 of 48 (9 of 10 round-robins, benchmarks/headline.py)
    pruning_defaults = {"prune_num_heads": True, "prune_head_dims": False}
    memory_probe = (
        PROBE_HEAD
        + """
import openvino as ov
core = ov.Core()
feed = x.numpy()
"""
        + PROBE_RESET
        + """
model = core.read_model(sys.argv[1])
options = {}  # as compile_ir(): the IR's own runtime options
if model.has_rt_info(["runtime_options"]):
    options = {str(k): v.astype(str) for k, v in model.get_rt_info()["runtime_options"].items()}
model.reshape(list(feed.shape))  # as OpenVINOTarget.load: static shapes
compiled = core.compile_model(model, "CPU", {**options, "INFERENCE_NUM_THREADS": int(sys.argv[3]), "NUM_STREAMS": 1,
                                             "PERFORMANCE_HINT": "LATENCY"})
for _ in range(3):
    compiled(feed)
"""
        + PROBE_TAIL
    )

    def check_model(self, model: nn.Module, precision: Precision) -> None:
        if isinstance(precision, Int4Weight):
            check_intx_groups(model, precision, NNCF_GROUPS)

    def write(self, reference, precision, engine, example, calibration, path, options: dict[str, Any]) -> Built:
        details = export_openvino(reference, example, precision, path, calibration)
        applied = details.pop("applied") + ["compiled at static input shapes (one compiled model per shape)"]
        compiled = compile_ir(path, 1, example.shape)
        details.update(_describe(compiled))
        if isinstance(precision, Int8Dynamic):
            details["dynamic_quantization"] = active = dynamic_quantization_active(path, example.shape, compiled)
            applied.append(
                "activations quantized to int8 per call by the CPU plugin (dynamic quantization, group size "
                f"{details.get('dynamic_quantization_group_size')})"
                if active
                else "activations not quantized on this host: the CPU plugin decompresses the int8 weights into "
                f"{details['inference_precision']} GEMMs (its dynamic quantization did not apply)"
            )
        return Built(applied=applied, details=details)

    def start_runtime(self) -> None:
        _core()

    def load(self, path, example, threads):
        # one static-shape compiled model per input shape met (see the module docstring), the
        # example's first; the last few are kept (verification meets a full and a last partial batch)
        compiled: dict[tuple[int, ...], Any] = {}

        def for_shape(shape: tuple[int, ...]):
            if shape not in compiled:
                while len(compiled) >= _SHAPES_KEPT:
                    compiled.pop(next(iter(compiled)))
                model = compile_ir(path, threads, shape)
                # the request must not outlive its compiled model: keep both
                compiled[shape] = (model, model.create_infer_request(), model.output(0))
            return compiled[shape]

        for_shape(tuple(example.shape))

        def run(x: torch.Tensor) -> torch.Tensor:
            _, request, output = for_shape(tuple(x.shape))
            # the request reuses its output buffer: copy before the next call
            return torch.from_numpy(request.infer({0: x.float().contiguous().numpy()})[output].copy())

        run.compiled = compiled
        return run


@OpenVINOTarget.handles(FP32)
def _fp32(ir, job: PrecisionJob):
    return ir, False, {"INFERENCE_PRECISION_HINT": "f32"}, ["fp32 weights, INFERENCE_PRECISION_HINT=f32"]


@OpenVINOTarget.handles(FP16)
def _fp16(ir, job: PrecisionJob):
    return ir, True, {}, ["fp16 weights (compress_to_fp16), the plugin's default inference precision"]


@OpenVINOTarget.handles(Int8Dynamic)
def _int8_dynamic(ir, job: PrecisionJob):
    precision = job.precision
    assert isinstance(precision, Int8Dynamic)
    import nncf

    if not precision.per_channel:
        raise ValueError(
            f"precision {precision.name!r}: NNCF int8 weight compression has one scale per output "
            "channel; per_channel=False is not available for format 'openvino'"
        )
    ir = nncf.compress_weights(ir, mode=nncf.CompressWeightsMode.INT8_SYM)
    return ir, False, {}, ["nncf.compress_weights(INT8_SYM, per-channel)"]


@OpenVINOTarget.handles(Int8Static)
def _int8_static(ir, job: PrecisionJob):
    precision, calibration = job.precision, job.calibration
    assert isinstance(precision, Int8Static)
    import nncf

    if not calibration:
        raise ValueError("int8-static needs calibration batches")
    if not precision.per_channel:
        raise ValueError(
            f"precision {precision.name!r}: NNCF quantizes weights per output channel; "
            "per_channel=False is not available for format 'openvino'"
        )
    data = nncf.Dataset([b.float().cpu().numpy() for b in calibration])
    ir = nncf.quantize(ir, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    return ir, False, {}, [f"nncf.quantize(model_type=TRANSFORMER, {len(calibration)} calibration batches)"]


@OpenVINOTarget.handles(Int4Weight)
def _int4_weight(ir, job: PrecisionJob):
    precision = job.precision
    assert isinstance(precision, Int4Weight)
    import nncf

    # convert_model names a Linear's ops after its module: "__module.blocks.0.attn.qkv/aten::linear/MatMul"
    scope = nncf.IgnoredScope(
        patterns=[rf"__module\.{re.escape(k)}[./].*" for k in precision.keep_float], validate=False
    )
    group = -1 if precision.group_size is None else precision.group_size
    ir = nncf.compress_weights(
        ir,
        mode=nncf.CompressWeightsMode.INT4_SYM,
        group_size=group,
        ratio=1.0,
        all_layers=True,
        backup_mode=nncf.BackupMode.NONE,
        ignored_scope=scope,
    )
    groups = "one scale per output channel" if group == -1 else f"groups of {group}"
    # weight-only: the plugin must neither quantize the activations per call nor compute in bf16
    options = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
    return (
        ir,
        False,
        options,
        [
            f"nncf.compress_weights(INT4_SYM, {groups}, every Linear but {list(precision.keep_float)})",
            "fp32 activations (INFERENCE_PRECISION_HINT=f32, DYNAMIC_QUANTIZATION_GROUP_SIZE=0)",
        ],
    )
