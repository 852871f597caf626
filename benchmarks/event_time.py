"""Where a pruning event's time goes: one event of ``prune_once`` with least-squares reconstruction of
every Linear (the demo's recipe) on ``--samples`` calibration images, ``--repeats`` times, 2 threads;
prints the median of every phase (``PruningEvent.phase_seconds``), the full command and the host.

``--model bundled`` (default) is the bundled Fashion-MNIST ViT (12 blocks, width 192, 32x32); any other
name is a timm model built with ``pretrained=False`` at its own input size (e.g.
``deit_base_patch16_224``: the paper's model; random weights time the same as trained ones).

    python benchmarks/event_time.py --samples 256 --repeats 3
    python benchmarks/event_time.py --model deit_base_patch16_224 --samples 64 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys

import timm
import torch

from pqv_lightning.export.host import host_description
from pqv_lightning.models import bundled_checkpoint, load_vit_checkpoint
from pqv_lightning.pruning import PruningConfig, prune_once


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if name == "bundled":
        model, _ = load_vit_checkpoint(bundled_checkpoint())
        return model, (1, 32, 32)
    model = timm.create_model(name, pretrained=False)
    return model, tuple(model.pretrained_cfg["input_size"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128, help="calibration images per batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.15)
    args = ap.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    _, shape = _model(args.model)
    batch = min(args.batch, args.samples)
    calibration = [torch.randn(batch, *shape, generator=g) for _ in range(max(1, args.samples // batch))]
    rows = []
    for _ in range(args.repeats):
        model, _ = _model(args.model)
        event = prune_once(
            model.eval(),
            PruningConfig(importance="l2", pruning_ratio=args.ratio, reconstruct=True),
            calibration=calibration,
        )
        rows.append({"seconds": event.seconds, **event.phase_seconds})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    phases = sorted({k for r in rows for k in r})
    summary = {k: round(statistics.median(r.get(k, 0.0) for r in rows), 2) for k in phases}
    print(
        json.dumps(
            {
                "command": shlex.join(["python", "benchmarks/event_time.py", *sys.argv[1:]]),
                "model": args.model,
                "median_s": summary,
                "runs": rows,
                "samples": args.samples,
                "host": host_description(),
            },
            indent=1,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
