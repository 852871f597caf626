"""Demo: fine-tune the pretrained Fashion-MNIST ViT with Taylor structured pruning on the CPU, print
the before/after table (test accuracy on the 10,000 test images, params, MACs), then export the
pruned model with MobileExport (fp32 and int8 Lite Interpreter files, verified and timed).

    python examples/demo.py                      # ~5 minutes on a 2-core CPU
    python examples/demo.py --ratio 0.5 --train-subset 55000 --epochs 2   # a fuller run

The checkpoint defaults to ``../shared/models/vit_tiny_fmnist.pt`` (or ``$PQV_FMNIST_CHECKPOINT``).
Without one the demo first trains a small ViT for a couple of minutes (``runs/vit_fmnist_quick.pt``);
``python examples/train_fmnist_vit.py`` makes a full-size one.
"""

import argparse
from pathlib import Path

import torch

from pqv_lightning import MobileExport
from pqv_lightning.recipes import (
    default_checkpoint,
    export_table,
    finetune_with_pruning,
    format_table,
    train_vit_checkpoint,
)

QUICK_CHECKPOINT = Path("runs") / "vit_fmnist_quick.pt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="vit_tiny_fmnist.pt-format checkpoint")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: Debian package path)")
    ap.add_argument("--importance", default="taylor", choices=["taylor", "hessian", "l1", "l2", "random"])
    ap.add_argument("--ratio", type=float, default=0.25, help="final channel pruning ratio")
    ap.add_argument("--events", type=int, default=4, help="number of pruning events")
    ap.add_argument("--schedule", default="cubic", choices=["linear", "cubic"], help="growth of the ratio over events")
    ap.add_argument("--accumulate", type=int, default=8, help="optimizer steps of statistics per event")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=8192, help="training images per epoch (55000 = all)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images (default all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export-dir", default="runs/demo_export", help="where MobileExport writes ('' to skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = args.checkpoint or default_checkpoint()
    if ckpt is None:
        if not QUICK_CHECKPOINT.is_file():
            print(f"no pretrained checkpoint found: training a small ViT first -> {QUICK_CHECKPOINT}", flush=True)
            train_vit_checkpoint(QUICK_CHECKPOINT, dim=64, depth=4, heads=2, epochs=6, batch_size=128, lr=2e-3,
                                 train_subset=16384, data_dir=args.data_dir, precision="32-true",
                                 warmup_epochs=0.25, drop_path_rate=0.0)
        ckpt = QUICK_CHECKPOINT
    common = dict(data_dir=args.data_dir, batch_size=args.batch_size, test_subset=args.test_subset)
    print(f"checkpoint: {ckpt}")
    rows = [finetune_with_pruning(ckpt, label="pretrained", pruning_ratio=0.0, epochs=0, **common)]
    print(format_table(rows), flush=True)
    export = None
    if args.export_dir:
        export = MobileExport(precisions=["fp32", "int8-dynamic", "int8-static"], output_dir=args.export_dir,
                              overwrite=True, threads=args.threads, verify_batches=4, calibration_batches=4,
                              input_normalization={"mean": [0.2860], "std": [0.3530], "pad": 2})
    rows.append(finetune_with_pruning(
        ckpt, label="pruned + fine-tuned", importance=args.importance, pruning_ratio=args.ratio,
        iterative_steps=args.events, accumulate_batches=args.accumulate, train_subset=args.train_subset,
        ratio_schedule=args.schedule, epochs=args.epochs, extra_callbacks=[export] if export else None, **common))
    print()
    print(format_table(rows))
    if export is not None and export.manifest is not None:
        samples = export.manifest["artifacts"][0].get("verification", {}).get("samples", 0)
        print(f"\nMobileExport -> {args.export_dir}/ (verified on {samples} validation images against the fp32 "
              f"eager model; batch-1 latency, {args.threads} threads):")
        print(export_table(export.manifest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
