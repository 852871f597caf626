"""What this host is and how fast its GEMMs are: the host line and the throughput ceiling of every
latency report (the sweep's ``gemm`` cell, benchmarks)."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from ..hostcpu import cpu_features, cpu_info, cpu_mhz, threads_per_core, usable_cpus
from ..settings import torch_threads
from .benchmark import summarize, time_calls
from .onnx_target import ort_session

__all__ = ["gemm_throughput", "host_description"]


def _ort_int8_gemm_ms(size: int, threads: int, calls: int) -> float | None:
    """Median ms of an int8 ``MatMulInteger`` (uint8 x int8 -> int32) in ONNX Runtime, or None without it."""
    try:
        import numpy as np
        import onnxruntime  # noqa: F401
        from onnx import TensorProto, helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    weight = helper.make_tensor(
        "B", TensorProto.INT8, [size, size], rng.integers(-128, 127, (size, size), dtype=np.int8).tobytes(), raw=True
    )
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["C"])],
        "gemm",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("C", TensorProto.INT32, [size, size])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort_session(model.SerializeToString(), threads)
    feed = {"A": rng.integers(0, 255, (size, size), dtype=np.uint8)}
    return summarize(time_calls(lambda _: session.run(None, feed), None, 3, calls))["median_ms"]


def openvino_int8_gemm(size: int, threads: int):
    """An int8 ``size``^3 GEMM compiled by OpenVINO's CPU plugin, in the pattern NNCF writes (a
    FakeQuantize'd activation times dequantized int8 weights, which the plugin runs as an int8
    FullyConnected — AMX where the CPU has it): ``(compiled model, feed)``, or None without OpenVINO."""
    try:
        import numpy as np
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    x = ops.parameter([size, size], np.float32, name="x")
    lo, hi = (ops.constant(np.float32(v)) for v in (-4.0, 4.0))
    xq = ops.fake_quantize(x, lo, hi, lo, hi, 256)
    w = ops.constant(rng.integers(-127, 127, (size, size), dtype=np.int8))
    scale = ops.constant(np.full((size, 1), 0.01, dtype=np.float32))
    weight = ops.multiply(ops.convert(w, np.float32), scale)
    model = ov.Model([ops.matmul(xq, weight, False, True)], [x], "gemm_int8")
    compiled = ov.Core().compile_model(
        model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    )
    return compiled, {0: rng.standard_normal((size, size), dtype=np.float32)}


def _openvino_int8_gemm_ms(size: int, threads: int, calls: int) -> float | None:
    built = openvino_int8_gemm(size, threads)
    if built is None:
        return None
    compiled, feed = built
    request = compiled.create_infer_request()
    return summarize(time_calls(lambda _: request.infer(feed), None, 3, calls))["median_ms"]


_ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "asimddp",
    "sve",
)


def host_description() -> dict[str, Any]:
    """CPU model, core count and the SIMD features that decide GEMM speed (from /proc/cpuinfo where it
    exists), with the OS and the torch version: the host line of a sweep report."""
    info = cpu_info()
    cpu = info.get("model name") or info.get("Model") or platform.processor() or platform.machine()
    flags = cpu_features(info)
    out = {
        "cpu": cpu,
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        # 2 logical CPUs on one core (hyperthreads) time a 2-thread model nearly like 1 thread
        "threads_per_core": threads_per_core(info),
        # fewer when the process is pinned (taskset, a container's cpuset): its runtimes share those
        "usable_cpus": usable_cpus(),
        "isa": [f for f in _ISA_FLAGS if f in flags],
        "system": platform.system(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        # the widest vector ISA torch's own CPU kernels dispatch to here ("AVX2", "AVX512", ...)
        "torch_isa": torch.backends.cpu.get_cpu_capability(),
    }
    mhz = cpu_mhz()
    if mhz is not None:
        out["mhz"] = round(mhz)
    # a cloud VM may name different CPU generations alike ("Intel(R) Xeon(R) Processor"): the CPUID
    # family / model / stepping and the last-level cache tell them apart
    if "cpu family" in info and "model" in info:
        out["cpuid"] = f"family {info['cpu family']} model {info['model']} stepping {info.get('stepping', '?')}"
    if "cache size" in info:
        out["cache_size"] = info["cache size"]
    return out


def host_label(host: dict[str, Any]) -> str:
    """``cpu`` plus, where known, its CPUID and cache size: one line that tells hosts apart."""
    extra = ", ".join(host[k] for k in ("cpuid", "cache_size") if host.get(k))
    return f"{host['cpu']} ({extra})" if extra else host["cpu"]


def cpu_count_text(host: dict[str, Any]) -> str:
    """``"2 logical CPUs, 1 per core"``: the logical CPUs of ``host``, how many of them the process could
    use where that is fewer (``"2 logical CPUs (1 usable by this process), 1 per core"``) and, where
    known, how many share a core (two hyperthreads of one core are not two cores' worth of GEMM)."""
    per_core, usable = host.get("threads_per_core"), host.get("usable_cpus")
    text = f"{host.get('logical_cpus')} logical CPUs"
    if usable is not None and usable != host.get("logical_cpus"):
        text += f" ({usable} usable by this process)"
    return text + (f", {per_core} per core" if per_core else "")


def gemm_throughput(threads: int, size: int = 1024, calls: int = 10) -> dict[str, Any]:
    """Measured GEMM throughput of this host in GOP/s: fp32 and bf16 with ``torch.mm`` (bf16: AMX or
    AVX512-BF16 where the CPU has them; what OpenVINO's fp16 IRs compute in there), int8 with the
    fastest of ``torch._int_mm``, ONNX Runtime's ``MatMulInteger`` (VNNI kernels where the CPU has
    them) and OpenVINO's int8 FullyConnected (AMX where the CPU has it), each where installed."""
    with torch_threads(threads):
        return _gemm_throughput(threads, size, calls)


def _gemm_throughput(threads: int, size: int, calls: int) -> dict[str, Any]:
    ops = 2 * size**3
    a, b = torch.randn(size, size), torch.randn(size, size)
    fp32 = summarize(time_calls(lambda _: torch.mm(a, b), a, 3, calls))["median_ms"]
    ha, hb = a.bfloat16(), b.bfloat16()
    bf16 = summarize(time_calls(lambda _: torch.mm(ha, hb), ha, 3, calls))["median_ms"]
    qa = torch.randint(-128, 127, (size, size), dtype=torch.int8)
    qb = torch.randint(-128, 127, (size, size), dtype=torch.int8)
    int8 = {"torch._int_mm": summarize(time_calls(lambda _: torch._int_mm(qa, qb), qa, 3, calls))["median_ms"]}
    ort_ms = _ort_int8_gemm_ms(size, threads, calls)
    if ort_ms is not None:
        int8["onnxruntime MatMulInteger"] = ort_ms
    ov_ms = _openvino_int8_gemm_ms(size, threads, calls)
    if ov_ms is not None:
        int8["openvino FullyConnected"] = ov_ms
    source = min(int8, key=lambda name: int8[name])
    return {
        "fp32_gops": ops / (fp32 * 1e6),
        "fp32_source": "torch.mm",
        "bf16_gops": ops / (bf16 * 1e6),
        "bf16_source": "torch.mm",
        "int8_gops": ops / (int8[source] * 1e6),
        "int8_source": source,
        **{f"int8_gops[{k}]": ops / (v * 1e6) for k, v in int8.items()},
        "size": size,
        "threads": threads,
        "host": host_description(),
    }
