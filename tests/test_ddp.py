import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_prune.py"


def _launch(tmp_path, importance, mode):
    out = tmp_path / f"{importance}-{mode}"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), importance, mode], capture_output=True, text=True, timeout=300
    )
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
def test_ddp_ranks_stay_identical_through_pruning_then_quantization_aware_training(tmp_path):
    (r0, r1), events = _run(tmp_path, "taylor", "qat")
    assert len(events) == 2 and len(r0) == len(r1) == 24
    for a, b in zip(r0, r1):
        assert a["digest"] == b["digest"], f"ranks diverged at step {a['step']}"
        assert a["fake_quantized"] == b["fake_quantized"] and a["optimizer_exact"] and a["ddp_wraps_live"]
    # events after steps 3 and 7 (of 12); fake quantization from the next optimizer step on, on both ranks
    assert [r["fake_quantized"] for r in r0] == [0] * 14 + [8] * 10
    # and the network trained on: the weights it started QAT with, then after each of the 5 optimizer steps
    assert len({r["digest"] for r in r0 if r["fake_quantized"]}) == 6


@pytest.mark.ddp
def test_ddp_a_latency_budget_is_measured_once_on_rank_0_and_both_ranks_prune_to_it(tmp_path):
    (r0, r1), events = _run(tmp_path, "taylor", "latency")
    out = tmp_path / "taylor-latency"
    ratios = [json.loads((out / f"ratio{r}.json").read_text()) for r in (0, 1)]
    assert ratios[0] == ratios[1] and 0 < ratios[0] < 0.9
    assert len((out / "timer_calls").read_text().split()) >= 2  # the smallest model, then the search
    assert len(events) == 2 and events[-1] < events[0]
    for a, b in zip(r0, r1):
        assert a["digest"] == b["digest"], f"ranks diverged at step {a['step']}"


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
def test_ddp_with_distillation_regularization_reconstruction_bf16_and_accumulation_keeps_ranks_identical(tmp_path):
    (r0, r1), events = _run(tmp_path, "taylor", "kd")
    assert len(events) == 2 and len(r0) == len(r1) == 24
    for a, b in zip(r0, r1):
        assert a["digest"] == b["digest"], f"students diverged at step {a['step']}"
        assert a["teacher"] == b["teacher"], f"teachers differ at step {a['step']}"
    assert len({rec["teacher"] for rec in r0}) == 1  # the teacher never changes, through both events
    assert len({rec["n_params"] for rec in r0}) == 3  # while the student is pruned twice
    fits = json.loads((tmp_path / "taylor-kd" / "reconstruction.json").read_text())
    assert len(fits) == 2 and all(after < before for before, after in fits)  # reconstructed, identically on both ranks


@pytest.mark.ddp
def test_ddp_resume_from_a_checkpoint_between_events_equals_the_uninterrupted_run(tmp_path):
    (a0, a1), events_a = _run(tmp_path, "taylor", "resume-a")  # uninterrupted; saves after epoch 0 (step 16)
    assert (tmp_path / "ckpt" / "epoch=0-step=16.ckpt").is_file()
    (b0, b1), events_b = _run(tmp_path, "taylor", "resume-b")  # a fresh, unpruned module resumed from it
    assert events_a == events_b == [61114, 28458]  # the first event restored from the checkpoint, the second run
    assert len(a0) == 32 and len(b0) == len(b1) == 16  # epoch 1: steps 17..32
    assert [r["n_params"] for r in b0] == [61114] * 2 + [28458] * 14  # resumed pruned, pruned again after step 18
    for a, b in zip(b0, b1):
        assert a["digest"] == b["digest"] and a["optimizer_exact"] and b["optimizer_exact"] and b["ddp_wraps_live"]
    assert [r["digest"] for r in b0] == [r["digest"] for r in a0[16:]]  # every step equals the uninterrupted run


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("family", ["resnet", "convnext", "swin", "eva02", "torchvision_vit", "hf_vit"])
def test_every_family_prunes_identically_on_both_ddp_ranks_and_reloads_from_its_checkpoint(tmp_path, family):
    """DDP with StructuredPruning + KnowledgeDistillation beyond timm's ViT: both ranks hold the same weights
    after every step through two events, and the checkpoint saved when fit ends loads into a fresh module
    (``load_pruned_checkpoint``) with the same outputs."""
    import torch

    from pqv_lightning import load_pruned_checkpoint
    from pqv_lightning.apps.coverage import FAMILIES
    from pqv_lightning.outputs import main_tensor

    if FAMILIES[family].source == "hf":
        pytest.importorskip("transformers")
    script = Path(__file__).parent / "scripts" / "ddp_family.py"
    proc = subprocess.run(
        [sys.executable, str(script), family, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    events = json.loads((tmp_path / "events.json").read_text())
    assert len(r0) == len(r1) == 6 and len(events) == 2 and events[1] < events[0]
    assert [a["digest"] for a in r0] == [b["digest"] for b in r1]
    assert len({a["n_params"] for a in r0}) == 3  # unpruned, after event 1, after event 2
    sys.path.insert(0, str(script.parent))
    try:
        from ddp_family import Classifier
    finally:
        sys.path.remove(str(script.parent))
    trained = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    module = load_pruned_checkpoint(Classifier, tmp_path / "last.ckpt", map_location="cpu").eval()
    assert sum(p.numel() for p in module.parameters()) == events[1]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in trained.items())
    x = torch.randn(2, *FAMILIES[family].shape)
    assert main_tensor(module.model(x)).shape == (2, 10)
