"""ExecuTorch (.pte, XNNPACK) vs ONNX Runtime vs Lite Interpreter (.ptl) vs fp32 eager, per model.

For each model: ``export_mobile`` writes and verifies fp32 / int8-dynamic / int8-static files in
every format (``.ptl`` int8 for the x86 and oneDNN engines; the faster one is "best engine").
Then every artifact and the fp32 eager model are loaded side by side in one process and timed
**round-robin**: ``--rounds`` rounds, each giving every candidate ``--calls`` timed calls after its
warm-up, so a slow phase of the shared machine hits all candidates alike. Median and p90 are over
all timed calls; ratios are against fp32 eager from the same rounds. Fixed threads everywhere;
ONNX Runtime's idle spinning is off (it would slow everything timed after it).

Random-init weights (no model hub here): latency and size do not depend on the values; fidelity is
the cosine of the logits against fp32 eager on random images.

    python benchmarks/executorch_vs_onnx.py                   # deit_small + deit_base, ~25 min on 2 cores
    python benchmarks/executorch_vs_onnx.py --models deit_tiny_patch16_224 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

from pqv_lightning import MobileExportConfig, export_mobile
from pqv_lightning.export import TARGETS

OUT = Path(__file__).parent / "results"


def _time(run, x, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run(x)
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def _stats(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"median_ms": statistics.median(times), "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "min_ms": times[0], "calls": len(times)}


def bench_model(name: str, args) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(2)]
    x = data[0][:1]
    out = Path(tempfile.mkdtemp(prefix="pqv-bench-"))
    try:
        manifest = export_mobile(model, x, MobileExportConfig(
            precisions=["fp32", "int8-dynamic", "int8-static"], formats=["ptl", "pte", "onnx"],
            engines=args.engines, output_dir=str(out), overwrite=True, threads=args.threads, warmup=1, repeats=2,
            verify_batches=2, calibration_batches=2, min_top1_agreement=0.0, measure_memory=False),
            validation_data=data, calibration_data=data)
        candidates = [("fp32 eager", None, model)]
        for a in manifest["artifacts"]:
            if a["status"] == "skipped":
                print(f"  {a['file']} skipped: {a['reason']}")
                continue
            if a["format"] == "ptl" and a["precision"] == "fp32":
                continue  # TorchScript fp32 is not a candidate of this comparison
            candidates.append((a["file"], a, TARGETS[a["format"]].load(str(out / a["file"]), x, args.threads)))
        times: dict[str, list[float]] = {c[0]: [] for c in candidates}
        with torch.no_grad():
            for label, entry, run in candidates:  # warm-up
                with _engine(entry):
                    _time(run, x, args.warmup)
            for _ in range(args.rounds):
                for label, entry, run in candidates:
                    with _engine(entry):
                        times[label] += _time(run, x, args.calls)
        base = _stats(times["fp32 eager"])
        rows = []
        for label, entry, _ in candidates:
            s = _stats(times[label])
            row = {"model": name, "artifact": label, **s, "speedup_vs_fp32_eager": base["median_ms"] / s["median_ms"]}
            if entry is not None:
                row.update(format=entry["format"], precision=entry["precision"], engine=entry["engine"],
                           size_mb=entry["size_bytes"] / 2**20, cosine=entry["verification"]["cosine"],
                           partitions=entry.get("partitions"))
            else:
                row.update(format="eager", precision="fp32", engine=None,
                           size_mb=sum(p.numel() * 4 for p in model.parameters()) / 2**20, cosine=1.0)
            rows.append(row)
            print(f"  {label:28s} {s['median_ms']:8.1f} ms  p90 {s['p90_ms']:8.1f}  x{row['speedup_vs_fp32_eager']:.2f}")
        return rows
    finally:
        shutil.rmtree(out, ignore_errors=True)


class _engine:
    def __init__(self, entry):
        self.engine = entry["engine"] if entry and entry.get("engine") else None

    def __enter__(self):
        self.prev = torch.backends.quantized.engine
        if self.engine:
            torch.backends.quantized.engine = self.engine

    def __exit__(self, *exc):
        torch.backends.quantized.engine = self.prev


def _markdown(rows: list[dict], args) -> str:
    lines = [f"Command: `python benchmarks/executorch_vs_onnx.py {' '.join(args.argv)}`".rstrip() + "  ",
             f"Host: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
             f"round-robin: {args.rounds} rounds x {args.calls} calls per candidate, batch 1, 224x224.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        ptl = [r for r in mrows if r["format"] == "ptl"]
        best = {}
        for r in ptl:  # best engine per precision
            if r["precision"] not in best or r["median_ms"] < best[r["precision"]]["median_ms"]:
                best[r["precision"]] = r
        lines += [f"**{model}**", "",
                  "| artifact | format | precision | median ms | p90 ms | x fp32 eager | size MB | cosine | XNNPACK partitions |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in mrows:
            if r["format"] == "ptl" and best.get(r["precision"]) is not r:
                continue
            label = r["artifact"] + (" (best engine)" if r["format"] == "ptl" else "")
            lines.append(f"| {label} | {r['format']} | {r['precision']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
                         f"{r['speedup_vs_fp32_eager']:.2f} | {r['size_mb']:.1f} | {r['cosine']:.4f} | "
                         f"{r.get('partitions') if r.get('partitions') is not None else ''} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "deit_base_patch16_224"])
    ap.add_argument("--engines", nargs="+", default=["x86", "onednn"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--name", default="executorch_vs_onnx")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        print(name)
        rows += bench_model(name, args)
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    (OUT / f"{args.name}.md").write_text(_markdown(rows, args))
    print(_markdown(rows, args))


if __name__ == "__main__":
    main()
