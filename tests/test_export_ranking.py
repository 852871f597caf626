"""The manifest's ``best``: the fastest verified artifact on this host, chosen round-robin, each file in a
process of its own (as ``pqv bench``) or from the in-process latencies."""

import copy

import pytest
import torch
from torch import nn

from pqv_lightning.export import MobileExportConfig, export_mobile, rank_artifacts

from conftest import tiny_vit


@pytest.mark.slow  # fast tier <= 5 min: the exported_tiny set, every file timed in a process of its own
def test_best_is_the_fastest_verified_artifact_timed_round_robin(exported_tiny):
    out, manifest = exported_tiny
    best = manifest["best"]
    ok = [a for a in manifest["artifacts"] if a["status"] == "ok"]
    assert len(ok) >= 2 and all(a["latency_round_robin"]["calls"] == 3 for a in ok)  # 1 round x 3 calls each
    fastest = min(ok, key=lambda a: a["latency_round_robin"]["median_ms"])
    assert best["file"] == fastest["file"] and (out / best["file"]).is_file()
    assert best["runtime"] == fastest["runtime"] and best["precision"] == fastest["precision"]
    assert best["median_ms"] == fastest["latency_round_robin"]["median_ms"]
    eager = manifest["baseline_fp32_eager"]["latency_round_robin"]["median_ms"]
    assert best["speedup_vs_fp32_eager"] == pytest.approx(eager / best["median_ms"])
    assert best["method"].startswith("round-robin: every artifact and fp32 eager in a process of its own, 1 rounds x 3")
    assert not list(out.glob(".rank-*"))  # the temporary eager model is gone


def _artifact(name, status, median):
    return {
        "file": name,
        "format": "onnx",
        "runtime": "ONNX Runtime (CPU)",
        "precision": "fp32",
        "engine": None,
        "status": status,
        "latency": {"median_ms": median, "p90_ms": median, "speedup_vs_fp32_eager": 10 / median},
    }


def test_in_process_ranking_takes_only_verified_artifacts(tmp_path):
    config = MobileExportConfig(rank="in-process")
    manifest = {
        "artifacts": [
            _artifact("a.onnx", "ok", 4.0),
            _artifact("b.onnx", "failed", 1.0),
            _artifact("c.onnx", "ok", 2.0),
            {"file": "d.onnx", "status": "skipped"},
        ]
    }
    best = rank_artifacts(manifest, tmp_path, nn.Identity(), torch.zeros(1), config)
    assert best["file"] == "c.onnx" and best["speedup_vs_fp32_eager"] == 5.0
    assert best["method"].startswith("in-process latency")
    failed_only = {"artifacts": [_artifact("b.onnx", "failed", 1.0)]}
    assert rank_artifacts(failed_only, tmp_path, nn.Identity(), torch.zeros(1), config) is None


def test_round_robin_falls_back_to_in_process_when_the_model_cannot_be_pickled(tmp_path):
    class Local(nn.Module):  # defined in a function: a worker process cannot unpickle it
        def __init__(self):
            super().__init__()
            self.vit = tiny_vit(depth=1)

        def forward(self, x):
            return self.vit(x)

    config = MobileExportConfig(
        precisions=["fp32", "int8-dynamic"],
        formats=["ptl"],
        output_dir=str(tmp_path / "out"),
        repeats=2,
        warmup=1,
        measure_memory=False,
        rank="round-robin",
        rank_rounds=1,
        rank_calls=2,
    )
    with pytest.warns(UserWarning, match="round-robin ranking failed"):
        manifest = export_mobile(Local(), torch.randn(1, 1, 32, 32), copy.deepcopy(config))
    assert manifest["best"]["method"].startswith("in-process latency (round-robin failed: ")
    assert manifest["best"]["file"] in {a["file"] for a in manifest["artifacts"] if a["status"] == "ok"}
    assert not list((tmp_path / "out").glob(".rank-*"))


def test_rank_none_writes_no_best_and_bad_rank_is_refused(tmp_path):
    config = MobileExportConfig(
        precisions=["fp32"],
        formats=["ptl"],
        output_dir=str(tmp_path / "out"),
        repeats=1,
        warmup=0,
        measure_memory=False,
        rank="none",
    )
    assert "best" not in export_mobile(tiny_vit(depth=1), torch.randn(1, 1, 32, 32), config)
    with pytest.raises(
        ValueError, match=r"rank='fastest' is not supported; allowed: \['round-robin', 'in-process', 'none'\]"
    ):
        MobileExportConfig(rank="fastest").validate()
    with pytest.raises(ValueError, match=r"rank_rounds=0 must be an integer >= 1"):
        MobileExportConfig(rank_rounds=0).validate()


_USER_TARGET = """
import torch
from pqv_lightning.export import FP32, Built, ExportTarget, PrecisionJob, register_target


@register_target
class PickledTarget(ExportTarget):
    format, suffix = "pickled-test", ".pickled"

    def write(self, reference, precision, engine, example, calibration, path, options):
        torch.save(self.handler(precision)(reference, PrecisionJob(precision)), path)
        return Built(applied=["torch.save"])

    def load(self, path, example, threads):
        return torch.load(path, weights_only=False).eval()


@PickledTarget.handles(FP32)
def _fp32(model, job):
    return model
"""


