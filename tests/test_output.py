"""What a user sees: the apps drop Lightning's banner lines around their own Trainers (and only there),
and keep our lines and every other warning."""

from __future__ import annotations

import io
import logging
import warnings

import lightning.pytorch as pl
import pytest
from lightning.pytorch.utilities import rank_zero_info

from pqv_lightning.apps.recipes import quiet_lightning
from pqv_lightning.progress import progress_bar
from pqv_lightning.settings import dropped_log_lines

RANK_ZERO = "lightning.pytorch.utilities.rank_zero"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _capture():
    logger = logging.getLogger(RANK_ZERO)
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger, handler, level


def test_the_apps_trainers_drop_lightnings_banner_but_not_our_lines(tmp_path):
    logger, handler, level = _capture()
    try:
        with quiet_lightning(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pl.Trainer(accelerator="cpu", logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False)
            rank_zero_info("StructuredPruning event 1/4 at step 8: ...")
            warnings.warn("the user's own warning", UserWarning, stacklevel=1)
        inside = list(handler.lines)
        handler.lines.clear()
        pl.Trainer(accelerator="cpu", logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False)
        outside = list(handler.lines)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert inside == ["StructuredPruning event 1/4 at step 8: ..."]
    assert [str(w.message) for w in caught] == ["the user's own warning"]
    # outside the apps' own blocks Lightning prints what it always prints (the user's Trainer is theirs)
    assert any(line.startswith("GPU available") for line in outside)


def test_dropped_log_lines_leaves_the_logger_as_it_was():
    logger = logging.getLogger("pqv-test-drop")
    handler = _Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    with dropped_log_lines("pqv-test-drop", ["noise"]):
        logger.info("noise: a banner")
        logger.info("signal")
    logger.info("noise after the block")
    logger.removeHandler(handler)
    assert handler.lines == ["signal", "noise after the block"] and logger.filters == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_and_is_silent_elsewhere():
    terminal, log = _Terminal(), io.StringIO()
    with progress_bar("MobileExport", stream=terminal) as report:
        report(1, 4, "model_fp32.pte")
        report(2, 4, "model_int8-dynamic.pte")
    with progress_bar("MobileExport", stream=log) as report:
        report(1, 4, "model_fp32.pte")
    with progress_bar("MobileExport", stream=terminal, enabled=False) as silent:
        silent(1, 4, "x")
    assert "MobileExport" in terminal.getvalue() and "2/4" in terminal.getvalue()
    assert log.getvalue() == ""


def test_reconstruction_and_export_report_their_progress(tmp_path):
    import torch

    from pqv_lightning.export import export_mobile
    from pqv_lightning.pruning import PruningConfig, prune_once

    from conftest import image_batches, quick_export_config, tiny_vit

    seen: list[tuple[int, int, str]] = []
    model = tiny_vit()
    prune_once(
        model,
        PruningConfig(importance="l2", pruning_ratio=0.25, reconstruct=True),
        calibration=[torch.randn(8, 1, 32, 32)],
        progress=lambda *a: seen.append(a),
    )
    layers = [f"blocks.{b}.{n}" for b in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")] + ["head"]
    assert seen == [(i + 1, len(layers), name) for i, name in enumerate(layers)]

    seen.clear()
    config = quick_export_config(
        tmp_path / "out",
        formats=["ptl"],
        precisions=["fp32", "int8-dynamic"],
        engines=["x86"],
        rank="none",
        min_top1_agreement=0.0,
    )
    export_mobile(
        model.eval(),
        torch.randn(1, 1, 32, 32),
        config,
        validation_data=image_batches(1),
        progress=lambda *a: seen.append(a),
    )
    assert seen == [(1, 2, "model_fp32.ptl"), (2, 2, "model_int8-dynamic_x86.ptl")]


def test_filtered_stderr_drops_matching_lines_written_by_any_code(capfd):
    import os

    from pqv_lightning.settings import filtered_stderr

    with filtered_stderr(["[cpuinfo_utils.cpp:"]):
        os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n")  # as C++ writes it
        os.write(2, b"a line of the user's\n")
    os.write(2, b"[cpuinfo_utils.cpp:71] after the block\n")
    assert capfd.readouterr().err == "a line of the user's\n[cpuinfo_utils.cpp:71] after the block\n"


@pytest.mark.slow  # fast tier <= 5 min on 2 cores (issue 29)
def test_executorch_thread_pool_is_sized_without_its_cpuinfo_lines():
    import importlib.util
    import subprocess
    import sys

    import pytest

    if importlib.util.find_spec("executorch") is None:
        pytest.skip("extra not installed: pip install 'pqv-lightning[executorch]'")
    code = (
        "import sys\nfrom pqv_lightning.settings import executorch_threads\n"
        "with executorch_threads(1):\n    print('inside', file=sys.stderr, flush=True)\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "inside" in err and "cpuinfo_utils" not in err and "is an Enum subclass" not in err, err
