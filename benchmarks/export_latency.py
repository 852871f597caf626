"""Size, latency and memory of every precision x engine Lite Interpreter export of DeiT-base and
DeiT3-medium, unpruned and pruned by 9.375 % channels (the paper's headline configuration).

Random-init weights (no model hub here): latency and size do not depend on the values; fidelity is
reported as cosine similarity of the logits against the fp32 eager model on random images. Every
variant of one model is measured in the same process, with fixed threads, warm-up and repeats,
against that model's fp32 eager baseline measured in the same run.

    python benchmarks/export_latency.py                 # ~20 min on 2 cores
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
from pqv_lightning.models import paper_model
from pqv_lightning.export import ENGINES, PRECISIONS

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deit_base_patch16_224", "deit3_medium_patch16_224"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.09375])
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    ap.add_argument("--engines", nargs="+", default=[e for e in ENGINES if e in torch.backends.quantized.supported_engines])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
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
            try:
                manifest = export_mobile(
                    model, data[0][:1], MobileExportConfig(
                        precisions=args.precisions, engines=args.engines, output_dir=str(out), overwrite=True,
                        threads=args.threads, warmup=args.warmup, repeats=args.repeats, verify_batches=2,
                        calibration_batches=2, min_top1_agreement=0.0),
                    validation_data=data, calibration_data=data)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            base = manifest["baseline_fp32_eager"]["latency"]
            rows.append(dict(model=name, ratio=ratio, params=params, variant="fp32 eager", engine="-",
                             size_mb=None, median_ms=base["median_ms"], p90_ms=base["p90_ms"], speedup=1.0,
                             cosine=1.0, peak_rss_mb=None, model_mb=None))
            for a in manifest["artifacts"]:
                if a["status"] == "skipped":
                    continue
                rows.append(dict(model=name, ratio=ratio, params=params, variant=f"{a['precision']} .ptl",
                                 engine=a["engine"] or "-", size_mb=a["size_bytes"] / 2**20,
                                 median_ms=a["latency"]["median_ms"], p90_ms=a["latency"]["p90_ms"],
                                 speedup=a["latency"]["speedup_vs_fp32_eager"], cosine=a["verification"]["cosine"],
                                 peak_rss_mb=(a.get("memory") or {}).get("peak_rss_mb"),
                                 model_mb=(a.get("memory") or {}).get("load_and_inference_mb")))
            print(json.dumps(rows[-1]), flush=True)
    cmd = "python benchmarks/export_latency.py " + " ".join(
        f"--{k} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in vars(args).items() if k != "name")
    lines = [f"`{cmd}` — {platform.machine()}, torch {torch.__version__}, {args.threads} threads, batch 1, 224x224", "",
             "| model | pruned | params | variant | engine | size | latency median | p90 | speedup vs fp32 eager | cosine | peak RSS | of which model + inference |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['size_mb']:.1f} MB" if r["size_mb"] is not None else "-"
        mem = f"{r['peak_rss_mb']:.0f} MB" if r["peak_rss_mb"] is not None else "-"
        own = f"{r['model_mb']:.0f} MB" if r["model_mb"] is not None else "-"
        lines.append(f"| {r['model']} | {100 * r['ratio']:g} % | {r['params'] / 1e6:.1f} M | {r['variant']} | {r['engine']} | "
                     f"{size} | {r['median_ms']:.1f} ms | {r['p90_ms']:.1f} ms | {r['speedup']:.2f}x | "
                     f"{r['cosine']:.4f} | {mem} | {own} |")
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (OUT / f"{args.name}.json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
