"""``pqv coverage``: the generated model-coverage matrix."""

from __future__ import annotations

import pytest

from pqv_lightning.apps import coverage
from pqv_lightning.apps.cli import main
from pqv_lightning.export import TARGETS


def _format() -> str:
    return "onnx" if TARGETS["onnx"].missing() is None else "ptl"


@pytest.mark.slow  # fast tier <= 5 min on 2 cores: pqv coverage end to end (~25 s)
def test_coverage_rows_cells_and_cache(tmp_path, monkeypatch):
    rows = coverage.run_coverage(["vit", "levit"], [_format()], tmp_path)
    vit, levit = rows["vit"]["cells"], rows["levit"]["cells"]
    assert all(cell.startswith("ok (") for cell in vit.values()), vit
    assert "MACs 0.50x" in vit["target_macs 0.5"] and "same outputs" in vit["save + reload"]
    assert all(
        cell.startswith("refused: ") and ("timm.models.levit.LevitDistilled" in cell or "no prunable model" in cell)
        for cell in levit.values()
    ), levit
    text = (tmp_path / "coverage.md").read_text()
    assert "| `vit` (ViT / DeiT) | timm `vit_tiny_patch16_224` | ok (" in text and "(every column)" in text

    def boom(*args):
        raise AssertionError("a cached family was computed again")

    monkeypatch.setattr(coverage, "check_family", boom)
    assert coverage.run_coverage(["vit", "levit"], [_format()], tmp_path) == rows


def test_a_failing_cell_is_reported_not_raised():
    assert coverage._cell(lambda: 1 / 0).startswith("FAILED: ZeroDivisionError")
    assert coverage._cell(lambda: "3x") == "ok (3x)"


@pytest.mark.parametrize(
    "argv",
    [
        ["coverage", "--families", "nope"],
        ["coverage", "--formats", "tflite"],
        ["coverage", "--out", "/proc/version/cov"],
    ],
)
def test_coverage_cli_refuses_bad_input(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("pqv: error:"), err


def test_an_export_cell_with_a_bad_file_is_partly():
    assert coverage._cell(lambda: "m.pte cos 1.000; m.onnx LOW cos 0.000").startswith("partly (")
    assert coverage._cell(lambda: "m.pte cos 1.000; m.ptl skipped: export failed").startswith("partly (")
