"""Does group-lasso regularization make the Fashion-MNIST ViT easier to prune? A quick probe.

Fine-tunes the bundled ViT for ``--steps`` AdamW steps (lr 2e-4, batch 128, label smoothing 0.1)
with ``StructuredPruner.regularize(GroupSparsity("l2", strength))`` after every backward pass,
gathers ``--importance`` statistics over the last 8 steps, then prunes 25 % of the channels in
one event. Prints the MLP units' norm quantiles (q10, q25, q50, q90 of block 0's fc1 group),
test accuracy before and right after the event (first 2,000 test images, no recovery steps).

    python benchmarks/regularization_probe.py --strength 0 --steps 64 --importance taylor
    python benchmarks/regularization_probe.py --strength 1e-2 --steps 64 --importance taylor
"""

import argparse
import time

import torch
import torch.nn.functional as F

from pqv_lightning.apps.recipes import default_checkpoint, evaluate
from pqv_lightning.data import FashionMNISTDataModule
from pqv_lightning.models import load_vit_checkpoint
from pqv_lightning.pruning import PruningConfig, StructuredPruner
from pqv_lightning.pruning.sparsity import GroupSparsity, unit_norms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strength", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--importance", default="taylor")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dm = FashionMNISTDataModule(batch_size=128, train_subset=16384, test_subset=2000)
    dm.setup("fit")
    model, _ = load_vit_checkpoint(default_checkpoint())
    model.train()
    pruner = StructuredPruner(model, PruningConfig(importance=args.importance, pruning_ratio=0.25))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
    batches = iter(dm.train_dataloader())
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = next(batches)
        F.cross_entropy(model(x), y, label_smoothing=0.1).backward()
        if step >= args.steps - 8:
            pruner.accumulate()
        if args.strength > 0:
            pruner.regularize(GroupSparsity("l2", args.strength))
        opt.step()
        opt.zero_grad()
    group = next(g for g in pruner.coupled_groups() if "fc1" in g.name)
    norms = unit_norms(group).detach().sort().values
    quantiles = [round(float(norms[int(q * len(norms))]), 3) for q in (0.1, 0.25, 0.5, 0.9)]
    before = evaluate(model, dm)
    pruner.step()
    after = evaluate(model, dm)
    print(
        f"strength {args.strength:g}, {args.steps} steps, {args.importance}: MLP unit norms q10/q25/q50/q90 "
        f"{quantiles}; test acc before the event {100 * before:.2f} %, right after {100 * after:.2f} % "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )


if __name__ == "__main__":
    main()
