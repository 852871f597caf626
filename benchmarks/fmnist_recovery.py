"""Accuracy recovery while pruning the Fashion-MNIST ViT: recipes and methods, several seeds.

Every row fine-tunes the pretrained Fashion-MNIST ViT (bundled with the package) for the same
number of optimizer steps on the CPU and measures test accuracy on all 10,000 test images.

Grids (``--grid``):

* ``recipe``  — why fine-tuning the *unpruned* model loses accuracy, and which learning rate /
  warm-up / data budget to use: the unpruned control and 25 % one-shot under recipe variants.
* ``methods`` — at 25 % and 50 % channels: one-shot, iterative, + distillation, + group-sparsity
  regularization, + both, + least-squares reconstruction after each event (of ``proj`` and ``fc2``
  only, or of every Linear layer; with and without distillation, and at lr 5e-5); and the unpruned
  control with and without distillation.
* ``distillation`` — iterative + distillation at 25 % and 50 % with stronger settings: the weight
  ``alpha`` (0.5, 0.9), the temperature ``tau`` (2, 4) and the teacher's precision (bf16, fp32).
* ``budget`` — the demo's data budget (64 steps) against half of it (32 steps), with ``--recipe default``.
* ``widths`` — the width rules that export runtimes run faster (results/fastest_artifact_heads.md):
  whole heads removed (every kept head keeps its 64 dims) instead of dimensions inside every head,
  with the whole default recipe (``--recipe default``). The proxy has 3 heads, so whole heads at
  25 % remove one head of three (33 % of the attention width) and a little more than head dims do.
* ``combinations`` — distillation plus one more change: one-shot, alpha 0.9 / tau 4, lr 1e-4 or
  4e-4, reconstruction (one-shot / iterative, lr 2e-4 / 5e-5), global allocation (Taylor across
  layers) at the uniform model's MAC budget.

Each (row, seed) is cached in ``benchmarks/results/<name>.json`` as soon as it finishes (keyed by
every setting and the checkpoint's content hash), so the script resumes where it stopped; the
Markdown report shows mean ± std over the seeds that finished and the test set's standard error.

    python benchmarks/fmnist_recovery.py --grid methods --seeds 0 1 2
    python benchmarks/fmnist_recovery.py --grid recipe --seeds 0
    python benchmarks/fmnist_recovery.py --grid methods --report-only   # the table of what finished
    python benchmarks/fmnist_recovery.py --grid widths --recipe default --ratios 0.25 --reuse fmnist_recovery_methods

``--reuse NAME`` counts rows cached in ``results/NAME.json`` (same settings, seed and checkpoint) as
done, so a grid that repeats another grid's row shows it without running it again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pqv_lightning.apps.recipes import RECIPES, default_checkpoint, finetune_with_pruning
from pqv_lightning.fileio import atomic_write_text, file_digest
from pqv_lightning.pruning.config import RECONSTRUCT_LAYERS
from pqv_lightning.settings import torch_threads

OUT = Path(__file__).parent / "results"
TEST_IMAGES = 10_000
# least-squares reconstruction at each event: proj + fc2 only ("residual"), or every Linear ("all")
RECONSTRUCT = {
    layers: {"pruning_kwargs": {"reconstruct": True, "reconstruct_layers": layers}} for layers in RECONSTRUCT_LAYERS
}


def recipe_grid(recipe: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, settings) rows of the recipe investigation."""
    old = RECIPES["v0.2"]
    variants = {
        "v0.2 (lr 2e-4, no warm-up, 2 x 16,384 images)": old,
        "v0.2 + warm-up 10 %": {**old, "warmup_steps": 26},
        "v0.2, 1 x 32,768 images": {**old, "epochs": 1, "train_subset": 32768},
        "v0.2, lr 5e-5": {**old, "lr": 5e-5},
        "v0.2 + distillation": {**old, "distill_alpha": 0.5, "distill_tau": 2.0},
    }
    return [(f"unpruned: {name}", {**r, "pruning_ratio": 0.0}) for name, r in variants.items()] + [
        (f"one-shot 0.25: {name}", {**r, "pruning_ratio": 0.25, "iterative_steps": 1}) for name, r in variants.items()
    ]


