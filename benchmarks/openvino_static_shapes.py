"""OpenVINO IRs compiled with their free batch dimension vs at a static input shape, batch 1.

``OpenVINOTarget.load`` compiles one model per input shape (``model.reshape(shape)`` before
``compile_model``); this measures what that buys. For each IR given, both compiled models live in
ONE process and are called alternately (``--rounds`` rounds of ``--calls`` calls each, after
``--warmup`` calls), so host drift hits both alike; OpenVINO's threads do not spin between calls.
The ratio is the free-batch median over the static-shape median.

    python benchmarks/fastest_artifact.py --part latency --export-only --work runs/fastest_artifact
    python benchmarks/openvino_static_shapes.py runs/fastest_artifact/unpruned/openvino/model_int8-static.xml \
        runs/fastest_artifact/25pct_round_toNone/openvino/model_int8-static.xml

Writes ``benchmarks/results/openvino_static_shapes.{md,json}`` (rows by file name, merged with
earlier runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pqv_lightning.export.benchmark import summarize, time_calls
from pqv_lightning.export.host import host_description
from pqv_lightning.export.openvino_target import compile_ir
from pqv_lightning.fileio import atomic_write_text

OUT = Path(__file__).parent / "results"


def measure(path: str, shape: list[int], threads: int, rounds: int, calls: int, warmup: int) -> dict:
    feed = np.random.default_rng(0).random(shape, dtype=np.float32)
    requests = {"free batch": compile_ir(path, threads), "static shape": compile_ir(path, threads, shape)}
    requests = {k: (c, c.create_infer_request()) for k, c in requests.items()}  # keep each compiled model
    runs = {k: (lambda x, request=request: request.infer({0: x})) for k, (_, request) in requests.items()}
    for run in runs.values():
        time_calls(run, feed, warmup, 0)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name] += time_calls(run, feed, 0, calls)
    stats = {k: summarize(v) for k, v in times.items()}
    return {"stats": stats, "ratio": stats["free batch"]["median_ms"] / stats["static shape"]["median_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("irs", nargs="+", help="OpenVINO .xml files")
    ap.add_argument("--shape", type=int, nargs="+", default=[1, 3, 224, 224])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    for ir in args.irs:
        if not Path(ir).is_file() or Path(ir).suffix != ".xml":
            ap.error(f"{ir}: not an OpenVINO .xml file")
    path = OUT / "openvino_static_shapes.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    host = host_description()
    for ir in args.irs:
        key = "/".join(Path(ir).parts[-3:])
        data[key] = {
            **measure(ir, args.shape, args.threads, args.rounds, args.calls, args.warmup),
            "shape": args.shape,
            "threads": args.threads,
            "rounds": args.rounds,
            "calls": args.calls,
            "host": host,
        }
        atomic_write_text(path, json.dumps(data, indent=1))
    lines = [
        "OpenVINO IR compiled with a free batch dimension vs at a static shape; both in one process, called "
        "alternately; median ms (p90).",
        "",
        "| IR | host | shape | threads | free batch | static shape | free / static |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for key, row in data.items():
        f, s = row["stats"]["free batch"], row["stats"]["static shape"]
        lines.append(
            f"| {key} | {row['host']['cpu']} | {'x'.join(map(str, row['shape']))} | {row['threads']} | "
            f"{f['median_ms']:.2f} ({f['p90_ms']:.2f}) | {s['median_ms']:.2f} ({s['p90_ms']:.2f}) | "
            f"{row['ratio']:.2f}x |"
        )
    atomic_write_text(OUT / "openvino_static_shapes.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
