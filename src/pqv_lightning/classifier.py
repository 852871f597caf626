"""A plain Lightning image classifier for the examples, the demo and ``pqv fit``: a timm model (or a
bundled checkpoint) with AdamW, warm-up and a cosine schedule. Lightning glue: the library
(:mod:`pqv_lightning.models` included) never imports Lightning."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .models import create_vit, load_vit_checkpoint

__all__ = ["ImageClassifier"]


class ImageClassifier(pl.LightningModule):
    """A timm ViT classifier: ``self.model`` is the network, AdamW + warm-up/cosine schedule.

    Args:
        model_name: a timm model name or one of :data:`LOCAL_MODELS`.
        num_classes: output classes (passed to the builder).
        checkpoint: optional ``vit_tiny_fmnist.pt``-format file to start from.
        pretrained: timm models: load hub weights (needs network access); ``vit_tiny_fmnist``: the
            weights bundled with the package.
        lr, weight_decay, label_smoothing, warmup_steps: optimisation settings.
        model_kwargs: extra builder arguments (e.g. ``img_size``, ``drop_path_rate``).
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_fmnist",
        num_classes: int = 10,
        checkpoint: str | None = None,
        pretrained: bool = False,
        lr: float = 2e-4,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.1,
        warmup_steps: int = 0,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: nn.Module
        if checkpoint:
            self.model, _ = load_vit_checkpoint(checkpoint)
            self.model.train()
        else:
            self.model = create_vit(model_name, pretrained=pretrained, num_classes=num_classes, **(model_kwargs or {}))
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "dist_token")) else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warmup = self.hparams.warmup_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
