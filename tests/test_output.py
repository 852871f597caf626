"""What a user sees: the apps drop Lightning's banner lines around their own Trainers (and only there),
and keep our lines and every other warning."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from pqv_lightning.apps.recipes import quiet_lightning
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
            warnings.warn("the user's own warning", UserWarning)
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
