"""ExecuTorch (.pte, XNNPACK) vs ONNX Runtime vs Lite Interpreter (.ptl) vs fp32 eager, per model.

For each model: ``export_mobile`` writes and verifies fp32 / int8-dynamic / int8-static files in
every format (``.ptl`` int8 for the x86 and oneDNN engines; the faster one is "best engine"), plus
the int8-dynamic ``.pte`` exported without the delegation-friendly module swaps, for comparison.
Then every artifact and the fp32 eager model are timed **round-robin, each in a fresh process**
(``pqv_lightning.export.benchmark.round_robin``): ``--rounds`` rounds, each giving every candidate
``--calls`` timed calls after ``--warmup`` untimed ones, so a slow phase of the shared machine hits
all candidates alike and no runtime's thread pool disturbs another's. Median and p90 are over all
timed calls; ratios are against fp32 eager from the same rounds. Fixed threads everywhere.

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
import tempfile
import time
from pathlib import Path

import torch

from pqv_lightning import MobileExportConfig, export_mobile
from pqv_lightning.export.benchmark import Candidate, round_robin
from pqv_lightning.models import paper_model

OUT = Path(__file__).parent / "results"


def bench_model(name: str, args) -> list[dict]:
    model = paper_model(name)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(2)]
    x = data[0][:1]
    out = Path(tempfile.mkdtemp(prefix="pqv-bench-"))
    try:
        manifest = export_mobile(
            model,
            x,
            MobileExportConfig.files_only(
                out,
                precisions=["fp32", "int8-dynamic", "int8-static"],
                formats=["ptl", "pte", "onnx"],
                engines=args.engines,
                threads=args.threads,
                warmup=1,
                repeats=2,
            ),
            validation_data=data,
            calibration_data=data,
        )
        # the same .pte without the delegation-friendly swaps: what they buy
        plain = export_mobile(
            model,
            x,
            MobileExportConfig.files_only(
                out / "no_swaps",
                precisions=["int8-dynamic"],
                formats=["pte"],
                delegation_friendly=False,
                threads=args.threads,
                warmup=1,
                repeats=2,
                overwrite=False,
                calibration_batches=8,
            ),
            validation_data=data,
        )
        for a in plain["artifacts"]:
            a["file"] = f"no_swaps/{a['file']}"
        manifest["artifacts"] += plain["artifacts"]
        eager = out / "fp32_eager.pt"
        torch.save(model, eager)
        entries = {"fp32 eager": None}
        candidates = [Candidate("fp32 eager", str(eager))]
        for a in manifest["artifacts"]:
            if a["status"] == "skipped":
                print(f"  {a['file']} skipped: {a['reason']}")
                continue
            if a["format"] == "ptl" and a["precision"] == "fp32":
                continue  # TorchScript fp32 is not a candidate of this comparison
            entries[a["file"]] = a
            candidates.append(Candidate(a["file"], str(out / a["file"]), a["engine"]))
        stats = round_robin(
            candidates,
            list(x.shape),
            threads=args.threads,
            rounds=args.rounds,
            warmup=args.warmup,
            calls=args.calls,
            baseline="fp32 eager",
        )
        rows = []
        for label, entry in entries.items():
            s = stats[label]
            row = {"model": name, "artifact": label, **s, "speedup_vs_fp32_eager": s.pop("speedup_vs_baseline")}
            if entry is not None:
                row.update(
                    format=entry["format"],
                    precision=entry["precision"],
                    engine=entry["engine"],
                    size_mb=entry["size_bytes"] / 2**20,
                    cosine=entry["verification"]["cosine"],
                    partitions=entry.get("partitions"),
                )
            else:
                row.update(
                    format="eager",
                    precision="fp32",
                    engine=None,
                    size_mb=sum(p.numel() * 4 for p in model.parameters()) / 2**20,
                    cosine=1.0,
                )
            rows.append(row)
            print(
                f"  {label:30s} {s['median_ms']:8.1f} ms  p90 {s['p90_ms']:8.1f}  x{row['speedup_vs_fp32_eager']:.2f}"
            )
        return rows
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _markdown(rows: list[dict], args) -> str:
    lines = [
        f"Host: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
        f"round-robin, a fresh process per candidate and round: {args.rounds} rounds x {args.calls} calls "
        f"after {args.warmup} warm-up calls, batch 1, 224x224.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        ptl = [r for r in mrows if r["format"] == "ptl"]
        best = {}
        for r in ptl:  # best engine per precision
            if r["precision"] not in best or r["median_ms"] < best[r["precision"]]["median_ms"]:
                best[r["precision"]] = r
        command = mrows[0].get("command", "python benchmarks/executorch_vs_onnx.py")
        lines += [
            f"**{model}** — `{command}` ({mrows[0].get('date', '')})",
            "",
            "| artifact | format | precision | median ms | p90 ms | x fp32 eager | size MB | cosine | XNNPACK partitions |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mrows:
            if r["format"] == "ptl" and best.get(r["precision"]) is not r:
                continue
            label = r["artifact"] + (" (best engine)" if r["format"] == "ptl" else "")
            if label.startswith("no_swaps/"):
                label = label.removeprefix("no_swaps/") + " without delegation swaps"
            lines.append(
                f"| {label} | {r['format']} | {r['precision']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
                f"{r['speedup_vs_fp32_eager']:.2f} | {r['size_mb']:.1f} | {r['cosine']:.4f} | "
                f"{r.get('partitions') if r.get('partitions') is not None else ''} |"
            )
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
    OUT.mkdir(exist_ok=True)
    previous = OUT / f"{args.name}.json"
    # rows of models not rerun now are kept (each row records the command and date that produced it)
    rows = [
        r for r in (json.loads(previous.read_text()) if previous.is_file() else []) if r["model"] not in args.models
    ]
    for name in args.models:
        print(name)
        for row in bench_model(name, args):
            rows.append(
                {
                    **row,
                    "command": " ".join(["python benchmarks/executorch_vs_onnx.py", *args.argv]),
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                }
            )
    (OUT / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    (OUT / f"{args.name}.md").write_text(_markdown(rows, args))
    print(_markdown(rows, args))


if __name__ == "__main__":
    main()
