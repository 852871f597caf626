"""Uniform vs global width allocation under a latency budget, post-training (issue 31).

The bundled Fashion-MNIST ViT gets a latency budget (``--budget``, a fraction of the unpruned file's
latency on ``--format`` at ``--precision``) three ways: ``uniform`` (one channel ratio,
``ratio_for_latency``) and ``global`` with each of ``--max-ratios`` (a width per group from the
per-layer latency table, ``widths_for_latency``; ``max_ratio`` bounds how much of any group may go)
and each of ``--costs`` (what a unit's removal costs: ``magnitude``, or ``fisher``: its saliency under
the label-free Fisher on the first seed's calibration images).
Each structure is then pruned the way ``pqv compress`` does it (L2, one event, least-squares refit on
``--calibration-images`` training images drawn with each of ``--seeds``) and evaluated in fp32 on all
10,000 test images; finally every structure's file and the unpruned file are timed together,
round-robin, each in a process of its own (``LatencyProbe``), so the latencies compared come from
the same run.

Rows are cached in ``benchmarks/results/latency_allocation.json`` (rerun to continue); the report goes
to ``latency_allocation.md``. With ``--model NAME`` a timm model with random weights at 224x224 is
measured instead, latency only (``latency_allocation_NAME.json`` / ``.md``).

    python benchmarks/latency_allocation.py
    python benchmarks/latency_allocation.py --model deit_base_patch16_224 --max-ratios 0.5
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from pqv_lightning.apps.compress import fmnist_images
from pqv_lightning.apps.recipes import default_checkpoint, evaluate
from pqv_lightning.data import FashionMNISTDataModule
from pqv_lightning.export.host import host_description, host_label
from pqv_lightning.fileio import JsonCache, atomic_write_text
from pqv_lightning.latency_budget import LatencyBudget, LatencyProbe, ratio_for_latency, widths_for_latency
from pqv_lightning.models import load_vit_checkpoint
from pqv_lightning.pruning import PruningConfig, count_macs, count_params, prune_once
from pqv_lightning.settings import torch_threads

OUT = Path(__file__).parent / "results"
TEST_IMAGES = 10_000
EXAMPLE = torch.zeros(1, 1, 32, 32)


def _structures(cache: JsonCache, model, args, calibration, example) -> dict[str, tuple[PruningConfig, str]]:
    """Arm name -> the pruning structure its search chose (searched once, cached) and its search's key.
    ``fisher`` costs: the label-free Fisher on the first seed's calibration images."""
    arms = {}
    base = dict(format=args.format, precision=args.precision, threads=args.threads)
    key = f"search/uniform/{args.budget:g}"
    if cache.get(key) is None:
        ratio, info = ratio_for_latency(model, LatencyBudget(args.budget, **base), example_inputs=example)
        cache.put(key, {"ratio": ratio, "measured_fraction": info["predicted_fraction"]})
    arms["uniform"] = (PruningConfig(importance="l2", pruning_ratio=cache.get(key)["ratio"]), key)
    for costs in args.costs:
        for max_ratio in args.max_ratios:
            key = f"search/global/{args.budget:g}/{max_ratio:g}" + ("" if costs == "magnitude" else f"/{costs}")
            if cache.get(key) is None:
                budget = LatencyBudget(args.budget, allocation="global", max_ratio=max_ratio, **base)
                widths, info = widths_for_latency(
                    model, budget, example_inputs=example, calibration=calibration if costs == "fisher" else None
                )
                info.pop("trials")
                cache.put(key, info)
            arms[f"global, {costs} (max_ratio {max_ratio:g})"] = (
                PruningConfig(importance="l2", group_widths=cache.get(key)["group_widths"]),
                key,
            )
    return arms


