"""`pqv headline` (issue 33): the one command that reproduces the headline ratio, and the host facts
that tell two runs apart (steal time, CPU clock, the kernels OpenVINO chose)."""

from __future__ import annotations

import json

import pytest
import torch

from pqv_lightning.apps.cli import main
from pqv_lightning.errors import ConfigError
from pqv_lightning.export import TARGETS
from pqv_lightning.hostcpu import cpu_mhz, cpu_times, steal_fraction


def test_steal_is_the_share_of_cpu_time_the_hypervisor_took(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 0 0 0 50 0 0\ncpu0 1 2 3\n")
    before = cpu_times(stat)
    stat.write_text("cpu  200 0 100 1500 0 0 0 200 30 0\n")  # guest time is inside user time already
    after = cpu_times(stat)
    assert before == {
        "user": 100,
        "nice": 0,
        "system": 50,
        "idle": 800,
        "iowait": 0,
        "irq": 0,
        "softirq": 0,
        "steal": 50,
        "guest": 0,
        "guest_nice": 0,
    }
    assert steal_fraction(before, after) == pytest.approx(150 / (100 + 50 + 700 + 150))
    assert steal_fraction(None, after) is None
    assert cpu_times(tmp_path / "missing") is None
    stat.write_text("intr 1 2 3\n")
    assert cpu_times(stat) is None


def test_cpu_clock_is_the_mean_of_the_cpus_current_mhz(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu MHz\t\t: 2000.5\n\nprocessor\t: 1\ncpu MHz\t\t: 3000.5\n")
    assert cpu_mhz(info) == pytest.approx(2500.5)
    info.write_text("processor\t: 0\n")
    assert cpu_mhz(info) is None


@pytest.mark.skipif(TARGETS["openvino"].missing() is not None, reason="the openvino extra is not installed")
def test_openvino_reports_the_kernel_of_every_gemm(tmp_path):
    from pqv_lightning.export.openvino_target import compile_ir, export_openvino, gemm_kernels

    from conftest import tiny_vit

    path = tmp_path / "m.xml"
    export_openvino(tiny_vit(depth=1), torch.randn(1, 1, 32, 32), "fp32", str(path))
    kernels = gemm_kernels(compile_ir(str(path), 1, [1, 1, 32, 32]))
    assert sum(kernels.values()) == 5  # qkv, proj, fc1, fc2, head
    assert all(k.startswith(("FullyConnected ", "MatMul ")) and "(f32)" in k for k in kernels), kernels


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "'0': allowed is an integer >= 1"),
        (["--ratios", "1.5"], "pruning ratio 1.5: must be in (0, 1)"),
        (["--ratios"], "nothing to time: give --ratios and/or --heads-ratios"),
        (["--formats", "tflite"], "tflite"),
        (["--formats", "pte", "--precisions", "int8-dynamic", "int4-weight"], "precision 'int4-weight': none of"),
        (["--formats", "onnx", "--precisions", "int8-dynamic", "int8-dynamic-int4-weight"], "'onnx'"),
        (["--precisions", "int3"], "'int3'"),
    ],
)
def test_bad_headline_options_end_with_one_line(argv, message, capsys, tmp_path):
    try:
        status = main(["headline", "--work", str(tmp_path), *argv])
    except SystemExit as exc:  # argparse's own type errors
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pqv: error:") and message in err[0]


def test_formats_that_write_other_int4_precisions_export_apart():
    from pqv_lightning.apps.headline import _plan

    both = ["int8-dynamic", "int8-dynamic-int4-weight", "int4-weight"]
    assert _plan(["pte", "onnx", "openvino"], both) == [
        (["pte"], ["int8-dynamic", "int8-dynamic-int4-weight"]),
        (["onnx", "openvino"], ["int8-dynamic", "int4-weight"]),
    ]
    assert _plan(["onnx", "pte"], ["int8-dynamic", "int8-static"]) == [
        (["onnx", "pte"], ["int8-dynamic", "int8-static"])
    ]
    with pytest.raises(ConfigError, match=r"format 'pte' can write none of --precisions \['int4-weight'\]"):
        _plan(["onnx", "pte"], ["int4-weight"])


