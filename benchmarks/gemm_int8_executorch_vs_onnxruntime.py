"""Why ExecuTorch int8 loses to ONNX Runtime int8 on DeiT-base on x86: the GEMM kernels.

One DeiT-base MLP (197 tokens, Linear 768 -> 3072 -> 768, no activation: only GEMMs), exported
to a ``.pte`` (XNNPACK, dynamic int8) and to ONNX (ONNX Runtime ``quantize_dynamic``), fp32 and
int8, timed round-robin in fresh processes (``pqv_lightning.export.benchmark.round_robin``). Reports the
achieved GOP/s of each runtime's GEMMs on this host (2 x 197 x 768 x 3072 x 2 ops per call).

    python benchmarks/gemm_int8_executorch_vs_onnxruntime.py     # ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn

from pqv_lightning.export.benchmark import Candidate, round_robin
from pqv_lightning.export.executorch_target import lower_to_executorch
from pqv_lightning.export.onnx_target import export_onnx

OUT = Path(__file__).parent / "results"
TOKENS, DIM, HIDDEN = 197, 768, 3072


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)).eval()  # picklable for the timing processes
    x = torch.randn(1, TOKENS, DIM)
    ops = 2 * 2 * TOKENS * DIM * HIDDEN
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.save(model, work / "eager.pt")
        candidates = [Candidate("torch eager fp32", str(work / "eager.pt"))]
        for precision in ("fp32", "int8-dynamic"):
            buffer, details, _ = lower_to_executorch(model, x, precision)
            (work / f"{precision}.pte").write_bytes(buffer)
            export_onnx(model, x, precision, str(work / f"{precision}.onnx"))
            candidates += [
                Candidate(f"ExecuTorch XNNPACK {precision}", str(work / f"{precision}.pte")),
                Candidate(f"ONNX Runtime {precision}", str(work / f"{precision}.onnx")),
            ]
        stats = round_robin(
            candidates,
            list(x.shape),
            threads=args.threads,
            rounds=args.rounds,
            calls=args.calls,
            baseline="torch eager fp32",
        )
    rows = [{"runtime": k, **v, "gop_per_s": ops / (v["median_ms"] * 1e6)} for k, v in stats.items()]
    lines = [
        "Command: `python benchmarks/gemm_int8_executorch_vs_onnxruntime.py`  ",
        f"Host: {platform.machine()}, {args.threads} threads, torch {torch.__version__}; {TOKENS}x{DIM} -> {HIDDEN} "
        f"-> {DIM} (two GEMMs, {ops / 1e9:.2f} GOP per call); {args.rounds} rounds x {args.calls} calls, "
        "a fresh process each.",
        "",
        "| runtime | median ms | p90 ms | GOP/s | x torch fp32 |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['runtime']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['gop_per_s']:.0f} | "
            f"{r['speedup_vs_baseline']:.2f} |"
        )
    OUT.mkdir(exist_ok=True)
    (OUT / "gemm_int8_executorch_vs_onnxruntime.json").write_text(json.dumps(rows, indent=1))
    (OUT / "gemm_int8_executorch_vs_onnxruntime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
