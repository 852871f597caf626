"""Where an OpenVINO IR spends its time on this host: the CPU plugin's own per-node counters
(``PERF_COUNT``), summed by node type and kernel, for each IR given.

Each IR is compiled as ``OpenVINOTarget.load`` compiles it (static input shape, the IR's runtime
options, ``--threads`` threads, one stream, latency hint) plus ``PERF_COUNT``, warmed up, then called
``--calls`` times; a row is the mean time per call of one (node type, kernel) pair and its share.
The counters add a little time per node, so the median wall time per call is reported beside them;
use round-robins (``pqv bench``) to compare files, this to see why they differ.

    python benchmarks/headline.py --heads-ratios 0.25    # exports the files to runs/headline (and times them)
    python benchmarks/openvino_profile.py runs/headline/25pct/model_int8-static.xml \\
        runs/headline/25pct_heads/model_int8-static.xml

Writes ``benchmarks/results/openvino_profile.{md,json}`` (rows by file, merged with earlier runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from pqv_lightning.export.host import host_description
from pqv_lightning.export.openvino_target import compile_ir
from pqv_lightning.fileio import atomic_write_text

OUT = Path(__file__).parent / "results"


def profile(path: str, shape: list[int], threads: int, calls: int, warmup: int) -> dict:
    compiled = compile_ir(path, threads, shape, {"PERF_COUNT": True})
    request = compiled.create_infer_request()
    feed = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    for _ in range(warmup):
        request.infer({0: feed})
    totals: dict[tuple[str, str], float] = defaultdict(float)
    nodes: dict[tuple[str, str], int] = defaultdict(int)
    wall = []
    for _ in range(calls):
        start = time.perf_counter()
        request.infer({0: feed})
        wall.append(1e3 * (time.perf_counter() - start))
        for info in request.profiling_info:
            ms = info.real_time.total_seconds() * 1e3
            if ms > 0:
                key = (info.node_type, info.exec_type)
                totals[key] += ms / calls
                nodes[key] += 1
    total = sum(totals.values())
    rows = [
        {"node_type": t, "kernel": k, "ms": ms, "share": ms / total, "nodes": nodes[(t, k)] // calls}
        for (t, k), ms in sorted(totals.items(), key=lambda kv: -kv[1])
    ]
    return {
        "median_wall_ms": statistics.median(wall),
        "counted_ms": total,
        "rows": rows,
        "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").type_name,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("irs", nargs="+", help="OpenVINO .xml files")
    ap.add_argument("--shape", type=int, nargs="+", default=[1, 3, 224, 224])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--top", type=int, default=8, help="rows per file in the markdown table")
    args = ap.parse_args()
    for ir in args.irs:
        if not Path(ir).is_file() or Path(ir).suffix != ".xml":
            ap.error(f"{ir}: not an OpenVINO .xml file")
    for name in ("threads", "calls", "top"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} {getattr(args, name)}: must be >= 1")
    path = OUT / "openvino_profile.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    host = host_description()
    for ir in args.irs:
        key = "/".join(Path(ir).parts[-2:])
        data[key] = {
            **profile(ir, args.shape, args.threads, args.calls, args.warmup),
            "shape": args.shape,
            "threads": args.threads,
            "calls": args.calls,
            "host": host,
        }
        atomic_write_text(path, json.dumps(data, indent=1))
    lines = [
        "OpenVINO CPU plugin per-node counters (`PERF_COUNT`), mean ms per call by node type and kernel; "
        "`benchmarks/openvino_profile.py`.",
        "",
    ]
    for key, row in data.items():
        lines += [
            f"**{key}** ({row['host']['cpu']}, {'x'.join(map(str, row['shape']))}, {row['threads']} threads, "
            f"inference precision {row['inference_precision']}): median wall {row['median_wall_ms']:.2f} ms per "
            f"call, counters sum to {row['counted_ms']:.2f} ms.",
            "",
            "| node type | kernel | nodes | ms per call | share |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['node_type']} | {r['kernel']} | {r['nodes']} | {r['ms']:.2f} | {100 * r['share']:.1f} % |"
            for r in row["rows"][: args.top]
        ]
        lines.append("")
    atomic_write_text(OUT / "openvino_profile.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
