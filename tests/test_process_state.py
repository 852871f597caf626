"""Library calls leave the caller's process as they found it: torch threads, quantized engine,
ExecuTorch's thread pool, logger levels and matplotlib's backend."""

import importlib.util
import logging
import sys

import matplotlib
import pytest
import torch

from pqv_lightning.apps.plots import demo_plots
from pqv_lightning.export import MobileExportConfig, export_mobile
from pqv_lightning.export.benchmark import load_runner
from pqv_lightning.export.host import gemm_throughput
from pqv_lightning.settings import executorch_threads, logger_levels, quantized_engine, torch_threads

from conftest import tiny_vit

HAVE_ET = importlib.util.find_spec("executorch") is not None
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


def _et_threads():
    if not HAVE_ET:
        return None
    from executorch.extension.pybindings import portable_lib

    return portable_lib._threadpool_get_thread_count()


def _snapshot():
    names = ["", "onnxruntime", "onnxscript", "torch.onnx", "torch.export", "executorch"]
    return {
        "threads": torch.get_num_threads(),
        "engine": torch.backends.quantized.engine,
        "executorch_threads": _et_threads(),
        "levels": {n: logging.getLogger(n or None).level for n in names},
        "backend": dict.__getitem__(matplotlib.rcParams, "backend"),  # the raw value: reading resolves nothing
        "pyplot": "matplotlib.pyplot" in sys.modules,
    }


@pytest.fixture
def unusual_state():
    """Settings no library call would choose, put back after the test."""
    engines = [e for e in torch.backends.quantized.supported_engines if e not in ("none", "x86")]
    with torch_threads(1), quantized_engine(engines[0]), logger_levels(["", "torch.onnx"], logging.DEBUG):
        if HAVE_ET:
            with executorch_threads(3):
                yield
        else:
            yield


@pytest.mark.slow  # fast tier <= 5 min: every runtime and the GEMM probes (~25 s)
def test_export_benchmark_gemm_and_plots_restore_process_state(tmp_path, unusual_state):
    before = _snapshot()
    formats = ["ptl"] + (["pte"] if HAVE_ET else []) + (["onnx"] if HAVE_ONNX else [])
    manifest = export_mobile(
        tiny_vit(depth=1),
        torch.randn(1, 1, 32, 32),
        MobileExportConfig(
            precisions=["fp32", "int8-dynamic"],
            formats=formats,
            engines=["x86"],
            output_dir=str(tmp_path / "out"),
            threads=2,
            repeats=1,
            warmup=0,
            measure_memory=False,
            rank="in-process",
        ),
    )
    assert {a["status"] for a in manifest["artifacts"]} == {"ok"}
    assert _snapshot() == before
    for a in manifest["artifacts"]:
        run = load_runner(str(tmp_path / "out" / a["file"]), [1, 1, 32, 32], 2, a["engine"])
        assert run(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    assert _snapshot() == before
    gemm = gemm_throughput(threads=2, size=64, calls=1)
    assert gemm["threads"] == 2 and gemm["fp32_gops"] > 0
    assert _snapshot() == before
    rows = [dict(label="a", test_acc=0.9, params=5e6, macs=3e8), dict(label="b", test_acc=0.88, params=3e6, macs=2e8)]
    assert demo_plots({"finetune": rows, "manifest": manifest}, tmp_path / "plots")
    assert _snapshot() == before


def test_settings_context_managers_restore_on_error():
    before = _snapshot()
    with pytest.raises(KeyError):
        with (
            torch_threads(1),
            quantized_engine(torch.backends.quantized.supported_engines[0]),
            logger_levels([""], logging.CRITICAL),
        ):
            assert torch.get_num_threads() == 1 and logging.getLogger().level == logging.CRITICAL
            raise KeyError("boom")
    assert _snapshot() == before
