"""Run by tests/test_ddp.py: a 2-process CPU (gloo) DDP fit of one ``pqv coverage`` family (argv[1]) with
StructuredPruning (Taylor, 2 events) and KnowledgeDistillation, saving a checkpoint when it ends.

Each rank writes, after every optimizer step, a digest of its network's weights to OUT/rank{r}.json;
rank 0 writes the events to OUT/events.json. The checkpoint is OUT/last.ckpt.
"""

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pqv_lightning import KnowledgeDistillation, StructuredPruning
from pqv_lightning.apps.coverage import FAMILIES
from pqv_lightning.outputs import main_tensor


class Classifier(pl.LightningModule):
    def __init__(self, family: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = FAMILIES[family].build().train()

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(main_tensor(self.model(images)), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Probe(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.records = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        self.records.append(
            {
                "step": trainer.global_step,
                "n_params": int(flat.numel()),
                "digest": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
            }
        )

    def on_train_end(self, trainer, pl_module):
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.records))


def main(family: str, out: str) -> None:
    out_dir = Path(out)
    pl.seed_everything(0)
    gen = torch.Generator().manual_seed(0)
    shape = FAMILIES[family].shape
    data = TensorDataset(torch.randn(64, *shape, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    pruning = StructuredPruning(
        importance="taylor",
        pruning_ratio=0.25,
        iterative_steps=2,
        accumulate_batches=1,
        interval="step",
        start=1,
        frequency=2,
        example_input_shape=list(shape),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        max_steps=6,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, KnowledgeDistillation(alpha=0.5, tau=2.0), Probe(out_dir)],
    )
    trainer.fit(Classifier(family), DataLoader(data, batch_size=4, shuffle=True))
    trainer.save_checkpoint(out_dir / "last.ckpt")
    if trainer.global_rank == 0:
        (out_dir / "events.json").write_text(json.dumps([e.params_after for e in pruning.events]))


if __name__ == "__main__":
    main(*sys.argv[1:])
