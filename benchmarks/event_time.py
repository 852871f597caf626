"""Where a pruning event's time goes, on the bundled Fashion-MNIST ViT (12 blocks, width 192): one
event of ``prune_once`` with least-squares reconstruction of every Linear (the demo's recipe) on
``--samples`` calibration images, ``--repeats`` times, 2 threads; prints the median of every phase
(``PruningEvent.phase_seconds``) and the host.

    python benchmarks/event_time.py --samples 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from pqv_lightning.export.host import host_description
from pqv_lightning.models import bundled_checkpoint, load_vit_checkpoint
from pqv_lightning.pruning import PruningConfig, prune_once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.15)
    args = ap.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    calibration = [
        torch.randn(min(128, args.samples), 1, 32, 32, generator=g) for _ in range(max(1, args.samples // 128))
    ]
    rows = []
    for _ in range(args.repeats):
        model, _ = load_vit_checkpoint(bundled_checkpoint())
        event = prune_once(
            model, PruningConfig(importance="l2", pruning_ratio=args.ratio, reconstruct=True), calibration=calibration
        )
        rows.append({"seconds": event.seconds, **event.phase_seconds})
    phases = sorted({k for r in rows for k in r})
    summary = {k: round(statistics.median(r.get(k, 0.0) for r in rows), 2) for k in phases}
    print(
        json.dumps(
            {"median_s": summary, "runs": rows, "samples": args.samples, "host": host_description()},
            indent=1,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
