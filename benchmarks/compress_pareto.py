"""Accuracy vs measured latency after post-training compression (issue 31's Pareto report).

The bundled Fashion-MNIST ViT is pruned post-training the way ``pqv compress`` does it (L2, one
event, least-squares refit of every Linear on ``--calibration-images`` training images drawn with
each of ``--seeds``) at uniform channel ratios, and evaluated in fp32 on all 10,000 test images.
Each ratio's file (``--format`` at ``--precision``) is timed round-robin against the unpruned
model's file, each in a process of its own (``latency_budget.LatencyProbe``: the same code as the
latency budget). Then the latency budgets ``--budgets`` (fractions of the unpruned file) are
searched with ``ratio_for_latency`` and the MAC budgets ``--macs`` with ``ratio_for_budget``: both
allocate widths uniformly today, so their points land on the uniform curve (the report says so);
a fine-tuned point (``benchmarks/qat.py``'s fp32 rows, the default recipe, 3 seeds where run) is
shown where its widths equal a post-training point's.

Rows are cached in ``benchmarks/results/compress_pareto.json`` (rerun to continue); the report goes
to ``compress_pareto.md`` and the plot to ``compress_pareto.png``.

    python benchmarks/compress_pareto.py
    python benchmarks/compress_pareto.py --format openvino --precision int8-dynamic
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

from pqv_lightning.apps.compress import fmnist_images
from pqv_lightning.apps.recipes import default_checkpoint, evaluate
from pqv_lightning.data import FashionMNISTDataModule
from pqv_lightning.export.host import host_description, host_label
from pqv_lightning.fileio import JsonCache, atomic_write_text
from pqv_lightning.latency_budget import LatencyBudget, LatencyProbe, ratio_for_latency
from pqv_lightning.models import load_vit_checkpoint
from pqv_lightning.pruning import PruningConfig, count_macs, count_params, prune_once, ratio_for_budget
from pqv_lightning.settings import torch_threads

OUT = Path(__file__).parent / "results"
TEST_IMAGES = 10_000


def _accuracy_rows(cache: JsonCache, model, dm, ratios, seeds, images: int, threads: int) -> None:
    example = torch.zeros(1, 1, 32, 32)
    for seed in seeds:
        calibration = None
        for ratio in ratios:
            key = f"acc/{ratio:g}/{seed}"
            if cache.get(key) is not None:
                continue
            if calibration is None:
                x, _ = fmnist_images(dm.data_dir, "train", images, seed)
                calibration = list(x.split(64))
            pruned = copy.deepcopy(model)
            t0 = time.perf_counter()
            with torch_threads(threads):
                prune_once(
                    pruned,
                    PruningConfig(importance="l2", pruning_ratio=ratio, reconstruct=True),
                    calibration=calibration,
                )
                seconds = time.perf_counter() - t0
                accuracy = evaluate(pruned, dm)
            cache.put(
                key,
                {
                    "ratio": ratio,
                    "seed": seed,
                    "accuracy": accuracy,
                    "prune_seconds": seconds,
                    "params": count_params(pruned),
                    "macs": count_macs(pruned, example),
                    "embed_dim": pruned.embed_dim,
                },
            )
            print(f"{key}: {100 * accuracy:.2f} % ({seconds:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.125, 0.25, 0.375, 0.5, 0.625, 0.75])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--format", default="onnx")
    ap.add_argument("--precision", default="int8-dynamic")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.35], help="latency fractions")
    ap.add_argument("--macs", type=float, nargs="+", default=[0.5], help="MAC fractions")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    cache = JsonCache(OUT / "compress_pareto.json")
    host = host_description()
    model, _ = load_vit_checkpoint(default_checkpoint())
    dm = FashionMNISTDataModule(batch_size=256, test_subset=TEST_IMAGES)
    dm.setup("test")
    if cache.get("unpruned") is None:
        with torch_threads(args.threads):
            cache.put(
                "unpruned", {"accuracy": evaluate(model, dm), "macs": count_macs(model, torch.zeros(1, 1, 32, 32))}
            )
    _accuracy_rows(cache, model, dm, args.ratios, args.seeds, args.calibration_images, args.threads)

    budget = LatencyBudget(0.5, format=args.format, precision=args.precision, threads=args.threads, max_ratio=0.9)
    probe_key = f"{args.format}/{args.precision}/{args.threads}"
    known = {k.split("/", 4)[-1]: v for k, v in cache.data.items() if k.startswith(f"lat/{probe_key}/")}

    def keep(row: dict) -> None:
        cache.put(f"lat/{probe_key}/{row['ratio']:.6f}", {**row, "host": host_label(host)})
        print(f"latency {row['ratio']:.3f}: {row['ms']:.2f} ms ({row['fraction']:.3f})", flush=True)

    example = torch.zeros(1, 1, 32, 32)
    with LatencyProbe(model, budget, example_inputs=example, known=known, on_trial=keep) as probe:
        for ratio in args.ratios:
            probe.measure(ratio)
    for target in args.budgets:
        key = f"budget/{probe_key}/{target:g}"
        if cache.get(key) is None:
            b = LatencyBudget(target, format=args.format, precision=args.precision, threads=args.threads)
            ratio, info = ratio_for_latency(model, b, example_inputs=example, trials=probe.known, on_trial=keep)
            probe.known.update(info["trials"])  # the next budget's search starts from every trial so far
            cache.put(key, {**info, "host": host_label(host)})
            print(f"{key}: ratio {ratio:.3f}, measured {info['predicted_fraction']:.3f}", flush=True)
    for target in args.macs:
        key = f"macs/{target:g}"
        if cache.get(key) is None:
            ratio = ratio_for_budget(model, PruningConfig(target_macs=target), example_inputs=example)
            cache.put(key, {"target": target, "ratio": ratio})
    report = _report(cache, args, probe_key, host)
    atomic_write_text(OUT / "compress_pareto.md", report)
    _plot(cache, args, probe_key)
    print(report)


def _finetuned() -> list[dict]:
    """fp32 accuracy of the default recipe's fine-tuned networks (benchmarks/qat.py's ptq rows)."""
    path = OUT / "qat.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text()).get("rows", {})
    return [r for k, r in rows.items() if k.endswith("/ptq")]


def _report(cache: JsonCache, args, probe_key: str, host: dict) -> str:
    unpruned = cache.get("unpruned")
    se = 100 * math.sqrt(0.9 * 0.1 / TEST_IMAGES)
    lines = [
        f"`python benchmarks/compress_pareto.py` — {host_label(host)}, {args.threads} threads, torch {host['torch']}; "
        f"post-training (L2, one event, refit of every Linear on {args.calibration_images} training images per "
        f"draw), fp32 accuracy on all {TEST_IMAGES:,} test images (standard error near 90 %: {se:.2f} pt), ± the "
        f"std over draws; latency of the {args.format} {args.precision} file, median of a round-robin against "
        f"the unpruned model's file (a fresh process per measurement, one alive at a time), 3 rounds of 20 calls "
        f"per trial. Unpruned: {100 * unpruned['accuracy']:.2f} %.",
        "",
        "| allocation | channels pruned | draws | fp32 accuracy | params | MACs | latency | vs unpruned file |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lat = {round(v["ratio"], 6): v for k, v in cache.data.items() if k.startswith(f"lat/{probe_key}/")}
    by_ratio: dict[float, list[dict]] = {}
    for k, v in cache.data.items():
        if k.startswith("acc/"):
            by_ratio.setdefault(v["ratio"], []).append(v)
    for ratio, rows in sorted(by_ratio.items()):
        accs = [100 * r["accuracy"] for r in rows]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        t = lat.get(round(ratio, 6))
        lines.append(
            f"| uniform | {100 * ratio:g} % | {len(rows)} | {statistics.fmean(accs):.2f}{spread} % | "
            f"{rows[0]['params'] / 1e6:.2f} M | {rows[0]['macs'] / 1e6:.1f} M | "
            + (f"{t['ms']:.2f} ms | {t['fraction']:.3f} |" if t else "- | - |")
        )
    for k, v in sorted(cache.data.items()):
        if k.startswith(f"budget/{probe_key}/"):
            lines.append(
                f"| latency budget {v['budget']['target']:g} | {100 * v['ratio']:.1f} % | - | (uniform: see the "
                f"ratios above) | | | {v['predicted_ms']:.2f} ms | {v['predicted_fraction']:.3f} |"
            )
        if k.startswith("macs/"):
            mac = k.split("/")[1]
            lines.append(f"| MAC budget {mac} | {100 * v['ratio']:.1f} % | - | (uniform) | | | | |")
    tuned = _finetuned()
    for ratio in sorted({r["pruning_ratio"] for r in tuned}):
        rows = [r for r in tuned if r["pruning_ratio"] == ratio]
        accs = [100 * r["accuracy"]["fp32"] for r in rows]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        lines.append(
            f"| fine-tuned (default recipe, round_to=32; benchmarks/qat.py) | {100 * ratio:g} % | {len(rows)} | "
            f"{statistics.fmean(accs):.2f}{spread} % | {rows[0]['params'] / 1e6:.2f} M | {rows[0]['macs'] / 1e6:.1f} M | | |"
        )
    lines += [
        "",
        "The latency and MAC budgets allocate widths uniformly (every layer keeps the same share), so they "
        "pick points of the uniform curve: a global allocation from a per-width latency table is not built "
        "yet, and the issue's comparison of it against uniform allocation is open.",
    ]
    return "\n".join(lines) + "\n"


def _plot(cache: JsonCache, args, probe_key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = {round(v["ratio"], 6): v for k, v in cache.data.items() if k.startswith(f"lat/{probe_key}/")}
    points = []
    for k, v in cache.data.items():
        if k.startswith("acc/") and round(v["ratio"], 6) in lat:
            points.append((lat[round(v["ratio"], 6)]["fraction"], 100 * v["accuracy"]))
    if not points:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(*zip(*points), s=14, label="post-training, uniform (each calibration draw)")
    ax.axhline(100 * cache.get("unpruned")["accuracy"], color="gray", ls="--", lw=1, label="unpruned")
    ax.set_xlabel(f"latency / unpruned ({args.format} {args.precision}, this host)")
    ax.set_ylabel("fp32 test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "compress_pareto.png", dpi=120)


if __name__ == "__main__":
    main()