def _base(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe without its distillation and pruning options: what each row adds to (so that a
    recipe that gains an option keeps the keys of the rows already cached)."""
    return {
        k: v
        for k, v in recipe.items()
        if k not in ("distill_alpha", "distill_tau", "teacher_precision", "pruning_kwargs")
    }


def methods_grid(recipe: dict[str, Any], ratios: list[float]) -> list[tuple[str, dict[str, Any]]]:
    """Rows of the methods comparison on ``recipe`` (its distillation, if any, only in the + distillation rows).
    Regularization: group lasso (λ 1e-3) from the first step to the last event, same event schedule.
    Reconstruction: ``StructuredPruning(reconstruct=True)`` (256 calibration inputs per event)."""
    kd = {
        "distill_alpha": recipe.get("distill_alpha") or 0.5,
        "distill_tau": recipe.get("distill_tau", 2.0),
        "teacher_precision": recipe.get("teacher_precision", "bf16"),
    }
    reg = {"pruning_kwargs": {"regularization": "l2", "reg_strength": 1e-3}}
    # least squares on the window's last 256 inputs: proj + fc2 only, or every Linear (qkv, proj, fc1, fc2, head)
    res, full = RECONSTRUCT["residual"], RECONSTRUCT["all"]
    base = _base(recipe)
    rows = []
    for r in ratios:
        rows += [
            (f"{r:g} one-shot", {**base, "pruning_ratio": r, "iterative_steps": 1}),
            (f"{r:g} iterative", {**base, "pruning_ratio": r}),
            (f"{r:g} iterative + distillation", {**base, **kd, "pruning_ratio": r}),
            (f"{r:g} iterative + regularization", {**base, **reg, "pruning_ratio": r}),
            (f"{r:g} iterative + both", {**base, **kd, **reg, "pruning_ratio": r}),
            (f"{r:g} iterative + reconstruction (proj, fc2)", {**base, **res, "pruning_ratio": r}),
            (f"{r:g} iterative + distillation + reconstruction (proj, fc2)", {**base, **kd, **res, "pruning_ratio": r}),
            (f"{r:g} iterative + reconstruction (all layers)", {**base, **full, "pruning_ratio": r}),
            (
                f"{r:g} iterative + distillation + reconstruction (all layers)",
                {**base, **kd, **full, "pruning_ratio": r},
            ),
            (
                f"{r:g} iterative + distillation + reconstruction (all layers), lr 5e-5",
                {**base, **kd, **full, "lr": 5e-5, "pruning_ratio": r},
            ),
            (
                f"{r:g} one-shot + distillation + reconstruction (all layers), lr 5e-5",
                {**base, **kd, **full, "lr": 5e-5, "pruning_ratio": r, "iterative_steps": 1},
            ),
        ]
    return rows + [
        ("unpruned", {**base, "pruning_ratio": 0.0}),
        ("unpruned + distillation", {**base, **kd, "pruning_ratio": 0.0}),
        ("unpruned, lr 5e-5", {**base, "lr": 5e-5, "pruning_ratio": 0.0}),
        ("unpruned + distillation, lr 5e-5", {**base, **kd, "lr": 5e-5, "pruning_ratio": 0.0}),
    ]


def distillation_grid(recipe: dict[str, Any], ratios: list[float]) -> list[tuple[str, dict[str, Any]]]:
    """Iterative + distillation with other weights, temperatures and teacher precisions (the methods
    grid's row is alpha 0.5, tau 2, bf16)."""
    base = _base(recipe)
    rows = []
    for r in ratios:
        for alpha, tau, teacher in ((0.9, 2.0, "bf16"), (0.5, 4.0, "bf16"), (0.9, 4.0, "bf16"), (0.9, 4.0, "fp32")):
            rows.append(
                (
                    f"{r:g} iterative + distillation (alpha {alpha:g}, tau {tau:g}, {teacher} teacher)",
                    {
                        **base,
                        "distill_alpha": alpha,
                        "distill_tau": tau,
                        "teacher_precision": teacher,
                        "pruning_ratio": r,
                    },
                )
            )
    return rows


# MACs of the Fashion-MNIST ViT pruned uniformly (every layer, 1x32x32 input) at these channel ratios
# (benchmarks/results/fmnist_recovery_methods.json): the global rows get the same budget
UNIFORM_MACS = {0.25: 194_237_856, 0.5: 86_361_024}


def combinations_grid(recipe: dict[str, Any], ratios: list[float]) -> list[tuple[str, dict[str, Any]]]:
    """Distillation combined with what else might close the gap to the targets: one-shot instead of
    iterative, stronger distillation (alpha 0.9, tau 4), a lower / higher learning rate, and global
    allocation (Taylor ranked across layers) at the uniform model's MAC budget."""
    kd = {
        "distill_alpha": recipe.get("distill_alpha") or 0.5,
        "distill_tau": recipe.get("distill_tau", 2.0),
        "teacher_precision": recipe.get("teacher_precision", "bf16"),
    }
    base = _base(recipe)
    rows = []
    for r in ratios:
        rows += [
            (f"{r:g} one-shot + distillation", {**base, **kd, "pruning_ratio": r, "iterative_steps": 1}),
            (
                f"{r:g} iterative + distillation (alpha 0.9, tau 4)",
                {**base, **kd, "distill_alpha": 0.9, "distill_tau": 4.0, "pruning_ratio": r},
            ),
            (f"{r:g} iterative + distillation, lr 4e-4", {**base, **kd, "lr": 4e-4, "pruning_ratio": r}),
            (f"{r:g} iterative + distillation, lr 1e-4", {**base, **kd, "lr": 1e-4, "pruning_ratio": r}),
        ]
        rec = RECONSTRUCT["residual"]
        rows += [
            # reconstruction starts fine-tuning close to the unpruned function: does the gentler rate that
            # keeps the unpruned model's accuracy (5e-5) now suit the pruned one too?
            (
                f"{r:g} one-shot + distillation + reconstruction (proj, fc2)",
                {**base, **kd, **rec, "pruning_ratio": r, "iterative_steps": 1},
            ),
            (
                f"{r:g} one-shot + distillation + reconstruction (proj, fc2), lr 5e-5",
                {**base, **kd, **rec, "lr": 5e-5, "pruning_ratio": r, "iterative_steps": 1},
            ),
            (
                f"{r:g} iterative + distillation + reconstruction (proj, fc2), lr 5e-5",
                {**base, **kd, **rec, "lr": 5e-5, "pruning_ratio": r},
            ),
        ]
        if r in UNIFORM_MACS:
            rows.append(
                (
                    f"{r:g} iterative global (uniform MACs) + distillation",
                    {
                        **base,
                        **kd,
                        "pruning_ratio": r,
                        "pruning_kwargs": {"target_macs": UNIFORM_MACS[r], "global_pruning": True},
                    },
                )
            )
    return rows


def widths_grid(recipe: dict[str, Any], ratios: list[float]) -> list[tuple[str, dict[str, Any]]]:
    """``recipe`` as it is (head dims pruned inside every head) and with whole heads removed instead."""
    heads = {"prune_num_heads": True, "prune_head_dims": False}
    rows = []
    for r in ratios:
        rows += [
            (f"{r:g} head dims (every head narrower)", {**recipe, "pruning_ratio": r}),
            (
                f"{r:g} whole heads (kept heads keep their width)",
                {**recipe, "pruning_ratio": r, "pruning_kwargs": {**(recipe.get("pruning_kwargs") or {}), **heads}},
            ),
        ]
    return rows


def budget_grid(recipe: dict[str, Any], ratios: list[float]) -> list[tuple[str, dict[str, Any]]]:
    """``recipe`` at the demo's data budget (1 x 8,192 images: 64 steps, 4 events of 8-batch statistics
    windows, the last at step 32) and at half of it (1 x 4,096 images: 32 steps, 4-batch windows, the
    last event at step 16), and that with 2 events instead of 4 (each event's reconstruction takes
    ~10 s of the demo): what ``pqv demo``'s default budget buys."""
    rows = []
    for r in ratios:
        for images, window in ((8192, 8), (4096, 4)):
            rows.append(
                (
                    f"{r:g}, 1 x {images:,} images ({images // 128} steps), {window}-batch windows",
                    {**recipe, "epochs": 1, "train_subset": images, "accumulate_batches": window, "pruning_ratio": r},
                )
            )
        rows.append(
            (
                f"{r:g}, 1 x 4,096 images (32 steps), 4-batch windows, 2 events",
                {
                    **recipe,
                    "epochs": 1,
                    "train_subset": 4096,
                    "accumulate_batches": 4,
                    "iterative_steps": 2,
                    "pruning_ratio": r,
                },
            )
        )
    return rows


GRIDS = {
    "recipe": lambda recipe, ratios: recipe_grid(recipe),
    "budget": budget_grid,
    "methods": methods_grid,
    "distillation": distillation_grid,
    "combinations": combinations_grid,
    "widths": widths_grid,
}


def _key(settings: dict[str, Any], seed: int, digest: str) -> str:
    return hashlib.sha256(json.dumps([settings, seed, digest], sort_keys=True).encode()).hexdigest()[:16]


def summarize(rows: list[tuple[str, dict[str, Any]]], cache: dict[str, Any], seeds: list[int], digest: str) -> str:
    lines = [
        "| run | seeds | test acc (mean ± std) | per seed | params | MACs | fit time |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, settings in rows:
        done = [cache[k] for s in seeds if (k := _key(settings, s, digest)) in cache]
        if not done:
            continue
        accs = [100 * d["test_acc"] for d in done]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        per_seed = ", ".join(f"{a:.2f}" for a in accs)
        lines.append(
            f"| {label} | {len(done)} | {statistics.mean(accs):.2f}{spread} % | {per_seed} | "
            f"{done[0]['params'] / 1e6:.2f} M | {done[0]['macs'] / 1e6:.1f} M | "
            f"{statistics.mean(d['seconds'] for d in done):.0f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="methods")
    ap.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="distillation",
        help="base recipe of the grids (its lr, warm-up, schedule, data; distillation only where a row adds it)",
    )
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", default=None, help="run only rows whose label contains this text")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--name", default=None, help="results file stem (default fmnist_recovery_<grid>)")
    ap.add_argument("--report-only", action="store_true", help="write the report from the cached rows; run nothing")
    ap.add_argument(
        "--reuse",
        nargs="+",
        default=[],
        metavar="NAME",
        help="also count rows cached in results/NAME.json (same settings, seed, checkpoint) as done",
    )
    args = ap.parse_args(argv)
    ckpt = Path(args.checkpoint or default_checkpoint())
    digest = file_digest(ckpt)
    name = args.name or f"fmnist_recovery_{args.grid}"
    OUT.mkdir(exist_ok=True)
    cache_file = OUT / f"{name}.json"
    cache: dict[str, Any] = json.loads(cache_file.read_text())["rows"] if cache_file.is_file() else {}
    rows = GRIDS[args.grid](RECIPES[args.recipe], args.ratios)
    if args.only:
        rows = [r for r in rows if args.only in r[0]]
    wanted = {_key(st, s, digest) for _, st in rows for s in args.seeds}
    for other in args.reuse:  # the other file is only read; its rows of this grid join this file
        other_file = OUT / f"{other}.json"
        if not other_file.is_file():
            ap.error(f"--reuse {other}: {other_file} does not exist")
        reused = json.loads(other_file.read_text())["rows"]
        cache = {**{k: v for k, v in reused.items() if k in wanted}, **cache}
    host = platform.processor() or platform.machine()
    try:
        host = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = "python benchmarks/fmnist_recovery.py " + " ".join(shown)
    with torch_threads(args.threads):
        for seed in args.seeds:  # seed-major: every row gets one seed before any gets a second
            for label, settings in rows:
                k = _key(settings, seed, digest)
                if k in cache or args.report_only:
                    continue
                res = asdict(finetune_with_pruning(ckpt, label=label, seed=seed, **settings))
                cache[k] = {
                    **res,
                    "seed": seed,
                    "settings": settings,
                    "host": host,
                    "threads": args.threads,
                    "torch": torch.__version__,
                }
                atomic_write_text(cache_file, json.dumps({"rows": cache}, indent=1))
                print(f"{label} seed {seed}: {100 * res['test_acc']:.2f} % ({res['seconds']:.0f} s)", flush=True)
    se = 100 * math.sqrt(0.9 * 0.1 / TEST_IMAGES)
    shown_rows = [cache[k] for _, st in rows for s in args.seeds if (k := _key(st, s, digest)) in cache]
    threads = "/".join(str(t) for t in sorted({r.get("threads", args.threads) for r in shown_rows})) or args.threads
    report = (
        f"`{command.strip()}` — {host}, {threads} thread(s) per run, torch {torch.__version__}; "
        f"test accuracy on all {TEST_IMAGES:,} test images (standard error of one accuracy near 90 %: "
        f"{se:.2f} pt, of a difference of two: {se * math.sqrt(2):.2f} pt); ± is the std over seeds. Fit "
        f"times are wall clock on a shared 2-core VM, inflated when other jobs ran beside it.\n\n"
        + summarize(rows, cache, args.seeds, digest)
        + "\n"
    )
    atomic_write_text(OUT / f"{name}.md", report)
    print(report)


if __name__ == "__main__":
    main()
