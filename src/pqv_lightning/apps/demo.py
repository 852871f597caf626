"""``pqv demo``: fine-tune the pretrained Fashion-MNIST ViT with Taylor structured pruning on the
CPU, export the result with MobileExport, print the trade-off table and write plots.

    pqv demo                                             # ~5 minutes on a 2-core CPU (more on AVX2 only)
    pqv demo --ratio 0.5 --train-subset 55000 --epochs 2 # a fuller run

The checkpoint is ``--checkpoint``, else ``$PQV_FMNIST_CHECKPOINT``, else the pretrained ViT bundled
with the package (``pqv_lightning/assets/vit_tiny_fmnist.pt``). Only if that file was removed from an
installation does the demo first train a small ViT for a couple of minutes
(``runs/vit_fmnist_quick.pt``); ``python examples/train_fmnist_vit.py`` makes a full-size one.
``--data-dir`` takes the Fashion-MNIST IDX folder (the demo is a Fashion-MNIST demo; use ``pqv fit``
with ``ImageFolderDataModule`` for your own images).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError, InputNotFoundError

QUICK_CHECKPOINT = Path("runs") / "vit_fmnist_quick.pt"

__all__ = ["add_demo_arguments", "main", "run_demo"]


def _default_formats() -> list[str]:
    """pte, onnx and openvino where their extras are installed, else ptl."""
    from ..export import TARGETS

    return [f for f in ("pte", "onnx", "openvino") if TARGETS[f].missing() is None] or ["ptl"]


def add_demo_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    # choices are read from the registries only when checked or shown: building the parser stays cheap
    from .command import LazyChoices

    IMPORTANCE = LazyChoices("pqv_lightning.pruning.importance", "IMPORTANCE")
    RECIPES = LazyChoices("pqv_lightning.apps.recipes", "RECIPES")
    TARGETS = LazyChoices("pqv_lightning.export.targets", "TARGETS")
    PRECISIONS = LazyChoices("pqv_lightning.export.precisions", "PRECISIONS")
    SCHEDULES = LazyChoices("pqv_lightning.pruning.config", "RATIO_SCHEDULES")
    ap.description = __doc__.split("\n\n")[0]
    ap.add_argument(
        "--checkpoint",
        default=None,
        help="vit_tiny_fmnist.pt-format checkpoint (default: $PQV_FMNIST_CHECKPOINT, else the bundled one)",
    )
    ap.add_argument(
        "--data-dir",
        default=None,
        help="Fashion-MNIST folder with the four IDX *-ubyte.gz files (default: $PQV_FMNIST_DIR, else "
        "the Debian package's /usr/share/datasets/fashion-mnist)",
    )
    ap.add_argument(
        "--importance",
        default=None,
        choices=IMPORTANCE,
        metavar="NAME",
        help="importance criterion: %(choices)s (default: PruningConfig's, taylor)",
    )
    ap.add_argument(
        "--recipe",
        default="default",
        choices=RECIPES,
        metavar="NAME",
        help="fine-tuning recipe, one of %(choices)s: learning rate, warm-up, distillation, regularization (see "
        "pqv_lightning.apps.recipes.RECIPES; 'default' is the best one measured)",
    )
    ap.add_argument(
        "--ratio", type=float, default=None, help="final channel pruning ratio (default: PruningConfig's, 0.25)"
    )
    ap.add_argument(
        "--events",
        type=int,
        default=None,
        help="number of pruning events (default: the demo budget's, recipes.DEMO_BUDGET: 2)",
    )
    ap.add_argument(
        "--schedule",
        default=None,
        choices=SCHEDULES,
        metavar="NAME",
        help="growth of the ratio over events: %(choices)s (default: the recipe's)",
    )
    ap.add_argument(
        "--accumulate",
        type=int,
        default=None,
        help="optimizer steps of statistics per event (default: the demo budget's, recipes.DEMO_BUDGET: 4)",
    )
    ap.add_argument(
        "--widths-for",
        default=None,
        choices=TARGETS,
        metavar="FORMAT",
        help="prune with the width rule this export format runs fastest at equal MACs (openvino: whole "
        "heads instead of head dims, at an accuracy cost; StructuredPruning(widths_for=...))",
    )
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the training subset (default: the demo budget's, recipes.DEMO_BUDGET: 1)",
    )
    ap.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="training images per epoch (55000 = all; default: the demo budget's, recipes.DEMO_BUDGET: 4096)",
    )
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images (default all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--reevaluate",
        action="store_true",
        help="measure the pretrained row's test accuracy even where it is recorded for this checkpoint and "
        "test set (recipes.RECORDED_TEST_ACCURACY; ~80 s on 2 cores)",
    )
    ap.add_argument(
        "--formats",
        nargs="+",
        default=None,
        choices=TARGETS,
        metavar="FORMAT",
        help="export formats, of %(choices)s (default: pte, onnx and openvino where their extras are "
        "installed, else ptl)",
    )
    ap.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "int8-dynamic", "int8-static"],
        choices=PRECISIONS,
        metavar="PRECISION",
        help="precisions to export: %(choices)s",
    )
    ap.add_argument("--export-dir", default="runs/demo_export", help="where MobileExport writes ('' to skip)")
    ap.add_argument("--plots-dir", default="runs/demo_plots", help="where the PNG plots go ('' to skip)")
    return ap


def _check(args) -> None:
    """Everything the command line can check before any work (each value named as typed)."""
    from ..checks import check_writable_dir

    if args.ratio is not None:  # PruningConfig's own check, now rather than after the first table
        from ..pruning import PruningConfig

        try:
            PruningConfig(pruning_ratio=args.ratio).validate()
        except ConfigError as exc:
            raise ConfigError(f"--ratio {args.ratio}: {exc}") from None
    for name in ("events", "accumulate", "epochs", "train_subset", "batch_size", "threads", "test_subset"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.checkpoint:  # not a checkpoint of the bundled format: one line now, before any data is read
        from ..models import load_vit_checkpoint

        if not Path(args.checkpoint).is_file():
            raise InputNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
        try:
            load_vit_checkpoint(args.checkpoint)
        except ConfigError as exc:
            raise ConfigError(f"--checkpoint {args.checkpoint}: {exc}") from None
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise InputNotFoundError(f"--data-dir {args.data_dir}: no such folder")
    for name in ("export_dir", "plots_dir"):  # '' skips; else a folder that can be written, checked now
        if getattr(args, name):
            check_writable_dir(f"--{name.replace('_', '-')}", getattr(args, name))


def run_demo(args) -> int:
    """The demo for parsed ``args``; torch's thread count is set to ``--threads`` for the run only."""
    from ..settings import torch_threads

    _check(args)
    with torch_threads(args.threads):
        return _run_demo(args)


