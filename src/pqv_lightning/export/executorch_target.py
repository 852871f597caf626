"""ExecuTorch target: ``torch.export`` → pt2e quantization → XNNPACK delegate → ``.pte``.

Needs the ``executorch`` extra (``pip install 'pqv-lightning[executorch]'``: executorch 1.5 and
torchao 0.18, built against torch 2.14).

* ``fp32``: exported as is.
* ``int8-dynamic``: int8 per-channel weights, activations quantized per call
  (``XNNPACKQuantizer``, ``is_dynamic=True``).
* ``int8-static``: int8 weights and activations, activation ranges calibrated on the data given.
* Both int8 precisions annotate **Linear layers only**: quantizing LayerNorm inputs and the
  residual adds of a ViT ruins its accuracy (cosine 0.96 vs 0.999 on DeiT-S).
* ``fp16``: the model in half precision with input and output kept fp32 and **LayerNorm kept in
  fp32** (ExecuTorch 1.5.1 computes fp16 LayerNorm wrongly for widths >= 256 on x86).

With ``delegation_friendly`` (default) timm's Attention and LayerNorm are first swapped for
numerically identical modules built from ops XNNPACK takes (:mod:`.delegation`), so a ViT lowers
into 2 partitions instead of ~62. The manifest records the partition count and which ops were
left outside XNNPACK.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .intx import XNNPACK_GROUPS, check_intx_groups, quantize_intx_
from .precisions import (
    FP16,
    FP32,
    Int8Dynamic,
    Int8DynamicIntxWeight,
    Int8Static,
    IntxWeights,
    Precision,
    resolve_precision,
)
from .targets import (
    PROBE_HEAD,
    PROBE_RESET,
    PROBE_TAIL,
    TARGETS,
    Built,
    ExportTarget,
    PrecisionJob,
    Runner,
    chunked,
    register_target,
)

__all__ = ["ExecuTorchTarget", "lower_to_executorch", "delegation_report"]


class _Fp16Body(nn.Module):
    """fp32 in, fp32 out, fp16 inside."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.float16)).float()


class _ShareNodeSources:
    """Stands in for the ``copy`` module inside :mod:`torch.fx.traceback`: a list of ``NodeSource``
    objects is copied shallowly, anything else deeply, as before.

    Every graph pass records each new node's provenance as ``NodeSource(old_node)``, which deep-copies
    the old node's whole ``from_node`` history; the histories grow with every pass, so ExecuTorch's
    ~40 passes spend about a fifth of a ViT's lowering copying them (measured: 33 s -> 26 s for the
    bundled ViT at int8-dynamic). ``NodeSource`` objects are never changed after they are made (torch
    2.14 appends only to a node's own ``meta["from_node"]`` list, which is still copied), so sharing
    them records the same provenance; the program written is byte for byte the same."""

    def __init__(self, node_source: type) -> None:
        self._node_source = node_source

    def __getattr__(self, name: str) -> Any:
        return getattr(copy, name)

    def deepcopy(self, value: Any, memo: dict[int, Any] | None = None) -> Any:
        if type(value) is list and all(type(item) is self._node_source for item in value):
            return list(value)
        return copy.deepcopy(value, memo)


@contextlib.contextmanager
def shared_provenance() -> Iterator[None]:
    """Lowering without the quadratic copying of node provenance (:class:`_ShareNodeSources`); a torch
    whose :mod:`torch.fx.traceback` is laid out differently is left alone."""
    import torch.fx.traceback as fx_traceback

    node_source = getattr(fx_traceback, "NodeSource", None)
    if node_source is None or getattr(fx_traceback, "copy", None) is not copy:
        yield
        return
    setattr(fx_traceback, "copy", _ShareNodeSources(node_source))  # noqa: B010 - a module attribute, typed as one
    try:
        yield
    finally:
        setattr(fx_traceback, "copy", copy)  # noqa: B010


