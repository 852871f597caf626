"""The callbacks on a CUDA GPU: mixed precision (GradScaler fp16 and bf16), statistics and MAC counting on
the device, an event mid-fit, resume, and MobileExport of a CUDA-trained module (exports run on CPU copies).

Skipped without a GPU. ``bash scripts/gpu_checks.sh`` runs exactly these (``pytest -m cuda``) on a
GPU machine and writes the log to ``runs/gpu_checks.log``.
"""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from pqv_lightning import MobileExport, StructuredPruning
from pqv_lightning.classifier import ImageClassifier

from conftest import make_trainer, random_loader

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_checks.sh on a GPU host)"),
]


def _trainer(tmp_path, callbacks, precision, **kw):
    return make_trainer(tmp_path, callbacks, accelerator="gpu", devices=1, precision=precision, **kw)


class StopAtStep(pl.Callback):
    """An interrupted run: stops after optimizer step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("importance", ["taylor", "hessian"])
def test_pruning_mid_fit_on_cuda_with_mixed_precision(tmp_path, lit_model, precision, importance):
    pruning = StructuredPruning(
        importance=importance,
        pruning_ratio=0.5,
        iterative_steps=2,
        accumulate_batches=2,
        interval="step",
        start=1,
        frequency=4,
    )
    seen = {}

    class Probe(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            stats = pruning.pruner.stats
            for name in ("out_scores", "in_scores"):
                for value in getattr(stats, name, {}).values():
                    seen.setdefault("stats_devices", set()).add(value.device.type)
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            seen["scaler"] = scaler is not None and scaler.is_enabled()

    trainer = _trainer(tmp_path, [pruning, Probe()], precision, max_epochs=2)
    trainer.fit(lit_model, random_loader(128, 16))  # 16 optimizer steps; events after steps 3 and 7
    assert [e.index for e in pruning.events] == [1, 2]
    assert all(e.statistics_steps == 2 for e in pruning.events)
    assert seen["scaler"] == (precision == "16-mixed")  # fp16 runs through a real GradScaler
    assert seen.get("stats_devices") == {"cuda"}  # statistics live on the GPU
    assert all(p.device.type == "cuda" and torch.isfinite(p).all() for p in lit_model.parameters())
    assert lit_model.model.patch_embed.proj.out_channels == 32
    first, last = pruning.events
    assert first.macs_before > first.macs_after > last.macs_after > 0  # MACs counted on the device's model
    live = {id(p) for p in lit_model.parameters()}
    assert live == {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}


def test_resume_on_cuda_matches_an_uninterrupted_run(tmp_path):
    def run(name, ckpt_path=None, extra=()):
        pl.seed_everything(0, verbose=False)
        model = ImageClassifier("vit_test_tiny", lr=1e-3)
        # windows of 4 steps opening after steps 6 and 14 straddle the epoch boundaries (8 steps / epoch)
        pruning = StructuredPruning(
            importance="taylor",
            pruning_ratio=0.5,
            iterative_steps=2,
            accumulate_batches=4,
            interval="step",
            start=6,
            frequency=8,
        )
        trainer = _trainer(
            tmp_path / name, [pruning, *extra], "32-true", max_epochs=3, enable_checkpointing=bool(extra)
        )
        trainer.fit(model, random_loader(128, 16), ckpt_path=ckpt_path)
        return model, pruning

    reference, _ = run("ref")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    run("a", extra=[saver, StopAtStep(8)])  # interrupted after epoch 0, inside the first statistics window
    resumed, pruning = run("b", ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=8.ckpt"))
    assert [e.index for e in pruning.pruner.events] == [1, 2] and [e.index for e in pruning.events] == [1, 2]
    ref, got = reference.state_dict(), resumed.state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-4)  # CUDA kernels need not be bit-exact


def test_mobile_export_of_a_cuda_trained_module(tmp_path, lit_model):
    export = MobileExport(
        precisions=["fp32", "int8-dynamic"],
        formats=["ptl"],
        output_dir=str(tmp_path / "out"),
        repeats=2,
        warmup=1,
        measure_memory=False,
        rank="in-process",
        min_top1_agreement=0.5,
    )
    pruning = StructuredPruning(importance="l2", pruning_ratio=0.5, iterative_steps=1, accumulate_batches=1)
    trainer = _trainer(tmp_path, [pruning, export], "16-mixed", max_epochs=1)
    trainer.fit(lit_model, random_loader(64, 16), random_loader(32, 16))
    assert [a["status"] for a in export.manifest["artifacts"]] == ["ok", "ok"]
    assert next(lit_model.parameters()).device.type == "cuda"  # the trained module stays where it was
    lite = torch.jit.mobile._load_for_lite_interpreter(str(tmp_path / "out" / "model_fp32.ptl"))
    x = torch.randn(2, 1, 32, 32)
    lit_model.eval()
    torch.testing.assert_close(lite(x), lit_model(x.cuda()).float().cpu(), rtol=1e-4, atol=1e-4)
