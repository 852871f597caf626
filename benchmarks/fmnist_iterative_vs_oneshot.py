"""Iterative pruning during fine-tuning vs one-shot pruning + fine-tuning, same epoch budget.

Fine-tunes the pretrained Fashion-MNIST ViT (shared/models/vit_tiny_fmnist.pt) on the CPU with
Taylor importance to 25 % and 50 % channels, twice each:

* iterative: ``--events`` pruning events spread over the first 60 % of the optimizer steps;
* one-shot:  a single event after the first statistics window, then fine-tuning for the rest.

Both see exactly the same images, steps, learning-rate schedule and seed. Writes a Markdown table
and JSON to benchmarks/results/ and prints the table.

    python benchmarks/fmnist_iterative_vs_oneshot.py                 # 2 epochs x 16,384 images
    python benchmarks/fmnist_iterative_vs_oneshot.py --train-subset 55000 --epochs 2   # full budget
"""

import argparse
import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from pqv_lightning.recipes import default_checkpoint, finetune_with_pruning, format_table

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--importance", default="taylor")
    ap.add_argument("--events", type=int, default=4)
    ap.add_argument("--accumulate", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="fmnist_iterative_vs_oneshot")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = args.checkpoint or default_checkpoint()
    budget = dict(epochs=args.epochs, train_subset=args.train_subset, accumulate_batches=args.accumulate,
                  importance=args.importance)
    rows = [finetune_with_pruning(ckpt, label="pretrained (no fine-tune)", pruning_ratio=0.0, epochs=0)]
    for ratio in args.ratios:
        rows.append(finetune_with_pruning(ckpt, label=f"one-shot {ratio:g}", pruning_ratio=ratio, iterative_steps=1,
                                          **budget))
        rows.append(finetune_with_pruning(ckpt, label=f"iterative {ratio:g}", pruning_ratio=ratio,
                                          iterative_steps=args.events, **budget))
        print(format_table(rows), flush=True)
    OUT.mkdir(exist_ok=True)
    meta = {"command": "python benchmarks/fmnist_iterative_vs_oneshot.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("checkpoint", "ratios", "name")),
        "host": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__}
    (OUT / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    (OUT / f"{args.name}.md").write_text(f"`{meta['command']}` (torch {meta['torch']}, {args.threads} threads)\n\n"
                                         + format_table(rows) + "\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