def _symbolic_batch(ep: torch.export.ExportedProgram) -> bool:
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in ep.graph_signature.user_inputs:
            return isinstance(node.meta["val"].shape[0], torch.SymInt)
    return False  # pragma: no cover - a model always has an input


def _pt2e_quantize(
    model: nn.Module, precision: Int8Dynamic | Int8Static, example: torch.Tensor, calibration: Sequence[torch.Tensor]
) -> tuple[nn.Module, bool]:
    """The pt2e-converted model, and whether it takes any batch size (else only ``len(example)``)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    dynamic = isinstance(precision, Int8Dynamic)
    quantizer = XNNPACKQuantizer().set_module_type(
        nn.Linear, get_symmetric_quantization_config(is_per_channel=precision.per_channel, is_dynamic=dynamic)
    )
    # export with a free batch size when the model allows it, so calibration runs on whole batches
    # (from a batch of 2: a batch of 1 would specialize the batch dimension)
    pair = torch.cat([example, example])
    ep = torch.export.export(model, (pair,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    prepared = prepare_pt2e(ep.module(), quantizer)
    with torch.no_grad():
        data = [example] if dynamic else list(calibration)
        any_batch = _symbolic_batch(ep)
        run = prepared if any_batch else chunked(prepared, len(example))
        for x in data:
            run(x)
    return convert_pt2e(prepared), any_batch


def delegation_report(edge_program: torch.export.ExportedProgram) -> dict[str, Any]:
    """Number of delegated partitions and the ops left to ExecuTorch's own CPU kernels."""
    partitions, other = 0, set()
    for node in edge_program.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "executorch_call_delegate" in name:
            partitions += 1
        elif name != "getitem":
            other.add(str(getattr(node.target, "_op", node.target)).replace("<EdgeOpOverload: ", "").split(">")[0])
    return {"partitions": partitions, "non_delegated_ops": sorted(other)}


def lower_to_executorch(
    model: nn.Module,
    example: torch.Tensor,
    precision: str | Precision,
    calibration: Sequence[torch.Tensor] = (),
    *,
    delegation_friendly: bool = True,
) -> tuple[bytes, dict[str, Any], Runner | None]:
    """Lower a copy of ``model`` to an ExecuTorch program for XNNPACK.

    Returns ``(pte bytes, details, runner of the quantized reference model or None)``. The program
    takes inputs of exactly ``example``'s shape (fp32 for every precision).
    """
    # registers the out variants of the quantized_decomposed ops that XNNPACK leaves to the portable runtime
    # (a Linear whose weight its parent reads itself, Swin V2's attention): without it, "Missing out variants"
    import executorch.kernels.quantized  # noqa: F401
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from .delegation import make_delegation_friendly  # (imports timm, whose classes it swaps)

    precision = resolve_precision(precision)
    apply = TARGETS["pte"].handler(precision)
    model = copy.deepcopy(model).eval().float()
    details: dict[str, Any] = {"module_swaps": make_delegation_friendly(model) if delegation_friendly else {}}
    # handlers: (model, precision, example, calibration, details) -> (model to export, quantized reference
    # or None); they add what they did to details["applied"]
    with shared_provenance():
        model, reference = apply(model, PrecisionJob(precision, example, calibration, details=details))
        with torch.no_grad():
            ep = torch.export.export(model, (example,))
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        details.update(delegation_report(edge.exported_program()))
        return edge.to_executorch().buffer, details, reference


def _runtime():
    # The thread pool is process-wide: export_mobile sizes it for its block (settings.executorch_threads),
    # a benchmark worker for its whole process.
    from executorch.runtime import Runtime

    return Runtime.get()


