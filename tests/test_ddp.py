import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_prune.py"


def _launch(tmp_path, importance, mode):
    out = tmp_path / f"{importance}-{mode}"
    out.mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), importance, mode], capture_output=True, text=True,
                          timeout=300)
    return out, proc


def _run(tmp_path, importance, mode="rewrap"):
    out, proc = _launch(tmp_path, importance, mode)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, json.loads((out / "events.json").read_text())


@pytest.mark.ddp
@pytest.mark.parametrize("importance", ["taylor", "hessian"])
def test_ddp_ranks_stay_identical_through_pruning_events(tmp_path, importance):
    (r0, r1), events = _run(tmp_path, importance)
    assert events == [61114, 28458]
    assert len(r0) == len(r1) == 24  # 12 optimizer steps x 2 micro-batches
    sizes = sorted({rec["n_params"] for rec in r0})
    assert sizes == [28458, 61114, 106058]
    for a, b in zip(r0, r1):
        assert a["digest"] == b["digest"], f"ranks diverged at step {a['step']}"
        assert a["optimizer_exact"] and b["optimizer_exact"]
        assert a["ddp_wraps_live"] and b["ddp_wraps_live"]
    after_last_event = [rec["digest"] for rec in r0 if rec["n_params"] == 28458]
    assert len(set(after_last_event)) > 2  # training went on after the last event


@pytest.mark.ddp
def test_without_rewrapping_ddp_breaks(tmp_path):
    """Negative control: keeping the stale DDP wrapper after an event must not pass silently."""
    out, proc = _launch(tmp_path, "taylor", "no-rewrap")
    if proc.returncode == 0:  # if DDP did not raise, the ranks must have diverged
        r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
        assert any(a["digest"] != b["digest"] for a, b in zip(r0, r1))
    else:
        assert "not used in producing the loss" in proc.stderr


@pytest.mark.ddp
def test_ddp_with_distillation_regularization_bf16_and_accumulation_keeps_ranks_identical(tmp_path):
    (r0, r1), events = _run(tmp_path, "taylor", "kd")
    assert len(events) == 2 and len(r0) == len(r1) == 24
    for a, b in zip(r0, r1):
        assert a["digest"] == b["digest"], f"students diverged at step {a['step']}"
        assert a["teacher"] == b["teacher"], f"teachers differ at step {a['step']}"
    assert len({rec["teacher"] for rec in r0}) == 1  # the teacher never changes, through both events
    assert len({rec["n_params"] for rec in r0}) == 3  # while the student is pruned twice