def _run_demo(args) -> int:
    from ..callbacks import MobileExport
    from ..data import FashionMNISTDataModule
    from .recipes import (
        DEMO_BUDGET,
        default_checkpoint,
        export_table,
        finetune_with_pruning,
        format_table,
        recipe_settings,
        train_vit_checkpoint,
    )

    FashionMNISTDataModule(data_dir=args.data_dir).check_files()  # a missing dataset fails now, in one line
    ckpt = args.checkpoint or default_checkpoint()
    if ckpt is not None and not Path(ckpt).is_file():
        raise InputNotFoundError(f"$PQV_FMNIST_CHECKPOINT={ckpt}: no such file")
    if ckpt is not None and not args.checkpoint:  # $PQV_FMNIST_CHECKPOINT (--checkpoint is checked already)
        from ..models import load_vit_checkpoint

        load_vit_checkpoint(ckpt)  # not a checkpoint of this format: one line now, not after the first table
    if ckpt is None:
        if not QUICK_CHECKPOINT.is_file():
            print(f"no pretrained checkpoint found: training a small ViT first -> {QUICK_CHECKPOINT}", flush=True)
            train_vit_checkpoint(
                QUICK_CHECKPOINT,
                dim=64,
                depth=4,
                heads=2,
                epochs=6,
                batch_size=128,
                lr=2e-3,
                train_subset=16384,
                data_dir=args.data_dir,
                precision="32-true",
                warmup_epochs=0.25,
                drop_path_rate=0.0,
            )
        ckpt = QUICK_CHECKPOINT
    common = dict(data_dir=args.data_dir, batch_size=args.batch_size, test_subset=args.test_subset)
    print(f"checkpoint: {ckpt}")
    rows = [
        finetune_with_pruning(
            ckpt, label="pretrained", pruning_ratio=0.0, epochs=0, recorded_ok=not args.reevaluate, **common
        )
    ]
    print(format_table(rows), flush=True)
    if rows[0].recorded:
        print(
            "(recorded: the test accuracy measured once for this checkpoint file on this test set, both "
            "identified by sha256; --reevaluate measures it again)",
            flush=True,
        )
    export = None
    formats = args.formats or _default_formats()
    if args.export_dir:
        export = MobileExport(
            precisions=args.precisions,
            formats=formats,
            output_dir=args.export_dir,
            overwrite=True,
            threads=args.threads,
            verify_batches=4,
            # 256 images calibrate the int8-static activation ranges (the library's default is 8 batches):
            # the int8-static .pte's calibration is on the export's critical path
            calibration_batches=2,
            input_normalization={"mean": [0.2860], "std": [0.3530], "pad": 2},
        )
    recipe = recipe_settings(args.recipe, budget=False)
    if args.widths_for is not None:
        recipe["pruning_kwargs"] = {**recipe.get("pruning_kwargs", {}), "widths_for": args.widths_for}
    if args.schedule is not None:
        recipe["ratio_schedule"] = args.schedule
    # options left unset keep their one default (PruningConfig's; the data budget's: DEMO_BUDGET)
    recipe.update({k: v for k, v in (("importance", args.importance), ("pruning_ratio", args.ratio)) if v is not None})
    given = {
        "epochs": args.epochs,
        "train_subset": args.train_subset,
        "accumulate_batches": args.accumulate,
        "iterative_steps": args.events,
    }
    recipe.update({k: v if v is not None else DEMO_BUDGET[k] for k, v in given.items()})
    rows.append(
        finetune_with_pruning(
            ckpt,
            label="pruned + fine-tuned",
            extra_callbacks=[export] if export else None,
            **recipe,
            **common,
        )
    )
    print()
    print(format_table(rows))
    if export is not None and export.manifest is not None:
        samples = export.manifest["artifacts"][0].get("verification", {}).get("samples", 0)
        print(
            f"\nMobileExport -> {args.export_dir}/ (verified on {samples} validation images against the fp32 "
            f"eager model; batch-1 latency, {args.threads} threads):"
        )
        print(export_table(export.manifest))
    if args.plots_dir:
        from .plots import demo_plots

        results = {"finetune": [r.__dict__ for r in rows], "manifest": export.manifest if export else None}
        Path(args.plots_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.plots_dir) / "demo_results.json").write_text(json.dumps(results, indent=1))
        for path in demo_plots(results, args.plots_dir):
            print(f"plot: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python examples/demo.py`` entry: the same as ``pqv demo``."""
    import sys

    from .command import OneLineParser, run_command

    parser = add_demo_arguments(OneLineParser(prog="pqv demo", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_command(lambda: run_demo(args))
