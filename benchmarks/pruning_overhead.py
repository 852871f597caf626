"""Cost of StructuredPruning: importance accumulation per training step, and one pruning event.

1. Accumulation overhead: a training step (forward, backward, AdamW step) timed with and without
   gradient statistics (taylor: folded in before the optimizer step; hessian: per-micro-batch
   gradient hooks + commit), variants interleaved in the same process, fixed threads, warm-up,
   median and p10-p90 over repeats. Also the accumulation call timed on its own.
2. One pruning event on DeiT-base (random init; weights do not change the cost): scoring,
   physical removal, AdamW state slicing and attribute sync, timed by the engine, median over
   fresh models. Dependency-graph construction is reported separately (once per fit).

    python benchmarks/pruning_overhead.py            # writes benchmarks/results/pruning_overhead.md
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from pqv_lightning import PruningConfig, StructuredPruner
from pqv_lightning.models import create_vit
from pqv_lightning.pruning.importance import GradientStatistics

OUT = Path(__file__).parent / "results"


def _q(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def fmt(xs):
    return f"{1e3 * statistics.median(xs):.1f} ms ({1e3 * _q(xs, 0.1):.1f}-{1e3 * _q(xs, 0.9):.1f})"


def accumulation_overhead(name: str, batch: int, warmup: int, repeats: int) -> dict:
    model = create_vit(name, num_classes=10) if name.startswith("vit_") else timm.create_model(name, num_classes=10)
    model.train()
    in_chans = model.patch_embed.proj.in_channels
    size = model.patch_embed.img_size
    x = torch.randn(batch, in_chans, *size)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    taylor = GradientStatistics(model, "taylor")
    hessian = GradientStatistics(model, "hessian")
    times = {"baseline": [], "taylor": [], "hessian": [], "taylor_call": []}

    def step(variant):
        if variant == "hessian":
            hessian.attach()
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        t1 = time.perf_counter()
        if variant == "taylor":
            taylor.step()
        elif variant == "hessian":
            hessian.step()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        hessian.detach()
        return t3 - t0, t2 - t1

    order = ["baseline", "taylor", "hessian"]
    for i in range(warmup + repeats):
        for variant in order if i % 2 == 0 else order[::-1]:  # interleave ABC / CBA against drift
            total, acc = step(variant)
            if i >= warmup:
                times[variant].append(total)
                if variant == "taylor":
                    times["taylor_call"].append(acc)
    base = statistics.median(times["baseline"])
    return {
        "model": name,
        "batch": batch,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "baseline": fmt(times["baseline"]),
        "taylor": fmt(times["taylor"]),
        "hessian": fmt(times["hessian"]),
        "taylor_overhead_pct": 100 * (statistics.median(times["taylor"]) - base) / base,
        "taylor_call_pct": 100 * statistics.median(times["taylor_call"]) / base,
        "hessian_overhead_pct": 100 * (statistics.median(times["hessian"]) - base) / base,
    }


def event_time(name: str, ratio: float, repeats: int, importance: str) -> dict:
    builds, events = [], []
    params = None
    for r in range(repeats):
        torch.manual_seed(r)
        model = timm.create_model(name, pretrained=False)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        t0 = time.perf_counter()
        pruner = StructuredPruner(model, PruningConfig(importance=importance, pruning_ratio=ratio), measure=False)
        builds.append(time.perf_counter() - t0)
        x = torch.randn(2, 3, 224, 224)
        F.cross_entropy(model(x), torch.randint(0, 1000, (2,))).backward()
        pruner.accumulate()
        opt.step()  # populate Adam state so the event also slices it
        event = pruner.step([opt])
        events.append(event.seconds)
        params = (event.params_before, event.params_after)
        del pruner, model, opt
    return {
        "model": name,
        "importance": importance,
        "ratio": ratio,
        "build": fmt(builds),
        "event": fmt(events),
        "event_median_s": statistics.median(events),
        "params_M": f"{params[0] / 1e6:.1f} -> {params[1] / 1e6:.1f}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--event-repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    acc = [
        accumulation_overhead("vit_tiny_fmnist", 128, args.warmup, args.repeats),
        accumulation_overhead("deit_tiny_patch16_224", 32, args.warmup, args.repeats),
    ]
    ev = [
        event_time("deit_base_patch16_224", 0.09375, args.event_repeats, "taylor"),
        event_time("deit_base_patch16_224", 0.5, args.event_repeats, "taylor"),
    ]
    lines = [
        f"`python benchmarks/pruning_overhead.py --threads {args.threads} --repeats {args.repeats}` — "
        f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads",
        "",
        "| model | batch | training step | + taylor | + hessian | taylor overhead | taylor call alone | hessian overhead |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in acc:
        lines.append(
            f"| {a['model']} ({a['params_M']:.1f} M) | {a['batch']} | {a['baseline']} | {a['taylor']} | "
            f"{a['hessian']} | {a['taylor_overhead_pct']:+.1f} % | {a['taylor_call_pct']:.1f} % | "
            f"{a['hessian_overhead_pct']:+.1f} % |"
        )
    lines += [
        "",
        "| model | importance | channel ratio | params | dependency graph (once) | one pruning event |",
        "|---|---|---|---|---|---|",
    ]
    for e in ev:
        lines.append(
            f"| {e['model']} | {e['importance']} | {e['ratio']} | {e['params_M']} M | {e['build']} | {e['event']} |"
        )
    text = "\n".join(lines) + "\n\nTimes: median (p10-p90).\n"
    OUT.mkdir(exist_ok=True)
    (OUT / "pruning_overhead.md").write_text(text)
    (OUT / "pruning_overhead.json").write_text(json.dumps({"accumulation": acc, "events": ev}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
