"""Run by tests/test_ddp.py: 2-process CPU (gloo) DDP fit with StructuredPruning (mode ``kd``: also
KnowledgeDistillation under bf16-mixed, recording a digest of the teacher too, and group-sparsity
regularization with threshold mode).

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

from pqv_lightning import KnowledgeDistillation, StructuredPruning
from pqv_lightning.models import ImageClassifier


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
        self.records.append({
            "step": trainer.global_step,
            "digest": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
            "n_params": int(flat.numel()),
            "optimizer_exact": live == held,
            "ddp_wraps_live": sorted(id(p) for p in trainer.strategy.model.parameters()) == sorted(live),
            "teacher": _digest(self.kd.teacher) if self.kd is not None else None,
        })

    def on_train_end(self, trainer, pl_module):
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.records))


def main(out: str, importance: str, rewrap: str = "rewrap") -> None:
    out_dir = Path(out)
    if rewrap == "no-rewrap":  # negative control: keep the stale DDP wrapper after pruning
        StructuredPruning._rewrap_ddp = staticmethod(lambda trainer: None)
    pl.seed_everything(0)
    gen = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(256, 1, 32, 32, generator=gen), torch.randint(0, 10, (256,), generator=gen))
    model = ImageClassifier("vit_test_tiny", lr=1e-3)
    # mode "kd" also adds group-sparsity regularization and threshold mode
    extra = dict(regularization="l2", reg_strength=1e-3, reg_strength_end=1e-2, prune_threshold=0.05) if rewrap == "kd" else {}
    pruning = StructuredPruning(importance=importance, pruning_ratio=0.5, iterative_steps=2,
                                accumulate_batches=2, interval="step", start=1, frequency=4, **extra)
    kd = KnowledgeDistillation(alpha=0.5, tau=2.0, teacher_precision="bf16") if rewrap == "kd" else None
    callbacks = [pruning] + ([kd] if kd else []) + [Probe(out_dir, kd)]
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=12, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        accumulate_grad_batches=2, precision="bf16-mixed" if kd else "32-true",
    )
    trainer.fit(model, DataLoader(ds, batch_size=8, shuffle=True))
    if trainer.global_rank == 0:
        (out_dir / "events.json").write_text(json.dumps([e.params_after for e in pruning.events]))


if __name__ == "__main__":
    main(*sys.argv[1:])
