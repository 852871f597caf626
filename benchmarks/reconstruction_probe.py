"""Least-squares reconstruction right after one-shot pruning, before any fine-tuning.

Prunes the bundled Fashion-MNIST ViT once (``prune_once``, L2 importance, uniform channel ratio,
head dims pruned) and measures test accuracy on the first 2,000 test images: without
reconstruction, with ``reconstruct_layers="residual"`` (each block's ``attn.proj`` and
``mlp.fc2``) and with ``"all"`` (``qkv``, ``proj``, ``fc1``, ``fc2`` of every block, then the
head), calibrated on ``--samples`` training images. Writes
``benchmarks/results/reconstruction_probe.{json,md}`` (rows cached, so it resumes).

    python benchmarks/reconstruction_probe.py
    python benchmarks/reconstruction_probe.py --ratios 0.25 --samples 1024 --layers all
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from pqv_lightning.apps.recipes import default_checkpoint, evaluate
from pqv_lightning.data import FashionMNISTDataModule
from pqv_lightning.export.host import host_description
from pqv_lightning.fileio import atomic_write_text
from pqv_lightning.models import load_vit_checkpoint
from pqv_lightning.pruning import PruningConfig, prune_once
from pqv_lightning.settings import torch_threads

OUT = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--layers", nargs="+", default=["none", "residual", "all"], choices=["none", "residual", "all"])
    ap.add_argument("--samples", type=int, default=256, help="calibration training images")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    cache_file = OUT / "reconstruction_probe.json"
    cache = json.loads(cache_file.read_text())["rows"] if cache_file.is_file() else {}
    dm = FashionMNISTDataModule(batch_size=128, train_subset=4096, test_subset=2000, seed=0)
    dm.setup("fit")
    dm.setup("test")
    calibration = list(torch.cat([x for x, _ in dm.train_dataloader()])[: args.samples].split(128))
    original, _ = load_vit_checkpoint(default_checkpoint())
    host = host_description()["cpu"]
    with torch_threads(args.threads):
        key = "unpruned"
        if key not in cache:
            cache[key] = {"test_acc": evaluate(original, dm), "host": host}
        for ratio in args.ratios:
            for layers in args.layers:
                key = f"{ratio:g} {layers} {args.samples if layers != 'none' else 0}"
                if key in cache:
                    continue
                model = copy.deepcopy(original)
                t0 = time.perf_counter()
                event = prune_once(model, PruningConfig(importance="l2", pruning_ratio=ratio,
                                                        reconstruct=layers != "none",
                                                        reconstruct_layers="all" if layers == "none" else layers),
                                   calibration=calibration if layers != "none" else None)
                cache[key] = {"ratio": ratio, "layers": layers, "samples": args.samples if layers != "none" else 0,
                              "test_acc": evaluate(model, dm), "seconds": time.perf_counter() - t0,
                              "error_before": event.reconstruction_error_before,
                              "error_after": event.reconstruction_error_after, "host": host,
                              "threads": args.threads, "torch": torch.__version__}
                atomic_write_text(cache_file, json.dumps({"rows": cache}, indent=1))
                print(key, f"{100 * cache[key]['test_acc']:.2f} %", flush=True)
    lines = [f"`python benchmarks/reconstruction_probe.py` — {host}, {args.threads} thread(s), torch "
             f"{torch.__version__}; one-shot L2 pruning, no fine-tuning; first 2,000 test images (standard "
             f"error near 90 %: 0.67 pt). Unpruned: {100 * cache['unpruned']['test_acc']:.2f} %.", "",
             "| channels pruned | refitted layers | calibration images | test acc | mean relative layer error "
             "before → after | prune + fit time |", "|---|---|---:|---:|---|---:|"]
    for key, row in sorted(cache.items()):
        if key == "unpruned":
            continue
        err = ("–" if row["error_after"] is None
               else f"{row['error_before']:.3f} → {row['error_after']:.3f}")
        lines.append(f"| {100 * row['ratio']:g} % | {row['layers']} | {row['samples']} | "
                     f"{100 * row['test_acc']:.2f} % | {err} | {row['seconds']:.0f} s |")
    atomic_write_text(OUT / "reconstruction_probe.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