@register_target
class ExecuTorchTarget(ExportTarget):
    format = "pte"
    suffix = ".pte"
    runtime = "ExecuTorch (XNNPACK delegate)"
    unsupported_options = {
        "attention_matmuls": (
            "ExecuTorch's XNNPACK delegate runs bmm (the attention products) in fp32 only "
            "(its BMMConfig); use format 'onnx'"
        )
    }
    extra = "executorch"
    requires = ("executorch", "torchao")
    memory_probe = (
        PROBE_HEAD
        + """
from executorch.extension.pybindings import portable_lib
from executorch.runtime import Runtime
portable_lib._unsafe_reset_threadpool(int(sys.argv[3]))
runtime = Runtime.get()
"""
        + PROBE_RESET
        + """
method = runtime.load_program(sys.argv[1]).load_method("forward")
for _ in range(3):
    method.execute([x])
"""
        + PROBE_TAIL
    )

    def check_model(self, model: nn.Module, precision: Precision) -> None:
        if isinstance(precision, IntxWeights):
            check_intx_groups(model, precision, XNNPACK_GROUPS)

    def write(self, reference, precision, engine, example, calibration, path, options: dict[str, Any]) -> Built:
        friendly = options.get("delegation_friendly", True)
        buffer, details, quantized = lower_to_executorch(
            reference, example, precision, calibration, delegation_friendly=friendly
        )
        with open(path, "wb") as fh:
            fh.write(buffer)
        applied = (["delegation-friendly module swaps"] if friendly else []) + [
            *details.pop("applied"),
            "torch.export",
            "to_edge_transform_and_lower(XnnpackPartitioner)",
        ]
        return Built(applied=applied, details=details, quantized_reference=quantized)

    def start_runtime(self) -> None:
        _runtime()

    def load(self, path, example, threads):
        program = _runtime().load_program(path)
        method = program.load_method("forward")

        def run(x: torch.Tensor) -> torch.Tensor:
            return method.execute([x])[0]

        run.program = program  # the method must not outlive the program it came from
        return chunked(run, len(example))


@ExecuTorchTarget.handles(FP32)
def _fp32(model, job: PrecisionJob):
    details = job.details
    details["applied"] = []
    return model, None


@ExecuTorchTarget.handles(FP16)
def _fp16(model, job: PrecisionJob):
    details = job.details
    from .delegation import keep_layernorm_fp32

    details["fp32_layernorms"] = keep_layernorm_fp32(model.half())
    details["applied"] = ["LayerNorm kept fp32 (ExecuTorch 1.5.1 fp16 LayerNorm bug)"]
    return _Fp16Body(model), None


@ExecuTorchTarget.handles(Int8Dynamic, Int8Static)
def _int8(model, job: PrecisionJob):
    precision, example, calibration, details = job.precision, job.example, job.calibration, job.details
    assert isinstance(precision, (Int8Dynamic, Int8Static)) and example is not None
    quantized, any_batch = _pt2e_quantize(model, precision, example, calibration)
    kind = "dynamic" if isinstance(precision, Int8Dynamic) else "static, calibrated"
    scales = "per-channel" if precision.per_channel else "per-tensor"
    details["applied"] = [f"pt2e XNNPACKQuantizer (Linear only, {scales}, {kind})"]
    return quantized, (quantized if any_batch else chunked(quantized, len(example)))


@ExecuTorchTarget.handles(Int8DynamicIntxWeight)
def _intx(model, job: PrecisionJob):
    precision = job.precision
    assert isinstance(precision, IntxWeights)
    names = quantize_intx_(model, precision)
    groups = "one scale per output channel" if precision.group_size is None else f"groups of {precision.group_size}"
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in names]
    dynamic = isinstance(precision, Int8DynamicIntxWeight)
    config = "Int8DynamicActivationIntxWeightConfig" if dynamic else "IntxWeightOnlyConfig"
    activations = "int8 activations per token (dynamic)" if dynamic else "fp32 activations"
    job.details["intx_layers"] = len(names)
    job.details["applied"] = [
        f"torchao {config}: int{precision.weight_bits} weights ({groups}, symmetric), {activations} in "
        f"{len(names)} Linear layers" + (f"; fp32: {kept}" if kept else "")
    ]
    return model, model  # the torchao model runs any batch: the lowering's own reference
