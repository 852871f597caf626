"""Least-squares reconstruction right after one-shot pruning, before any fine-tuning.

Prunes the bundled Fashion-MNIST ViT once (``prune_once``, L2 importance, uniform channel ratio,
head dims pruned) and measures test accuracy: without
reconstruction, with ``reconstruct_layers="residual"`` (each block's ``attn.proj`` and
``mlp.fc2``) and with ``"all"`` (``qkv``, ``proj``, ``fc1``, ``fc2`` of every block, then the
head), calibrated on ``--samples`` training images drawn with each of ``--seeds``; test accuracy on
``--test-images`` test images (all 10,000 by default). Writes
``benchmarks/results/reconstruction_probe.{json,md}`` (rows cached, so it resumes).

    python benchmarks/reconstruction_probe.py --seeds 0 1 2
    python benchmarks/reconstruction_probe.py --ratios 0.25 --samples 1024 --layers all
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
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
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="draws of the calibration images")
    ap.add_argument("--test-images", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    cache_file = OUT / "reconstruction_probe.json"
    cache = json.loads(cache_file.read_text())["rows"] if cache_file.is_file() else {}
    original, _ = load_vit_checkpoint(default_checkpoint())
    host = host_description()["cpu"]
    data: dict[int, tuple[FashionMNISTDataModule, list[torch.Tensor]]] = {}
    with torch_threads(args.threads):
        for seed, ratio, layers in itertools.product(args.seeds, args.ratios, args.layers):
            samples = args.samples if layers != "none" else 0
            key = f"{ratio:g} {layers} {samples} seed {seed if samples else 0} test {args.test_images}"
            if key in cache:
                continue
            if seed not in data:  # one data module and calibration draw per seed, shared by its rows
                dm = FashionMNISTDataModule(
                    batch_size=128, train_subset=max(4096, args.samples), test_subset=args.test_images, seed=seed
                )
                dm.setup("fit")
                torch.manual_seed(seed)
                data[seed] = dm, list(torch.cat([x for x, _ in dm.train_dataloader()])[: args.samples].split(128))
            dm, calibration = data[seed]
            unpruned_key = f"unpruned test {args.test_images}"
            if unpruned_key not in cache:
                cache[unpruned_key] = {"test_acc": evaluate(original, dm), "host": host}
            model = copy.deepcopy(original)
            t0 = time.perf_counter()
            config = PruningConfig(
                importance="l2",
                pruning_ratio=ratio,
                reconstruct=layers != "none",
                reconstruct_layers="all" if layers == "none" else layers,
            )
            event = prune_once(model, config, calibration=calibration if samples else None)
            cache[key] = {
                "ratio": ratio,
                "layers": layers,
                "samples": samples,
                "seed": seed,
                "test_images": args.test_images,
                "test_acc": evaluate(model, dm),
                "seconds": time.perf_counter() - t0,
                "error_before": event.reconstruction_error_before,
                "error_after": event.reconstruction_error_after,
                "host": host,
                "threads": args.threads,
                "torch": torch.__version__,
            }
            atomic_write_text(cache_file, json.dumps({"rows": cache}, indent=1))
            print(key, f"{100 * cache[key]['test_acc']:.2f} %", flush=True)
    report = _report(cache, args.test_images, host, args.threads)
    atomic_write_text(OUT / "reconstruction_probe.md", report)
    print(report)


def _report(cache: dict, test_images: int, host: str, threads: int) -> str:
    se = 100 * math.sqrt(0.9 * 0.1 / test_images)
    unpruned = cache[f"unpruned test {test_images}"]["test_acc"]
    lines = [
        f"`python benchmarks/reconstruction_probe.py --seeds 0 1 2` — {host}, {threads} thread(s), torch "
        f"{torch.__version__}; one-shot L2 pruning, no fine-tuning; {test_images:,} test images (standard error "
        f"near 90 %: {se:.2f} pt); ± is the std over draws of the calibration images. Unpruned: "
        f"{100 * unpruned:.2f} %.",
        "",
        "| channels pruned | refitted layers | calibration images | draws | test acc | per draw | mean relative "
        "layer error before → after | time (prune, fit, test) |",
        "|---|---|---:|---:|---:|---|---|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in cache.values():
        if row.get("test_images") == test_images and "ratio" in row:
            groups.setdefault(
                (row["ratio"], ["none", "residual", "all"].index(row["layers"]), row["samples"]), []
            ).append(row)
    for (ratio, _, samples), rows in sorted(groups.items()):
        accs = [100 * r["test_acc"] for r in rows]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        first = rows[0]
        err = (
            "–"
            if first["error_after"] is None
            else f"{statistics.fmean(r['error_before'] for r in rows):.3f} → "
            f"{statistics.fmean(r['error_after'] for r in rows):.3f}"
        )
        lines.append(
            f"| {100 * ratio:g} % | {first['layers']} | {samples} | {len(rows)} | "
            f"{statistics.fmean(accs):.2f}{spread} % | {', '.join(f'{a:.2f}' for a in accs)} | {err} | "
            f"{statistics.fmean(r['seconds'] for r in rows):.0f} s |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
