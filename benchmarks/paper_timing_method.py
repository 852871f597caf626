"""The paper's latency method next to ours, on the same files in the same processes.

PQV-Mobile's released ``quant.py`` loads each ``.ptl`` with ``torch.jit.load`` and reports
``torch.autograd.profiler`` ``self_cpu_time_total`` of ONE un-warmed call, in this order: unpruned
fp32, unpruned int8, pruned int8 (dynamic, Linear only, x86 engine); its headline 7.18x is the
first over the last. This script exports those three files with ``MobileExport``'s ``.ptl`` path, then
in each of ``--trials`` fresh processes does exactly that, and afterwards times the same loaded
modules our way (warm-up, then the median of ``--repeats`` wall-clock calls). Both ratios come from
the same processes, so the difference is the method alone.

    python benchmarks/paper_timing_method.py   # writes benchmarks/results/paper_timing_method.{md,json}
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pqv_lightning.export.benchmark import summarize, time_calls

OUT = Path(__file__).parent / "results"
ORDER = ("unpruned fp32", "unpruned int8", "pruned int8")


def child(paths: list[str], threads: int, warmup: int, repeats: int) -> dict:
    """One process: the paper's single profiled first call per model, in the paper's order, then ours."""
    torch.set_num_threads(threads)
    torch.backends.quantized.engine = "x86"
    torch.manual_seed(0)
    img = torch.randn(1, 3, 224, 224)
    out = {}
    modules = {}
    for label, path in zip(ORDER, paths):
        module = torch.jit.load(path)
        modules[label] = module
        t0 = time.perf_counter()
        with torch.autograd.profiler.profile() as prof:  # the paper passes use_cuda=False (removed since)
            module(img)
        out[label] = {
            "paper_ms": prof.self_cpu_time_total / 1000,
            "first_call_wall_ms": 1e3 * (time.perf_counter() - t0),
        }
    for label, module in modules.items():  # ours: warm-up, then the median of wall-clock calls
        out[label]["warm_median_ms"] = summarize(time_calls(module, img, warmup, repeats))["median_ms"]
    return out


def export(model_name: str, ratio: float, work: Path, threads: int) -> list[str]:
    from pqv_lightning.export import MobileExportConfig, export_mobile
    from pqv_lightning.models import paper_model

    x = torch.randn(1, 3, 224, 224)
    files = []
    for label, r, precision in (
        ("unpruned", 0.0, "fp32"),
        ("unpruned", 0.0, "int8-dynamic"),
        ("pruned", ratio, "int8-dynamic"),
    ):
        model = paper_model(model_name, r)
        out = work / f"{label}_{precision}"
        manifest = export_mobile(
            model,
            x,
            MobileExportConfig.files_only(
                out,
                precisions=[precision],
                formats=["ptl"],
                engines=["x86"],
                threads=threads,
                verify_batches=1,
                calibration_batches=8,
            ),
            validation_data=[x],
        )
        files.append(str(out / manifest["artifacts"][0]["file"]))
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_base_patch16_224")
    p.add_argument("--ratio", type=float, default=0.09375)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trials", type=int, default=5, help="fresh processes")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--child", nargs=3, metavar="PTL", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.warmup, args.repeats)))
        return
    with tempfile.TemporaryDirectory(prefix="paper-method-") as work:
        files = export(args.model, args.ratio, Path(work), args.threads)
        trials = []
        for _ in range(args.trials):
            run = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    *files,
                    "--threads",
                    str(args.threads),
                    "--warmup",
                    str(args.warmup),
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
            )
            if run.returncode:
                sys.exit(f"child process failed:\n{run.stderr[-3000:]}")
            trials.append(json.loads(run.stdout.strip().splitlines()[-1]))
    cmd = (
        f"python benchmarks/paper_timing_method.py --model {args.model} --ratio {args.ratio} --threads "
        f"{args.threads} --trials {args.trials} --warmup {args.warmup} --repeats {args.repeats}"
    )
    host = f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads, batch 1, 224x224"

    def span(values):
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    lines = [
        f"`{cmd}` — {host}",
        "",
        f"{args.model}; pruned = {100 * args.ratio:g} % of every prunable dimension (l2, round_to=2); int8 = "
        f"dynamic Linear-only, x86 engine; `.ptl` loaded with `torch.jit.load` as in the paper's `quant.py`. "
        f"Median (min-max) over {args.trials} fresh processes.",
        "",
        "| model | paper method: profiler self CPU, 1st call (ms) | 1st call wall clock (ms) | ours: warm median (ms) |",
        "|---|---|---|---|",
    ]
    for label in ORDER:
        lines.append(
            f"| {label} | {span([t[label]['paper_ms'] for t in trials])} | "
            f"{span([t[label]['first_call_wall_ms'] for t in trials])} | "
            f"{span([t[label]['warm_median_ms'] for t in trials])} |"
        )
    ratios = {
        m: [t["unpruned fp32"][k] / t["pruned int8"][k] for t in trials]
        for m, k in (("paper", "paper_ms"), ("wall", "first_call_wall_ms"), ("ours", "warm_median_ms"))
    }
    lines += [
        "",
        "| unpruned fp32 / pruned int8 | paper method | 1st call wall clock | ours |",
        "|---|---|---|---|",
        f"| speedup | {span(ratios['paper'])}x | {span(ratios['wall'])}x | {span(ratios['ours'])}x |",
    ]
    OUT.mkdir(exist_ok=True)
    for name, text in (
        ("paper_timing_method.md", "\n".join(lines) + "\n"),
        (
            "paper_timing_method.json",
            json.dumps({"command": cmd, "host": host, "trials": trials, "ratios": ratios}, indent=1),
        ),
    ):
        tmp = OUT / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(OUT / name)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