def bundled(cache: JsonCache, threads: int, calibration_images: int, seed: int):
    """The bundled ViT, its test data (all 10,000 images), its unpruned accuracy (kept in ``cache``) and
    ``calibration_images`` training images drawn with ``seed`` in batches of 64: the set-up of the
    post-training benchmarks (this one and ``compress_pareto.py``)."""
    model, _ = load_vit_checkpoint(default_checkpoint())
    dm = FashionMNISTDataModule(batch_size=256, test_subset=TEST_IMAGES)
    dm.setup("test")
    if cache.get("unpruned") is None:
        with torch_threads(threads):
            cache.put("unpruned", {"accuracy": evaluate(model, dm), "macs": count_macs(model, EXAMPLE)})
    x, _ = fmnist_images(dm.data_dir, "train", calibration_images, seed)
    return model, dm, list(x.split(64))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--max-ratios", type=float, nargs="+", default=[0.9, 0.5])
    ap.add_argument("--costs", nargs="+", default=["magnitude", "fisher"], choices=["magnitude", "fisher"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--format", default="onnx")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="independent runs of the latency comparison")
    ap.add_argument(
        "--model",
        default=None,
        help="a timm model name, built with random weights at 224x224 (e.g. deit_base_patch16_224): latency only "
        "(no accuracy), magnitude costs",
    )
    args = ap.parse_args(argv)
    host = host_description()
    if args.model is not None:
        import timm

        model = timm.create_model(args.model, pretrained=False).eval()
        example = torch.zeros(1, 3, 224, 224)
        cache = JsonCache(OUT / f"latency_allocation_{args.model}.json")
        args.costs, args.seeds = ["magnitude"], []
        arms = _structures(cache, model, args, None, example)
        _latency_runs(cache, model, args, arms, host, example)
        report = _report(cache, args, arms, host)
        atomic_write_text(OUT / f"latency_allocation_{args.model}.md", report)
        print(report)
        return
    cache = JsonCache(OUT / "latency_allocation.json")
    model, dm, calibration = bundled(cache, args.threads, args.calibration_images, args.seeds[0])
    arms = _structures(cache, model, args, calibration, EXAMPLE)
    for seed in args.seeds:
        x, _ = fmnist_images(dm.data_dir, "train", args.calibration_images, seed)
        calibration = list(x.split(64))
        for arm, (structure, _) in arms.items():
            key = f"acc/{args.budget:g}/{arm}/{seed}"
            if cache.get(key) is not None:
                continue
            pruned = copy.deepcopy(model)
            t0 = time.perf_counter()
            with torch_threads(args.threads):
                prune_once(pruned, dataclasses.replace(structure, reconstruct=True), calibration=calibration)
                seconds = time.perf_counter() - t0
                accuracy = evaluate(pruned, dm)
            row = {"accuracy": accuracy, "prune_seconds": seconds, "params": count_params(pruned)}
            cache.put(key, {**row, "macs": count_macs(pruned, EXAMPLE)})
            print(f"{key}: {100 * accuracy:.2f} % ({seconds:.0f} s)", flush=True)
    _latency_runs(cache, model, args, arms, host, EXAMPLE)
    report = _report(cache, args, arms, host)
    atomic_write_text(OUT / "latency_allocation.md", report)
    print(report)


def _latency_runs(cache: JsonCache, model, args, arms, host: dict, example: torch.Tensor) -> None:
    """Every structure's file beside the unpruned file, in one run per repeat (cached per repeat)."""
    for repeat in range(args.repeats):  # every structure beside the unpruned file, in one run per repeat
        key = _latency_key(args, arms, repeat)
        if cache.get(key) is None:
            budget = LatencyBudget(
                args.budget, format=args.format, precision=args.precision, threads=args.threads, rounds=args.rounds
            )
            rows = {}
            with LatencyProbe(model, budget, example_inputs=example) as probe:
                for arm, (structure, _) in arms.items():
                    rows[arm] = probe.measure_structure(arm, structure, {})
            cache.put(key, {"rows": rows, "host": host_label(host)})
            print(f"latency repeat {repeat}: " + ", ".join(f"{a} {r['fraction']:.3f}" for a, r in rows.items()))


def _latency_key(args, arms, repeat: int) -> str:
    suffix = "" if repeat == 0 else f"/{repeat}"
    return f"latency/{args.budget:g}/{args.format}/{args.precision}/" + ",".join(sorted(arms)) + suffix


def _report(cache: JsonCache, args, arms: dict[str, tuple[PruningConfig, str]], host: dict) -> str:
    runs = [cache.get(_latency_key(args, arms, r))["rows"] for r in range(args.repeats)]
    timing = (
        "Latency: every structure's file vs the unpruned file, round-robin in fresh processes, one run "
        f"({args.rounds} rounds), repeated {args.repeats} times: the median of the repeats, and their range."
    )
    if args.model is not None:
        head = f"{args.model}, random weights, 224x224, latency only (magnitude costs). {timing}"
        columns = ["allocation", "search measured", "x unpruned (median, range of repeats)"]
    else:
        unpruned = cache.get("unpruned")
        se = 100 * (unpruned["accuracy"] * (1 - unpruned["accuracy"]) / TEST_IMAGES) ** 0.5
        head = (
            f"Unpruned: {100 * unpruned['accuracy']:.2f} % (standard error of one accuracy on {TEST_IMAGES:,} "
            f"images: {se:.2f} pt). Post-training (L2, one event, least-squares refit on {args.calibration_images} "
            f"training images per seed, seeds {args.seeds}). {timing}"
        )
        columns = [
            "allocation",
            "search measured",
            "x unpruned (median, range of repeats)",
            "MACs",
            "accuracy (mean ± std over seeds)",
        ]
    lines = [
        f"# Uniform vs global width allocation at a latency budget of {args.budget:g} ({args.format} {args.precision})",
        "",
        f"Host: {host_label(host)}, {args.threads} threads. {head}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for arm, (_, search_key) in arms.items():
        fractions = sorted(run[arm]["fraction"] for run in runs)
        cells = [
            arm,
            f"{cache.get(search_key)['measured_fraction']:.3f}",
            f"{statistics.median(fractions):.3f} ({fractions[0]:.3f}–{fractions[-1]:.3f})",
        ]
        if args.model is None:
            rows = [cache.get(f"acc/{args.budget:g}/{arm}/{s}") for s in args.seeds]
            rows = [r for r in rows if r is not None]
            accs = [100 * r["accuracy"] for r in rows]
            spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
            cells += [
                f"{rows[0]['macs'] / cache.get('unpruned')['macs']:.3f}",
                f"{statistics.fmean(accs):.2f}{spread} % (n={len(accs)})",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
