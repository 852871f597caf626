"""What a teacher and the group-sparsity regularizer cost: step time of fine-tuning the bundled
Fashion-MNIST ViT with KnowledgeDistillation (fp32 / bf16 / int8-dynamic teacher), and with
StructuredPruning's group-lasso regularization, against the same run without either; the teacher's
size in memory, and how well each cheaper teacher agrees with the fp32 one.

    .venv/bin/python benchmarks/distillation_overhead.py [--steps 24] [--batch-size 128] [--threads 2]

Every configuration fine-tunes the same checkpoint on the same batches in this process, one after
the other; the first ``--warmup`` steps of each are not timed. Writes
``benchmarks/results/distillation_overhead.md`` (with the CPU model).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from pqv_lightning import KnowledgeDistillation, StructuredPruning
from pqv_lightning.classifier import ImageClassifier
from pqv_lightning.data import FashionMNISTDataModule
from pqv_lightning.distillation import frozen_teacher, teacher_logits
from pqv_lightning.export.host import host_description, host_label
from pqv_lightning.models import bundled_checkpoint
from pqv_lightning.settings import torch_threads


class StepTimer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times, self._t0 = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(1000 * (time.perf_counter() - self._t0))


def _bytes(module: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return len(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--agreement-images", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/results/distillation_overhead.md")
    args = ap.parse_args()
    ckpt = str(bundled_checkpoint())
    rows = []
    with torch_threads(args.threads):
        for precision in (None, "fp32", "bf16", "int8-dynamic", "regularization"):
            pl.seed_everything(0, verbose=False)
            dm = FashionMNISTDataModule(batch_size=args.batch_size, train_subset=args.steps * args.batch_size)
            timer = StepTimer(args.warmup)
            if precision == "regularization":  # group lasso every step; its one event after the last timed step
                callbacks = [
                    timer,
                    StructuredPruning(
                        importance="l2",
                        pruning_ratio=0.25,
                        iterative_steps=1,
                        accumulate_batches=1,
                        interval="step",
                        start=args.steps - 1,
                        regularization="l2",
                        reg_strength=1e-3,
                    ),
                ]
            else:
                callbacks = [timer] + (
                    [KnowledgeDistillation(alpha=0.5, tau=2.0, teacher_precision=precision)] if precision else []
                )
            trainer = pl.Trainer(
                accelerator="cpu",
                max_epochs=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
                callbacks=callbacks,
            )
            trainer.fit(ImageClassifier(checkpoint=ckpt, lr=2e-4), datamodule=dm)
            t = sorted(timer.times)
            label = {
                None: "none (no distillation)",
                "regularization": "no teacher; group-lasso regularization (StructuredPruning regularization='l2')",
            }.get(precision, precision)
            rows.append(
                {
                    "teacher": label,
                    "median": statistics.median(t),
                    "p90": t[int(0.9 * (len(t) - 1))],
                    "steps": len(t),
                    "precision": precision,
                    "teacher_mb": _bytes(callbacks[1].teacher) / 2**20
                    if precision in ("fp32", "bf16", "int8-dynamic")
                    else None,
                }
            )
            print(rows[-1], flush=True)
        # agreement of each cheaper teacher with the fp32 teacher, and each teacher's accuracy
        net = ImageClassifier(checkpoint=ckpt).model
        dm = FashionMNISTDataModule(batch_size=500, test_subset=args.agreement_images)
        dm.setup("test")
        xs, ys = zip(*dm.test_dataloader())
        x, y = torch.cat(xs), torch.cat(ys)
        ref = teacher_logits(frozen_teacher(net), x).argmax(-1)
        for row in rows[1:]:
            p = row["precision"]
            if p == "regularization":
                continue
            pred = teacher_logits(frozen_teacher(net, p), x, p).argmax(-1)
            row["agreement"] = float((pred == ref).float().mean())
            row["accuracy"] = float((pred == y).float().mean())
    base = rows[0]["median"]
    host = host_description()
    lines = [
        f"`python benchmarks/distillation_overhead.py --steps {args.steps} --warmup {args.warmup} --batch-size "
        f"{args.batch_size} --threads {args.threads} --agreement-images {args.agreement_images}` — "
        f"{host_label(host)} ({', '.join(host['isa'])}), {args.threads} threads, "
        f"torch {host['torch']}; the bundled Fashion-MNIST ViT (5.36 M params), batch {args.batch_size}, "
        f"{args.steps - args.warmup} timed steps per row after {args.warmup} warm-up steps (the regularization "
        f"row's one pruning event runs after its last step, outside the timing); agreement and "
        f"accuracy on the first {args.agreement_images} test images",
        "",
        "| teacher | step median ms | p90 ms | x no distillation | teacher in memory | top-1 agreement with "
        "fp32 teacher | teacher accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mb = "-" if r["teacher_mb"] is None else f"{r['teacher_mb']:.1f} MB"
        agree = f"{100 * r['agreement']:.2f} %" if "agreement" in r else "-"
        acc = f"{100 * r['accuracy']:.2f} %" if "accuracy" in r else "-"
        lines.append(
            f"| {r['teacher']} | {r['median']:.0f} | {r['p90']:.0f} | {r['median'] / base:.2f}x | {mb} | "
            f"{agree} | {acc} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
