import copy
import hashlib
import json

import pytest
import torch
from torch import nn

import pqv_lightning.export.core as export_mod
from pqv_lightning.errors import ConfigError
from pqv_lightning.export import (
    ENGINES,
    PRECISIONS,
    TARGETS,
    ExportFailedError,
    MobileExportConfig,
    export_mobile,
    host_default_engine,
)

from conftest import image_batches, quick_export_config, tiny_vit

SUPPORTED = [e for e in ENGINES if e in torch.backends.quantized.supported_engines]


_data = image_batches


def _config(tmp_path, **kw):
    return quick_export_config(kw.pop("output_dir", tmp_path / "out"), **kw)


@pytest.mark.parametrize("dim", [64, pytest.param(256, marks=pytest.mark.slow)])  # fast tier <= 5 min
@pytest.mark.parametrize("precision", [p for p in PRECISIONS if TARGETS["ptl"].supports(PRECISIONS[p])])
def test_every_precision_and_engine_round_trips_through_the_lite_interpreter(tmp_path, precision, dim):
    model = tiny_vit(embed_dim=dim, depth=1, num_heads=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # random-init logits are nearly tied, so top-1 agreement is a noisy signal here: cosine is the real check
    config = _config(tmp_path, precisions=[precision], engines=SUPPORTED, min_top1_agreement=0.7)
    manifest = export_mobile(model, torch.randn(1, 1, 32, 32), config, validation_data=_data())
    engine_dependent = precision.startswith("int8")
    assert len(manifest["artifacts"]) == (len(SUPPORTED) if engine_dependent else 1)
    for entry in manifest["artifacts"]:
        assert entry["status"] == "ok", entry.get("reason")
        path = tmp_path / "out" / entry["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert entry["size_bytes"] == path.stat().st_size
        v = entry["verification"]
        assert v["samples"] == 24 and v["top1_agreement"] >= 0.7 and v["cosine"] > 0.99
        assert 0.0 <= v["top1_accuracy"] <= 1.0
        assert entry["latency"]["median_ms"] > 0 and entry["latency"]["speedup_vs_fp32_eager"] > 0
        if torch._C._is_xnnpack_enabled():
            assert "torch.utils.mobile_optimizer.optimize_for_mobile" in entry["optimizations_applied"]
        else:  # never claim an optimization that did not run
            assert not any("optimize_for_mobile" in o for o in entry["optimizations_applied"])
            assert any("XNNPACK" in s for s in entry["optimizations_skipped"])
    # the source model is untouched (no quantized modules, same weights)
    assert all(type(m).__module__.startswith(("timm", "torch.nn.modules")) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["artifacts"] == json.loads(json.dumps(manifest["artifacts"]))


def test_default_engine_is_named_in_the_manifest_and_memory_is_measured(tmp_path):
    manifest = export_mobile(
        tiny_vit(), torch.randn(1, 1, 32, 32), _config(tmp_path, precisions=["int8-dynamic"], measure_memory=True)
    )
    memory = manifest["artifacts"][0]["memory"]
    assert memory["peak_rss_mb"] > memory["load_and_inference_mb"] > 0
    assert manifest["host"]["default_engine"] == host_default_engine()
    assert manifest["artifacts"][0]["engine"] == host_default_engine()
    assert manifest["artifacts"][0]["verification"]["samples"] == 1  # example input only


def test_threshold_marks_failure_or_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(
        export_mod,
        "_verify",
        lambda run, ref, batches: {"samples": 1, "top1_agreement": 0.5, "max_abs_logit_error": 1.0, "cosine": 0.1},
    )
    with pytest.warns(UserWarning, match="failed verification"):
        manifest = export_mobile(tiny_vit(), torch.randn(1, 1, 32, 32), _config(tmp_path, precisions=["fp32"]))
    assert manifest["artifacts"][0]["status"] == "failed"
    assert "top-1 agreement 0.5000 < min_top1_agreement 0.9" in manifest["artifacts"][0]["reason"]
    with (
        pytest.raises(ExportFailedError, match="model_fp32.ptl: verification failed: top-1 agreement"),
        pytest.warns(UserWarning),
    ):
        export_mobile(
            tiny_vit(),
            torch.randn(1, 1, 32, 32),
            _config(tmp_path, precisions=["fp32"], on_failure="raise", output_dir=str(tmp_path / "b")),
        )


def test_on_failure_raise_stops_at_an_artifact_whose_export_throws(tmp_path, monkeypatch):
    from pqv_lightning.export.targets import TARGETS

    target = TARGETS["ptl"]

    def broken(*args, **kwargs):
        raise KeyError("unsupported op aten::foo")

    monkeypatch.setattr(target, "write", broken)
    with pytest.warns(UserWarning, match="skipped: export failed"):  # warn: marked skipped, the run goes on
        manifest = export_mobile(tiny_vit(), torch.randn(1, 1, 32, 32), _config(tmp_path, precisions=["fp32"]))
    assert manifest["artifacts"][0]["status"] == "skipped"
    with pytest.raises(ExportFailedError, match=r"model_fp32.ptl: export failed: KeyError: .*aten::foo") as info:
        export_mobile(
            tiny_vit(),
            torch.randn(1, 1, 32, 32),
            _config(tmp_path, precisions=["fp32"], on_failure="raise", output_dir=str(tmp_path / "b")),
        )
    assert isinstance(info.value.__cause__, KeyError)


def test_interrupt_mid_export_leaves_no_partial_artifact_or_entry(tmp_path, monkeypatch):
    real = export_mod._latency
    calls = {"n": 0}

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # baseline, fp32 artifact, then Ctrl-C while timing the int8 artifact
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(export_mod, "_latency", interrupting)
    with pytest.raises(KeyboardInterrupt):
        export_mobile(
            tiny_vit(),
            torch.randn(1, 1, 32, 32),
            _config(tmp_path, precisions=["fp32", "int8-dynamic"], engines=[SUPPORTED[0]]),
        )
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model_fp32.ptl"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["file"] for a in manifest["artifacts"]] == ["model_fp32.ptl"]


def test_a_model_returning_a_dict_with_logits_is_exported_as_its_logits_and_other_outputs_are_refused(tmp_path):
    """A dict (or Hugging Face ModelOutput) with "logits" is exported as those logits (LogitsOnly); any other
    output is refused up front, before a file is written (it used to fail inside tracing)."""

    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = tiny_vit()

        def forward(self, x):
            return {"logits": self.vit(x), "features": x.mean()}

    model, x = DictOut().eval(), torch.randn(2, 1, 32, 32)
    manifest = export_mobile(model, x[:1], _config(tmp_path, precisions=["fp32"]), validation_data=[x])
    (entry,) = manifest["artifacts"]
    assert entry["status"] == "ok" and entry["verification"]["cosine"] > 0.999

    class TupleOut(DictOut):
        def forward(self, x):
            return self.vit(x), x.mean()

    out = tmp_path / "tuple"
    with pytest.raises(
        ConfigError,
        match=r"model returns a tuple; allowed: a logits tensor, or an output with a "
        r"'logits' tensor",
    ):
        export_mobile(TupleOut(), x[:1], _config(out, precisions=["fp32"]))
    assert not (out / "out").exists()  # refused before the output folder was made


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(precisions=["int4"]), r"precisions=\['int4'\]: unknown \['int4'\]; allowed: \['fp32', 'fp16'"),
        (dict(engines=["tensorrt"]), r"engines=\['tensorrt'\]: unknown \['tensorrt'\]; allowed"),
        (dict(on_failure="ignore"), r"on_failure='ignore' is not supported; allowed: \['warn', 'raise'\]"),
        (dict(repeats=0), r"repeats=0 must be an integer >= 1"),
    ],
)
def test_bad_config(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_mobile(tiny_vit(), torch.randn(1, 1, 32, 32), _config(tmp_path, **kwargs))


def test_bad_inputs_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"precisions \['int8-static'\] need calibration_data"):
        export_mobile(tiny_vit(), torch.randn(1, 1, 32, 32), _config(tmp_path, precisions=["int8-static"]))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.ptl").write_text("x")
    with pytest.raises(ValueError, match="is not empty; pass overwrite=True"):
        export_mobile(tiny_vit(), torch.randn(1, 1, 32, 32), _config(tmp_path, output_dir=str(tmp_path / "full")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        export_mobile(tiny_vit(), torch.randn(1, 1, 32, 32), _config(tmp_path, output_dir=str(tmp_path / "file")))
    (tmp_path / "full" / "model_int8-dynamic_x86.ptl").write_text("stale artifact of an earlier export")
    manifest = export_mobile(
        tiny_vit(),
        torch.randn(1, 1, 32, 32),
        _config(tmp_path, precisions=["fp32"], output_dir=str(tmp_path / "full"), overwrite=True),
    )
    assert manifest["artifacts"][0]["status"] == "ok"
    # overwrite replaces our own artifacts (none left stale beside the new manifest), never other files
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["manifest.json", "model_fp32.ptl", "old.ptl"]


@pytest.mark.slow
def test_every_int8_artifact_is_at_most_0_3x_its_fp32_file(tmp_path):
    """int8 weights are a quarter of fp32 ones. For a model whose weights dominate, every int8 file of
    every format and engine must show it (x86/FBGEMM .ptl files once stored their weights twice)."""
    import importlib.util

    formats = ["ptl"] + [
        f
        for f, mods in (("pte", ["executorch"]), ("onnx", ["onnx", "onnxruntime"]))
        if all(importlib.util.find_spec(m) for m in mods)
    ]
    model = tiny_vit(embed_dim=256, depth=2, num_heads=4)  # 1.6 M weights in Linears, 6 MB in fp32
    manifest = export_mobile(
        model,
        torch.randn(1, 1, 32, 32),
        _config(
            tmp_path,
            precisions=["fp32", "int8-dynamic", "int8-static"],
            formats=formats,
            engines=SUPPORTED,
            repeats=1,
            warmup=0,
            min_top1_agreement=0.0,
        ),
        validation_data=_data(1),
    )  # random-init logits tie
    fp32 = {a["format"]: a["size_bytes"] for a in manifest["artifacts"] if a["precision"] == "fp32"}
    int8 = [a for a in manifest["artifacts"] if a["precision"].startswith("int8")]
    assert len(int8) == 2 * len(SUPPORTED) + 2 * (len(formats) - 1)
    ratios = {a["file"]: a["size_bytes"] / fp32[a["format"]] for a in int8 if a["status"] == "ok"}
    assert len(ratios) == len(int8), [a.get("reason") for a in int8 if a["status"] != "ok"]
    assert all(r <= 0.3 for r in ratios.values()), ratios


# ---------------------------------------------------------------------------------------------- build workers
def _without_timings(entry: dict) -> dict:
    """An entry without what differs between two builds of the same file: timings, and the bytes
    (a TorchScript archive is not byte-reproducible, even built twice in one process)."""
    return {k: v for k, v in entry.items() if k not in ("latency", "memory", "sha256", "size_bytes", "build_seconds")}


@pytest.mark.slow  # fast tier <= 5 min on 2 cores (issue 29): CI's slow tier runs it
def test_files_built_in_worker_processes_equal_those_built_here(tmp_path):
    """jobs=2: the first file is built here, the other two in two worker processes; every entry (file,
    checks, hash, what was applied) equals the in-process build's, and only the finished files stay."""
    model, example = tiny_vit(depth=1), torch.randn(1, 1, 32, 32)
    kw = dict(precisions=["fp32", "int8-dynamic", "int8-static"], engines=["x86"])
    here = export_mobile(model, example, _config(tmp_path, output_dir=tmp_path / "a", **kw), validation_data=_data())
    seen = []
    there = export_mobile(
        model,
        example,
        _config(tmp_path, output_dir=tmp_path / "b", jobs=2, **kw),
        validation_data=_data(),
        progress=lambda *a: seen.append(a),
    )
    assert here["build"]["processes"] == 1 and there["build"]["processes"] == 2, there["build"]
    assert "note" not in there["build"]
    assert [_without_timings(e) for e in there["artifacts"]] == [_without_timings(e) for e in here["artifacts"]]
    assert [a["status"] for a in there["artifacts"]] == ["ok"] * 3
    assert all(a["build_seconds"] > 0 for a in there["artifacts"])
    for a, b in zip(here["artifacts"], there["artifacts"]):
        assert abs(a["size_bytes"] - b["size_bytes"]) < 0.01 * a["size_bytes"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(p.name for p in (tmp_path / "a").iterdir())
    assert seen[0] == (1, 3, "model_fp32.ptl") and sorted(s[0] for s in seen) == [1, 2, 3]
    assert model.training  # the user's model is untouched (export works on a copy)


@pytest.mark.slow  # two worker processes start (~13 s)
def test_auto_starts_the_workers_beside_a_slow_first_file_and_uses_them(tmp_path, monkeypatch):
    """jobs="auto": a first file slower than START_WORKERS_AFTER_S has the workers start beside it;
    slower than PARALLEL_AFTER_S, they build the rest (here both thresholds are made tiny)."""
    monkeypatch.setattr(export_mod, "START_WORKERS_AFTER_S", 0.01)
    monkeypatch.setattr(export_mod, "PARALLEL_AFTER_S", 0.0)
    monkeypatch.setattr(export_mod, "usable_cpus", lambda: 2)
    config = _config(tmp_path, precisions=["fp32", "int8-dynamic", "int8-static"], engines=["x86"], jobs="auto")
    manifest = export_mobile(tiny_vit(depth=1), torch.randn(1, 1, 32, 32), config, validation_data=_data())
    build = manifest["build"]
    assert build["processes"] == 2 and build["workers_started_early"] and build["sent_while_first_built"], build
    assert [a["status"] for a in manifest["artifacts"]] == ["ok"] * 3
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


class _FakeWorker:
    started: list = []

    def __init__(self, module, args, label):
        self.args, self.killed = args, False
        _FakeWorker.started.append(self)

    def kill(self):
        self.killed = True


def test_the_worker_pool_starts_on_its_timer_or_when_asked_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "LineWorker", _FakeWorker)
    _FakeWorker.started = []
    ctx = export_mod._BuildContext(
        sources={},
        precisions={},
        example=torch.zeros(1),
        calibration=[],
        verify=[],
        expected=[],
        config=export_mod.MobileExportConfig(),
        default_engine="x86",
        out=str(tmp_path),
    )
    # asked before its timer fires: starts at once, the timer then starts nothing more
    with export_mod._WorkerPool(ctx, 2, delay=60.0) as pool:
        (work,) = [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]
        assert (work / "context.pt").is_file() and not pool.started
        workers = pool.workers()
        assert len(workers) == 2 and workers[0].args[0] == str(work / "context.pt") and workers[0].args[1] == "1"
    assert all(w.killed for w in workers) and not list(tmp_path.iterdir())
    # its timer fires first
    with export_mod._WorkerPool(ctx, 3, delay=0.01) as pool:
        pool._timer.join(5)
        assert pool.started and len(_FakeWorker.started) == 5
    assert all(w.killed for w in _FakeWorker.started)
    # left before the timer fires: no worker ever starts, nothing stays on disk
    with export_mod._WorkerPool(ctx, 2, delay=60.0) as pool:
        pass
    assert len(_FakeWorker.started) == 5 and not list(tmp_path.iterdir())
    # a context that cannot be saved: the error, and no folder left behind
    bad = copy.copy(ctx)
    bad.calibration = [lambda: None]
    with pytest.raises(Exception, match="lambda"):
        export_mod._WorkerPool(bad, 2, delay=0.0).__enter__()
    assert not list(tmp_path.iterdir())


def test_the_sender_sends_after_its_delay_or_when_told_and_never_after_a_cancel(monkeypatch):
    import threading
    import time

    sent, released = [], threading.Event()

    def fake_build_in_workers(builder, pending, workers):
        sent.append(list(pending))
        released.wait(10)  # a worker busy with a file until the pool is closed

    class Pool:
        closed = False

        def workers(self):
            return []

        def close(self):
            self.closed = True
            released.set()

    monkeypatch.setattr(export_mod, "_build_in_workers", fake_build_in_workers)
    with export_mod._Sender(None, [1, 2], Pool(), delay=60.0) as sender:  # told to go
        sender.go()
        released.set()
        sender.join()
    assert sent == [[1, 2]] and sender.started
    with export_mod._Sender(None, [3], Pool(), delay=60.0) as sender:  # cancelled before its delay
        assert sender.cancel()
    assert sent == [[1, 2]] and not sender.started
    released.clear()
    with export_mod._Sender(None, [4], Pool(), delay=0.0) as sender:  # its delay passed: cancel is too late
        while not sender.started:
            time.sleep(0.01)
        assert not sender.cancel()
        released.set()
    assert sent[-1] == [4]
    # an interruption while the first file builds: the pool is closed, so its thread ends at once
    released.clear()
    pool = Pool()
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        with export_mod._Sender(None, [5], pool, delay=0.0) as sender:
            while not sender.started:
                time.sleep(0.01)
            raise KeyboardInterrupt
    assert pool.closed and time.perf_counter() - started < 5 and not sender._thread.is_alive()


class _LoadsOnlyHere:
    """Pickles, but cannot be unpickled in a build worker (as a class defined in a script's
    ``__main__`` cannot)."""

    def __reduce__(self):
        return (_load_here, ())


def _load_here():
    import sys

    if "build_worker" in sys.argv[0]:
        raise RuntimeError("this object cannot be loaded in a build worker")
    return _LoadsOnlyHere()


@pytest.mark.slow  # fast tier <= 5 min: two worker processes that start and fail (~13 s)
def test_a_model_the_workers_cannot_load_is_built_here_and_the_manifest_says_why(tmp_path):
    model = tiny_vit(depth=1)
    model.marker = _LoadsOnlyHere()
    config = _config(tmp_path, precisions=["fp32", "int8-dynamic", "int8-static"], engines=["x86"], jobs=2)
    manifest = export_mobile(model, torch.randn(1, 1, 32, 32), config, validation_data=_data())
    build = manifest["build"]
    assert build["processes"] == 1, build
    assert "the build workers failed" in build["note"] and "cannot be loaded in a build worker" in build["note"]
    assert [a["status"] for a in manifest["artifacts"]] == ["ok"] * 3
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_a_model_that_cannot_be_pickled_is_built_here(tmp_path):
    class Local(nn.Module):  # a local class: torch.save cannot pickle it, so no worker is started
        def __init__(self):
            super().__init__()
            self.net = tiny_vit(depth=1)

        def forward(self, x):
            return self.net(x)

    config = _config(tmp_path, precisions=["fp32", "int8-dynamic", "int8-static"], engines=["x86"], jobs=2)
    manifest = export_mobile(Local(), torch.randn(1, 1, 32, 32), config, validation_data=_data())
    assert manifest["build"]["processes"] == 1 and "Local" in manifest["build"]["note"], manifest["build"]
    assert [a["status"] for a in manifest["artifacts"]] == ["ok"] * 3


@pytest.mark.parametrize(
    ("jobs", "first_s", "remaining", "expected"),
    [
        ("auto", export_mod.PARALLEL_AFTER_S - 1, 8, 1),  # a small model: a worker's start-up would not pay
        ("auto", export_mod.PARALLEL_AFTER_S, 8, min(export_mod.MAX_AUTO_JOBS, export_mod.usable_cpus())),
        ("auto", 600.0, 1, 1),  # one file left: nothing to run side by side
        (3, 0.0, 8, 3),
        (3, 0.0, 2, 2),
        (1, 600.0, 8, 1),
    ],
)
def test_how_many_build_workers(jobs, first_s, remaining, expected):
    assert export_mod._build_processes(jobs, first_s, remaining) == expected


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True, "2", "many", None])
def test_bad_jobs_is_refused(tmp_path, jobs):
    with pytest.raises(ConfigError, match=rf"jobs={jobs!r}; allowed: 'auto' or an integer >= 1"):
        _config(tmp_path, jobs=jobs).validate()


def test_a_files_only_config_writes_and_verifies_without_timing_or_ranking(tmp_path):
    config = MobileExportConfig.files_only(tmp_path / "out", formats=["ptl"], precisions=["fp32"], repeats=3)
    assert config.output_dir == str(tmp_path / "out") and config.repeats == 3  # a field given wins
    assert (config.rank, config.warmup, config.measure_memory, config.overwrite) == ("none", 0, False, True)
    assert (config.verify_batches, config.calibration_batches, config.min_top1_agreement) == (2, 2, 0.0)
    config.validate()
    manifest = export_mobile(tiny_vit(), torch.randn(1, 1, 32, 32), config, validation_data=[torch.randn(2, 1, 32, 32)])
    (entry,) = manifest["artifacts"]
    assert entry["status"] == "ok" and (tmp_path / "out" / entry["file"]).is_file()
    assert entry.get("memory") is None and manifest.get("best") is None