@pytest.mark.slow
def test_pqv_headline_exports_times_and_reports_the_ratio_with_the_host_facts(tmp_path, capsys):
    formats = [f for f in ("onnx", "openvino") if TARGETS[f].missing() is None]
    if not formats:
        pytest.skip("neither the onnx nor the openvino extra is installed")
    argv = ["headline", "--model", "vit_test_tiny", "--ratios", "0.25", "--formats", *formats]
    argv += ["--precisions", "int8-dynamic", "--repeats", "1", "--rounds", "1", "--calls", "3", "--warmup", "1"]
    argv += ["--max-contention", "none"]  # a test must pass on a busy host
    assert main([*argv, "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "headline.json").read_text())
    rep = data["repeat/0"]
    assert set(rep["summary"]["0.25"]) == {"best", "best_ms", "x_eager", "vs_ort"}
    assert rep["summary"]["0.25"]["x_eager"] > 0 and rep["summary"]["baseline_ms"] > 0
    assert rep["steal"] is None or 0 <= rep["steal"] < 1
    assert rep["host"]["torch_isa"] == torch.backends.cpu.get_cpu_capability()
    exported = data["export/0.25"]
    assert sorted(exported["files"]) == sorted(f"model_int8-dynamic{TARGETS[f].suffix}" for f in formats)
    if "openvino" in formats:
        assert sum(exported["openvino_kernels"]["model_int8-dynamic.xml"].values()) == 9
    assert all(exported["sizes"][f] > 0 for f in exported["files"])
    assert "| 25 % | model_int8-dynamic.onnx |" in out  # the table of every file
    assert "Headline ratios of `vit_test_tiny`" in out and "| steal | CPU clock |" in out and "Host: " in out
    assert out.strip().endswith((tmp_path / "headline.md").read_text().strip())  # after the progress lines
    # a second run reuses the export and the repeat: nothing is measured again
    before = (tmp_path / "headline.json").read_text()
    assert main([*argv, "--work", str(tmp_path)]) == 0
    assert (tmp_path / "headline.json").read_text() == before


@pytest.mark.slow
def test_pqv_headline_times_int4_files_of_every_format_beside_int8(tmp_path, capsys, monkeypatch):
    """int4 is 'int8-dynamic-int4-weight' in a .pte and 'int4-weight' in ONNX / OpenVINO: one headline
    run exports each group apart and times all of them in one round-robin (a 64-wide ViT stands in for
    DeiT-base: int4 groups of 32 divide its widths)."""
    import pqv_lightning.models

    formats = [f for f in ("pte", "onnx", "openvino") if TARGETS[f].missing() is None]
    if "pte" not in formats or len(formats) < 2:
        pytest.skip("needs the executorch extra and onnx or openvino")
    from conftest import tiny_vit

    monkeypatch.setattr(pqv_lightning.models, "paper_model", lambda name, ratio=0.0, **kw: tiny_vit())
    argv = ["headline", "--ratios", "0.25", "--formats", *formats, "--work", str(tmp_path)]
    argv += ["--precisions", "int8-dynamic", "int8-dynamic-int4-weight", "int4-weight"]
    argv += ["--repeats", "1", "--rounds", "1", "--calls", "3", "--warmup", "1", "--max-contention", "none"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "headline.json").read_text())
    others = "+".join(f for f in formats if f != "pte")
    files = sorted(data["export/0.25"]["files"])
    expected = ["pte/model_int8-dynamic.pte", "pte/model_int8-dynamic-int4-weight.pte"]
    expected += [
        f"{others}/model_{p}{TARGETS[f].suffix}" for f in formats if f != "pte" for p in ("int8-dynamic", "int4-weight")
    ]
    assert files == sorted(expected)
    assert all((tmp_path / "25pct" / f).is_file() for f in files)
    sizes = data["export/0.25"]["sizes"]
    assert sizes["pte/model_int8-dynamic-int4-weight.pte"] < sizes["pte/model_int8-dynamic.pte"]
    timed = {k.split(" | ", 1)[1] for k in data["repeat/0"]["stats"] if k.startswith("25% | ")}
    assert timed == set(files)
    assert "| 25 % | pte/model_int8-dynamic-int4-weight.pte |" in capsys.readouterr().out
