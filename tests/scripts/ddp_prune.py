"""Run by tests/test_ddp.py: 2-process CPU (gloo) DDP fit with StructuredPruning (mode ``kd``: also
KnowledgeDistillation under bf16-mixed, recording a digest of the teacher too, group-sparsity
regularization with threshold mode and least-squares reconstruction; modes ``resume-a`` / ``resume-b``: an uninterrupted run that saves
a checkpoint at the end of its first epoch, and a second run that resumes from it with
``fit(ckpt_path=...)``; the second pruning event happens after the resume point; mode ``qat``:
QuantizationAwareTraining for int4 weights from right after the last event, activations 2 steps later;
mode ``latency``: ``target_latency`` instead of a ratio, timed by a synthetic timer (latency from the
file's size) that only global rank 0 may call: the ratio it finds must reach rank 1 by broadcast).

Each rank writes, after every optimizer step, a digest of its model's weights to
OUT/rank{r}.json, plus the parameter shapes and whether the optimizer holds exactly the live params.
"""

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from pqv_lightning import KnowledgeDistillation, QuantizationAwareTraining, StructuredPruning
from pqv_lightning.classifier import ImageClassifier
from pqv_lightning.export.qat import fake_quantized_layers


def _digest(module) -> str:
    flat = torch.cat([p.detach().float().reshape(-1) for p in module.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


class Probe(pl.Callback):
    def __init__(self, out: Path, kd=None):
        self.out, self.records, self.kd = out, [], kd

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        live = {id(p) for p in pl_module.parameters()}
        held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        self.records.append(
            {
                "step": trainer.global_step,
                "digest": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
                "n_params": int(flat.numel()),
                "optimizer_exact": live == held,
                "ddp_wraps_live": sorted(id(p) for p in trainer.strategy.model.parameters()) == sorted(live),
                "teacher": _digest(self.kd.teacher) if self.kd is not None else None,
                "fake_quantized": len(fake_quantized_layers(pl_module.model)),
            }
        )

    def on_train_end(self, trainer, pl_module):
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.records))


def _synthetic_timer(out_dir: Path) -> None:
    """Files as state dicts, timed by their size; a rank other than 0 that measures fails the run."""
    import os

    import pqv_lightning.latency_budget as latency

    def write(model, example, budget, folder):
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), folder / "model.pt")
        return folder / "model.pt"

    def timer(candidates, shape, **kw):
        assert os.environ.get("LOCAL_RANK", "0") == "0", "only global rank 0 measures the latency budget"
        with (out_dir / "timer_calls").open("a") as f:
            f.write("1\n")
        ms = {c.label: 0.1 + os.path.getsize(c.path) / 1e5 for c in candidates}
        return {label: {"median_ms": t, "round_medians_ms": [t], "contention_max": 0.0} for label, t in ms.items()}

    latency._write, latency.round_robin = write, timer


def main(out: str, importance: str, rewrap: str = "rewrap") -> None:
    out_dir = Path(out)
    if rewrap == "latency":
        _synthetic_timer(out_dir)
    if rewrap == "no-rewrap":  # negative control: keep the stale DDP wrapper after pruning
        StructuredPruning._rewrap_ddp = staticmethod(lambda trainer: None)
    pl.seed_everything(0)
    gen = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(256, 1, 32, 32, generator=gen), torch.randint(0, 10, (256,), generator=gen))
    model = ImageClassifier("vit_test_tiny", lr=1e-3)
    # mode "kd" also adds group-sparsity regularization and threshold mode
    # and least-squares reconstruction after each event (each rank fits on its own batches; sums averaged)
    extra = (
        dict(
            regularization="l2",
            reg_strength=1e-3,
            reg_strength_end=1e-2,
            threshold=0.05,
            reconstruct=True,
            reconstruct_samples=16,
        )
        if rewrap == "kd"
        else {}
    )
    resume = rewrap in ("resume-a", "resume-b")
    ckpt_dir = out_dir.parent / "ckpt"
    budget = dict(target_latency=0.5, widths_for="onnx") if rewrap == "latency" else dict(pruning_ratio=0.5)
    pruning = StructuredPruning(
        importance=importance,
        **budget,
        iterative_steps=2,
        accumulate_batches=2,
        interval="step",
        start=1,
        frequency=16 if resume else 4,
        round_to=32 if rewrap == "qat" else None,
        **extra,
    )
    kd = KnowledgeDistillation(alpha=0.5, tau=2.0, teacher_precision="bf16") if rewrap == "kd" else None
    qat = [QuantizationAwareTraining(activation_delay_steps=2)] if rewrap == "qat" else []
    callbacks = [pruning] + ([kd] if kd else []) + qat + [Probe(out_dir, kd)]
    if rewrap == "resume-a":  # 16 optimizer steps per epoch: a checkpoint after step 16, between the events
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1))
    # resume modes: 2 epochs, no accumulation (Lightning 2.6 itself does not resume an epoch-end checkpoint
    # exactly under max_steps: it runs one extra batch first)
    length = dict(max_epochs=2) if resume else dict(max_steps=12, accumulate_grad_batches=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=rewrap == "resume-a",
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        precision="bf16-mixed" if kd else "32-true",
        **length,
    )
    ckpt_path = str(next(ckpt_dir.glob("epoch=0-*.ckpt"))) if rewrap == "resume-b" else None
    trainer.fit(model, DataLoader(ds, batch_size=8, shuffle=True), ckpt_path=ckpt_path)
    if trainer.global_rank == 0:
        (out_dir / "events.json").write_text(json.dumps([e.params_after for e in pruning.events]))
        (out_dir / "reconstruction.json").write_text(
            json.dumps([[e.reconstruction_error_before, e.reconstruction_error_after] for e in pruning.events])
        )
    (out_dir / f"ratio{trainer.global_rank}.json").write_text(json.dumps(pruning.config.pruning_ratio))


if __name__ == "__main__":
    main(*sys.argv[1:])
