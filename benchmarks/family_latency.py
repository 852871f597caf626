"""Model families beyond ViT at full size: pruned 25 %, exported to int8, timed against fp32 eager.

For each model (``--models``, timm names; random weights: latency does not depend on the values),
224² (the model's own input size), batch 1: the unpruned network and the network with 25 % of its
prunable channels removed by ``prune_once`` (l2, the family's adapter decides what is prunable and
what stays whole), MACs and parameters of both, the pruned network exported to every ``--formats``
at every ``--precisions`` (verified against the pruned fp32 network: logit cosine on random images);
then **all** verified files and both fp32 eager networks are timed in one round-robin, each in a
fresh process (:func:`pqv_lightning.export.benchmark.round_robin`, ``--threads`` threads, the
contention guard retakes measurements taken on a busy host). Ratios are against the unpruned fp32
eager network of the same round-robin. Exports are kept in ``--work`` and every finished step is
cached in ``benchmarks/results/<name>.json``: an interrupted run resumes.

    python benchmarks/family_latency.py                                  # ConvNeXt-T and Swin-T, ~30 min on 2 cores
    python benchmarks/family_latency.py --models convnext_tiny --formats onnx --report-only
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import timm
import torch
from fastest_artifact import Cache  # benchmarks/ is on sys.path when this script runs

from pqv_lightning.export import TARGETS, MobileExportConfig, export_mobile
from pqv_lightning.export.benchmark import Candidate, round_robin
from pqv_lightning.export.host import host_description, host_label
from pqv_lightning.fileio import atomic_write_text
from pqv_lightning.pruning import PruningConfig, count_macs, count_params, prune_once

OUT = Path(__file__).parent / "results"
RATIO = 0.25
MAX_CONTENTION = 0.2
MIN_COSINE = 0.99


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def _export(name: str, args, cache: Cache) -> dict[str, Any]:
    folder = Path(args.work) / name
    done = cache.get(f"export/{name}")
    if done and all((folder / f).is_file() for f in [*done["files"], "unpruned.pt", "pruned.pt"]):
        return done
    folder.mkdir(parents=True, exist_ok=True)
    model = _build(name)
    shape = [1, *model.pretrained_cfg["input_size"]]
    x = torch.randn(shape)
    torch.save(model, folder / "unpruned.pt")
    before = {"macs": count_macs(model, x), "params": count_params(model)}
    event = prune_once(model, PruningConfig(importance="l2", pruning_ratio=RATIO), example_inputs=x)
    torch.save(model, folder / "pruned.pt")
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, *shape[1:], generator=g) for _ in range(2)]
    formats = [f for f in args.formats if TARGETS[f].missing() is None]
    manifest = export_mobile(
        model,
        x,
        MobileExportConfig.files_only(
            folder / "export",
            precisions=args.precisions,
            formats=formats,
            threads=args.threads,
        ),
        validation_data=data,
        calibration_data=data,
    )
    ok = [a for a in manifest["artifacts"] if a["status"] == "ok"]
    row = {
        "input": shape,
        "unpruned": before,
        "pruned": {"macs": count_macs(model, x), "params": count_params(model), "event_seconds": event.seconds},
        "files": [f"export/{a['file']}" for a in ok],
        "cosine": {a["file"]: a["verification"]["cosine"] for a in ok},
        "skipped": {a["file"]: a["reason"] for a in manifest["artifacts"] if a["status"] != "ok"},
    }
    cache.put(f"export/{name}", row)
    return row


def _time(names: list[str], args, cache: Cache) -> None:
    key = "timing/" + "+".join(names)
    done = cache.get(key)
    if done and not args.retime:
        return
    for name in names:  # one round-robin per model: its own input shape, its own baseline
        row = cache.data[f"export/{name}"]
        folder = Path(args.work) / name
        candidates = [
            Candidate("fp32 eager, unpruned", str(folder / "unpruned.pt")),
            Candidate("fp32 eager, pruned", str(folder / "pruned.pt")),
        ]
        candidates += [Candidate(Path(f).name, str(folder / f)) for f in row["files"]]
        stats = round_robin(
            candidates,
            row["input"],
            threads=args.threads,
            rounds=args.rounds,
            warmup=args.warmup,
            calls=args.calls,
            baseline="fp32 eager, unpruned",
            max_contention=MAX_CONTENTION,
            progress=lambda r, label, name=name: print(f"{name}: round {r + 1}: {label}", flush=True),
        )
        cache.put(
            f"timing/{name}",
            {
                "stats": stats,
                "host": host_description(),
                "threads": args.threads,
                "rounds": args.rounds,
                "calls": args.calls,
            },
        )
    cache.put(key, True)


def _report(names: list[str], cache: Cache) -> str:
    lines = [
        "| model | MACs pruned / unpruned | params pruned / unpruned | fp32 eager unpruned | fp32 eager pruned "
        "| fastest verified int8 file | its cosine | ms (p90) | x unpruned fp32 eager | host |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    notes = []
    for name in names:
        row, timing = cache.get(f"export/{name}"), cache.get(f"timing/{name}")
        if row is None or timing is None:
            continue
        stats = timing["stats"]
        int8 = {k: s for k, s in stats.items() if "int8" in k}
        # verified: logits within cosine MIN_COSINE of the pruned fp32 network (the coverage matrix's bar)
        verified = {k: s for k, s in int8.items() if row["cosine"].get(k, 0.0) >= MIN_COSINE}
        best = min(verified or int8, key=lambda k: int8[k]["median_ms"])
        base, pruned = stats["fp32 eager, unpruned"], stats["fp32 eager, pruned"]
        u, p = row["unpruned"], row["pruned"]
        lines.append(
            f"| `{name}` | {p['macs'] / 1e9:.2f} / {u['macs'] / 1e9:.2f} G ({p['macs'] / u['macs']:.2f}x) | "
            f"{p['params'] / 1e6:.1f} / {u['params'] / 1e6:.1f} M ({p['params'] / u['params']:.2f}x) | "
            f"{base['median_ms']:.1f} ms | {pruned['median_ms']:.1f} ms | {best} | "
            f"{row['cosine'][best]:.4f} | {int8[best]['median_ms']:.1f} ({int8[best]['p90_ms']:.1f}) | "
            f"**{base['median_ms'] / int8[best]['median_ms']:.2f}x** | {host_label(timing['host'])} |"
        )
        others = ", ".join(
            f"{k} {s['median_ms']:.1f} ms (cos {row['cosine'].get(k, float('nan')):.3f})"
            for k, s in sorted(int8.items(), key=lambda kv: kv[1]["median_ms"])
        )
        worst = [s["contention_max"] for s in stats.values() if s.get("contention_max") is not None]
        notes.append(
            f"* `{name}`: every int8 file: {others}; skipped: {row['skipped'] or 'none'}; worst contention "
            f"{max(worst):.2f} CPUs"
            if worst
            else ""
        )
    rounds = next((cache.data[f"timing/{n}"] for n in names if f"timing/{n}" in cache.data), None)
    head = (
        "Random-initialized timm models at their own input size, batch 1, 25 % of the prunable channels removed "
        "(l2, uniform). Each model's files and both fp32 eager networks timed in one round-robin "
        + (
            f"({rounds['rounds']} rounds x {rounds['calls']} calls, {rounds['threads']} threads, each in a fresh "
            "process; medians). "
            if rounds
            else ""
        )
        + f"The fastest verified file: the fastest whose logits have cosine >= {MIN_COSINE} with the pruned fp32 "
        "network's on random images. Command: `python benchmarks/family_latency.py`."
    )
    return "\n".join([head, "", *lines, "", *[n for n in notes if n]]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["convnext_tiny", "swin_tiny_patch4_window7_224"])
    ap.add_argument("--formats", nargs="+", default=["onnx", "openvino", "pte"])
    ap.add_argument("--precisions", nargs="+", default=["int8-dynamic", "int8-static"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--work", default="runs/family_latency")
    ap.add_argument("--name", default="family_latency")
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--retime", action="store_true", help="time again although a timing is cached")
    args = ap.parse_args()
    cache = Cache(OUT / f"{args.name}.json")
    if not args.report_only:
        for name in args.models:
            print(f"{name}: export", flush=True)
            _export(name, args, cache)
        if not args.export_only:
            _time(args.models, args, cache)
    report = _report(args.models, cache)
    atomic_write_text(OUT / f"{args.name}.md", report)
    print(report)


if __name__ == "__main__":
    main()
