"""Size, latency and memory of every precision x engine Lite Interpreter export of DeiT-base and
DeiT3-medium, unpruned and pruned by 9.375 % channels (the paper's headline configuration).

Random-init weights (no model hub here): latency and size do not depend on the values; fidelity is
reported as cosine similarity of the logits against the fp32 eager model on random images. Every
file and the fp32 eager model are timed in fresh processes, round-robin
(:func:`pqv_lightning.export.benchmark.round_robin`, the method of ``pqv bench`` and the sweep), so
no runtime's thread pool disturbs another; the speedups are against that model's fp32 eager
baseline from the same rounds. (Until 2026-11 this script timed in-process; those numbers are gone.)

    python benchmarks/export_latency.py                 # ~30 min on 2 cores
    python benchmarks/export_latency.py --models deit_small_patch16_224 --repeats 5
"""

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from pqv_lightning import MobileExportConfig, export_mobile
from pqv_lightning.export import ENGINES, PRECISIONS
from pqv_lightning.export.benchmark import Candidate, round_robin
from pqv_lightning.export.host import host_description
from pqv_lightning.models import paper_model

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deit_base_patch16_224", "deit3_medium_patch16_224"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.09375])
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    ap.add_argument(
        "--engines", nargs="+", default=[e for e in ENGINES if e in torch.backends.quantized.supported_engines]
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="export_latency")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(2)]
    rows = []
    for name in args.models:
        for ratio in args.ratios:
            model = paper_model(name, ratio)
            params = sum(p.numel() for p in model.parameters())
            out = Path(tempfile.mkdtemp(prefix="pqv-export-"))
            try:  # export + verify here (one timed call: the manifest's in-process latency is not used)
                manifest = export_mobile(
                    model,
                    data[0][:1],
                    MobileExportConfig.files_only(
                        out,
                        precisions=args.precisions,
                        engines=args.engines,
                        threads=args.threads,
                        measure_memory=True,
                    ),
                    validation_data=data,
                    calibration_data=data,
                )
                torch.save(model, out / "eager.pt")
                ok = [a for a in manifest["artifacts"] if a["status"] != "skipped"]
                candidates = [Candidate("fp32 eager", str(out / "eager.pt"))]
                candidates += [Candidate(a["file"], str(out / a["file"]), a["engine"]) for a in ok]
                stats = round_robin(
                    candidates,
                    [1, 3, 224, 224],
                    threads=args.threads,
                    rounds=args.rounds,
                    warmup=args.warmup,
                    calls=args.repeats,
                    baseline="fp32 eager",
                )
            finally:
                shutil.rmtree(out, ignore_errors=True)
            base = stats["fp32 eager"]
            rows.append(
                dict(
                    model=name,
                    ratio=ratio,
                    params=params,
                    variant="fp32 eager",
                    engine="-",
                    size_mb=None,
                    median_ms=base["median_ms"],
                    p90_ms=base["p90_ms"],
                    speedup=1.0,
                    cosine=1.0,
                    peak_rss_mb=base["peak_rss_mb"],
                    model_mb=base["load_and_inference_mb"],
                )
            )
            for a in ok:
                st = stats[a["file"]]
                rows.append(
                    dict(
                        model=name,
                        ratio=ratio,
                        params=params,
                        variant=f"{a['precision']} .ptl",
                        engine=a["engine"] or "-",
                        size_mb=a["size_bytes"] / 2**20,
                        median_ms=st["median_ms"],
                        p90_ms=st["p90_ms"],
                        speedup=st["speedup_vs_baseline"],
                        cosine=a["verification"]["cosine"],
                        peak_rss_mb=st["peak_rss_mb"],
                        model_mb=st["load_and_inference_mb"],
                    )
                )
            print(json.dumps(rows[-1]), flush=True)
    cmd = "python benchmarks/export_latency.py " + " ".join(
        f"--{k} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))
        for k, v in vars(args).items()
        if k != "name"
    )
    host = host_description()
    lines = [
        f"`{cmd}` — {host['cpu']} ({platform.machine()}, {', '.join(host['isa'])}), torch {torch.__version__}, "
        f"{args.threads} threads, batch 1, 224x224; median over {args.rounds} rounds x {args.repeats} calls, "
        "every candidate in a fresh process, round-robin",
        "",
        "| model | pruned | params | variant | engine | size | latency median | p90 | speedup vs fp32 eager | cosine | peak RSS | of which model + inference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = f"{r['size_mb']:.1f} MB" if r["size_mb"] is not None else "-"
        mem = f"{r['peak_rss_mb']:.0f} MB" if r["peak_rss_mb"] is not None else "-"
        own = f"{r['model_mb']:.0f} MB" if r["model_mb"] is not None else "-"
        lines.append(
            f"| {r['model']} | {100 * r['ratio']:g} % | {r['params'] / 1e6:.1f} M | {r['variant']} | {r['engine']} | "
            f"{size} | {r['median_ms']:.1f} ms | {r['p90_ms']:.1f} ms | {r['speedup']:.2f}x | "
            f"{r['cosine']:.4f} | {mem} | {own} |"
        )
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (OUT / f"{args.name}.json").write_text(json.dumps({"command": cmd, "host": host, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
