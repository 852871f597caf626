"""Iterative pruning during fine-tuning vs one-shot pruning + fine-tuning, same epoch budget.

Fine-tunes the pretrained Fashion-MNIST ViT (shared/models/vit_tiny_fmnist.pt) on the CPU with
Taylor importance to 25 % and 50 % channels, twice each:

* iterative: ``--events`` pruning events spread evenly over the first ``--spans`` fraction(s) of
  the optimizer steps (one row per span);
* one-shot:  a single event after the first statistics window, then fine-tuning for the rest.

Both see exactly the same images, steps, learning-rate schedule and seed. Writes a Markdown table
and JSON to benchmarks/results/ and prints the table. Finished rows are kept in the JSON and not
recomputed when the script is run again with the same settings (delete the JSON to start over).

    python benchmarks/fmnist_iterative_vs_oneshot.py                 # 2 epochs x 16,384 images
    python benchmarks/fmnist_iterative_vs_oneshot.py --train-subset 55000 --epochs 2   # full budget
"""

import argparse
import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from pqv_lightning.apps.recipes import default_checkpoint, finetune_with_pruning, format_table

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--importance", default="taylor")
    ap.add_argument("--events", type=int, default=4)
    ap.add_argument(
        "--spans",
        type=float,
        nargs="+",
        default=[0.6, 0.25],
        help="fractions of the steps over which the iterative events are spread",
    )
    ap.add_argument(
        "--schedules",
        nargs="+",
        default=["linear"],
        choices=["linear", "cubic"],
        help="growth of the ratio over the iterative events",
    )
    ap.add_argument("--accumulate", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="fmnist_iterative_vs_oneshot")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = args.checkpoint or default_checkpoint()
    budget = dict(
        epochs=args.epochs,
        train_subset=args.train_subset,
        accumulate_batches=args.accumulate,
        importance=args.importance,
    )
    OUT.mkdir(exist_ok=True)
    cache_file = OUT / f"{args.name}.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "ratios", "spans", "schedules", "name")}
    cached = {}
    if cache_file.is_file():
        old = json.loads(cache_file.read_text())
        if old.get("settings") == settings:
            cached = {r["label"]: r for r in old["rows"]}
    rows = []

    def run(label, **kw):
        if label not in cached:
            cached[label] = asdict(finetune_with_pruning(ckpt, label=label, **kw))
            save()
        rows.append(cached[label])
        print(format_table(rows), flush=True)

    def save():
        cache_file.write_text(json.dumps({"settings": settings, "meta": meta, "rows": list(cached.values())}, indent=1))

    shown = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "name")}
    meta = {
        "command": "python benchmarks/fmnist_iterative_vs_oneshot.py "
        + " ".join(
            f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))
            for k, v in shown.items()
        ),
        "host": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    run("pretrained (no fine-tune)", pruning_ratio=0.0, epochs=0)
    for ratio in args.ratios:
        run(f"one-shot {ratio:g}", pruning_ratio=ratio, iterative_steps=1, **budget)
        for schedule in args.schedules:
            for span in args.spans:
                label = f"iterative {ratio:g}, events in first {span:.0%}"
                if schedule != "linear":
                    label += f", {schedule}"
                run(
                    label,
                    pruning_ratio=ratio,
                    iterative_steps=args.events,
                    prune_span=span,
                    ratio_schedule=schedule,
                    **budget,
                )
    save()
    (OUT / f"{args.name}.md").write_text(
        f"`{meta['command']}` (torch {meta['torch']}, {args.threads} threads)\n\n"
        + format_table(rows, show_time=False)
        + "\n"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