@pytest.mark.slow  # fast tier <= 5 min on 2 cores: worker processes (~10 s)
def test_a_format_registered_in_an_importable_module_is_ranked_round_robin(tmp_path, monkeypatch):
    import importlib
    import sys

    from pqv_lightning.export import TARGETS
    from pqv_lightning.export.benchmark import target_modules

    (tmp_path / "user_pickled_target.py").write_text(_USER_TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("user_pickled_target")
    try:
        assert "user_pickled_target" in target_modules()
        out = tmp_path / "export"
        manifest = export_mobile(
            tiny_vit().eval(),
            torch.randn(1, 1, 32, 32),
            MobileExportConfig(
                formats=["pickled-test"],
                precisions=["fp32"],
                output_dir=str(out),
                repeats=2,
                measure_memory=False,
                rank="round-robin",
                rank_rounds=1,
                rank_calls=2,
            ),
        )
        best = manifest["best"]
        # the worker processes imported the module that registered the format (no fallback)
        assert best["method"].startswith("round-robin") and best["file"].endswith(".pickled")
        assert manifest["artifacts"][0]["latency_round_robin"]["calls"] == 2
    finally:
        TARGETS.unregister("pickled-test")
        sys.modules.pop("user_pickled_target", None)


def test_a_format_registered_in_main_is_ranked_in_process_and_says_why(tmp_path):
    from pqv_lightning.export import TARGETS
    from pqv_lightning.export.benchmark import target_modules

    namespace: dict = {"__name__": "__main__"}
    exec(compile(_USER_TARGET, "<script>", "exec"), namespace)  # as if defined in the user's script
    try:
        assert "__main__" not in target_modules()
        with pytest.warns(UserWarning, match="registered in __main__"):
            manifest = export_mobile(
                tiny_vit().eval(),
                torch.randn(1, 1, 32, 32),
                MobileExportConfig(
                    formats=["pickled-test"],
                    precisions=["fp32"],
                    output_dir=str(tmp_path / "export"),
                    repeats=2,
                    measure_memory=False,
                    rank="round-robin",
                    rank_rounds=1,
                    rank_calls=2,
                ),
            )
        assert manifest["best"]["method"].startswith(
            "in-process latency (round-robin failed: RuntimeError: export "
            "format 'pickled-test' (model_fp32.pickled) is registered in __main__"
        )
    finally:
        TARGETS.unregister("pickled-test")


def _memory_config(out, **kw):
    options = dict(precisions=["fp32"], formats=["ptl"], repeats=2, warmup=1, rank="round-robin", rank_rounds=2)
    return MobileExportConfig(output_dir=str(out), measure_memory=True, rank_calls=2, **{**options, **kw})


def test_round_robin_ranking_measures_memory_in_its_timing_processes_without_probes(tmp_path, monkeypatch):
    import pqv_lightning.export.core as core

    def no_probe(*args, **kwargs):
        raise AssertionError("a memory probe ran although the ranking's timing processes measure memory")

    monkeypatch.setattr(core, "_inference_memory", no_probe)
    manifest = export_mobile(tiny_vit(depth=1), torch.randn(1, 1, 32, 32), _memory_config(tmp_path / "out"))
    (entry,) = manifest["artifacts"]
    ranked = entry["latency_round_robin"]
    assert manifest["best"]["method"].startswith("round-robin")
    assert entry["memory"] == {
        "peak_rss_mb": ranked["peak_rss_mb"],
        "load_and_inference_mb": ranked["load_and_inference_mb"],
        "measured_in": "round-robin timing process",
    }
    assert entry["memory"]["peak_rss_mb"] > entry["memory"]["load_and_inference_mb"] > 0
    keys = list(entry)  # the manifest's key order is kept
    assert keys.index("latency") < keys.index("memory") < keys.index("build_seconds")


def test_memory_is_probed_when_the_round_robin_ranking_fails(tmp_path):
    class Local(nn.Module):  # defined in a function: the ranking's worker processes cannot unpickle it
        def __init__(self):
            super().__init__()
            self.vit = tiny_vit(depth=1)

        def forward(self, x):
            return self.vit(x)

    with pytest.warns(UserWarning, match="round-robin ranking failed"):
        manifest = export_mobile(Local(), torch.randn(1, 1, 32, 32), _memory_config(tmp_path / "out"))
    (entry,) = manifest["artifacts"]
    assert "latency_round_robin" not in entry
    memory = entry["memory"]
    assert memory["measured_in"] == "probe" and memory["peak_rss_mb"] > memory["load_and_inference_mb"] > 0


def test_rank_in_process_probes_memory_while_building(tmp_path):
    config = _memory_config(tmp_path / "out", rank="in-process")
    manifest = export_mobile(tiny_vit(depth=1), torch.randn(1, 1, 32, 32), config)
    (entry,) = manifest["artifacts"]
    assert entry["memory"]["measured_in"] == "probe" and "latency_round_robin" not in entry
