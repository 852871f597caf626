"""Make a pretrained Fashion-MNIST ViT checkpoint (the format of shared/models/vit_tiny_fmnist.pt).

python examples/train_fmnist_vit.py --out vit_tiny_fmnist.pt            # the full recipe (GPU: minutes)
python examples/train_fmnist_vit.py --out small.pt --dim 96 --depth 6 --epochs 3   # a CPU-sized one
"""

import argparse

from pqv_lightning.apps.recipes import train_vit_checkpoint
from pqv_lightning.models import load_vit_checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    path = train_vit_checkpoint(
        args.out,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        train_subset=args.train_subset,
        data_dir=args.data_dir,
    )
    _, meta = load_vit_checkpoint(path)
    print(f"wrote {path}: test accuracy {100 * meta['test_accuracy']:.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
