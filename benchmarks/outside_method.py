"""Issue 33: the outside measurement of the headline, next to ``pqv headline``, on the same host.

The outside method (as reported): DeiT-base with random weights pruned 25 % by
``prune_once(PruningConfig(importance="l2", pruning_ratio=0.25))``, exported by ``export_mobile`` to
``.pte``, ``.onnx`` and OpenVINO at int8-dynamic and int8-static (default ``pad_widths``); every file
and the unpruned fp32 eager timm model timed in a process of its own, round-robin, 5 rounds, batch 1,
224², 2 threads. This script does exactly that (``--rounds 5``), and in the same run times the fp32
eager baseline under the settings that could explain a 2x slower baseline, each in a fresh process,
alternating:

* ``pqv``: what every pqv timing worker does (``torch.no_grad``, ``torch.set_num_threads(2)``);
* ``grad``: autograd left on (``model(x)`` without ``no_grad``: a naive timing loop);
* ``inference_mode``: ``torch.inference_mode`` instead of ``no_grad``;
* ``denormals``: ``torch.set_flush_denormal(True)``;
* ``default-threads``: no ``set_num_threads`` (torch's own choice on this host);
* ``1-thread``: ``torch.set_num_threads(1)``.

The report is a side-by-side table with the host line (steal, clock, ISA). ``--headline DIR`` (a
pruned model's folder under a ``pqv headline --work`` folder, e.g. ``runs/headline/25pct``) puts
that run's int8 files into the same round-robin, labelled ``pqv headline | ...``: both methods'
files and the baseline measured in one run on one host.

    python benchmarks/outside_method.py                # ~25 min on 2 cores (export ~15 min)
    python benchmarks/outside_method.py --headline runs/headline/25pct
    python benchmarks/outside_method.py --report-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from pqv_lightning.export import MobileExportConfig, export_mobile
from pqv_lightning.export.benchmark import Candidate, round_robin
from pqv_lightning.export.host import cpu_count_text, host_description, host_label
from pqv_lightning.fileio import JsonCache, atomic_write_text
from pqv_lightning.hostcpu import cpu_times, steal_fraction
from pqv_lightning.models import create_vit
from pqv_lightning.pruning import PruningConfig, prune_once

OUT = Path(__file__).parent / "results"
SETTINGS = {
    "pqv": "torch.set_num_threads(2)\nctx = torch.no_grad()",
    "grad": "torch.set_num_threads(2)\nctx = contextlib.nullcontext()",
    "inference_mode": "torch.set_num_threads(2)\nctx = torch.inference_mode()",
    "denormals": "torch.set_num_threads(2)\ntorch.set_flush_denormal(True)\nctx = torch.no_grad()",
    "default-threads": "ctx = torch.no_grad()",
    "1-thread": "torch.set_num_threads(1)\nctx = torch.no_grad()",
}
BASELINE_SCRIPT = """
import contextlib, json, statistics, sys, time
import timm, torch
torch.manual_seed(0)
model = timm.create_model(sys.argv[1], pretrained=False).eval()
x = torch.randn(1, 3, 224, 224)
{setting}
with ctx:
    for _ in range(int(sys.argv[2])):
        model(x)
    times = []
    for _ in range(int(sys.argv[3])):
        t0 = time.perf_counter(); model(x); times.append(1e3 * (time.perf_counter() - t0))
print(json.dumps({{"median_ms": statistics.median(times), "threads": torch.get_num_threads()}}))
"""


def _export(args, cache: JsonCache) -> list[str]:
    done = cache.get("export")
    work = Path(args.work)
    if done and all((work / f).is_file() for f in done["files"]):
        return done["files"]
    torch.manual_seed(0)
    model = create_vit(args.model).eval()
    prune_once(model, PruningConfig(importance="l2", pruning_ratio=0.25))
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 3, 224, 224, generator=g) for _ in range(2)]
    manifest = export_mobile(
        model,
        data[0][:1],
        MobileExportConfig.files_only(
            work,
            precisions=["int8-dynamic", "int8-static"],
            formats=["pte", "onnx", "openvino"],
            threads=args.threads,
            warmup=3,
            repeats=20,
            verify_batches=8,
            calibration_batches=8,
        ),
        validation_data=data,
        calibration_data=data,
    )
    files = [a["file"] for a in manifest["artifacts"] if a["status"] == "ok"]
    cache.put("export", {"files": files})
    return files


def _kernels(args, cache: JsonCache, files: list[str]) -> None:
    """Caches the GEMM kernels OpenVINO's CPU plugin picks here for each IR of the outside method (AMX,
    VNNI, AVX2: what the outside run did not record): a compile per IR, nothing timed."""
    if cache.get("openvino_kernels") is None:
        from pqv_lightning.export.openvino_target import ir_gemm_kernels

        cache.put("openvino_kernels", ir_gemm_kernels(args.work, files, [1, 3, 224, 224], args.threads))


def saved_unpruned(work: str | Path, model: str) -> Path:
    """``work/unpruned.pt``: the unpruned fp32 model (random weights, seed 0) as the timing worker loads
    it (a ``torch.save``'d module), written the first time."""
    eager = Path(work) / "unpruned.pt"
    if not eager.is_file():
        torch.manual_seed(0)
        eager.parent.mkdir(parents=True, exist_ok=True)
        torch.save(create_vit(model).eval(), eager)
    return eager


def headline_files(folder: Path) -> list[Candidate]:
    """The int8 files a ``pqv headline`` export wrote into ``folder`` (its manifests, one per subfolder)."""
    manifests = sorted(folder.glob("*/manifest.json")) + sorted(folder.glob("manifest.json"))
    if not manifests:
        raise SystemExit(
            f"--headline {folder}: no manifest.json in it or its subfolders (a pqv headline pruned folder, e.g. runs/headline/25pct)"
        )
    found = []
    for manifest in manifests:
        sub = manifest.parent.relative_to(folder)
        for a in json.loads(manifest.read_text())["artifacts"]:
            if a["status"] == "ok" and a["precision"].startswith("int8") and "int4" not in a["precision"]:
                name = (sub / a["file"]).as_posix()
                found.append(Candidate(f"pqv headline | {name}", str(manifest.parent / a["file"])))
    return found


def _baselines(args) -> dict[str, list[float]]:
    """Each setting's median ms, one fresh process per setting and round, settings alternating."""
    found: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, setting in SETTINGS.items():
            code = BASELINE_SCRIPT.format(setting=setting)
            out = subprocess.run(
                [sys.executable, "-c", code, args.model, str(args.warmup), str(args.calls)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            found[name].append(json.loads(out.strip().splitlines()[-1])["median_ms"])
    return found


def _report(args, cache: JsonCache) -> str:
    run = cache.get("run")
    if run is None:
        return "nothing measured yet"
    stats, base = run["stats"], run["baselines"]
    eager = stats["unpruned | fp32 eager"]["median_ms"]
    command = "python benchmarks/outside_method.py" + (f" --headline {run['headline']}" if run.get("headline") else "")
    lines = [
        f"`{command}` — {host_label(run['host'])}, {cpu_count_text(run['host'])}, torch ISA {run['host'].get('torch_isa')}, "
        f"clock {run['host'].get('mhz', '-')} MHz, steal during the round-robin "
        + ("-" if run["steal"] is None else f"{100 * run['steal']:.1f} %")
        + f"; {run.get('rounds', args.rounds)} rounds x {run.get('calls', args.calls)} calls, batch 1, 224², {args.threads} threads.",
        "",
        "| file (25 % pruned; `25%`: `prune_once` l2, default pad; `pqv headline`: its files) | median ms | x unpruned fp32 eager |",
        "|---|---:|---:|",
        f"| unpruned fp32 eager (pqv worker) | {eager:.1f} | 1.00x |",
    ]
    for label, s in sorted(stats.items(), key=lambda kv: kv[1]["median_ms"]):
        if label != "unpruned | fp32 eager":
            lines.append(f"| {label} | {s['median_ms']:.1f} | {eager / s['median_ms']:.2f}x |")
    lines += [
        "",
        "| fp32 eager baseline setting (fresh process each) | median ms over rounds | range ms | vs `pqv` |",
        "|---|---:|---:|---:|",
    ]
    ref = statistics.median(base["pqv"])
    for name, values in base.items():
        mid = statistics.median(values)
        lines.append(f"| {name} | {mid:.1f} | {min(values):.1f}–{max(values):.1f} | {mid / ref:.2f}x |")
    kernels = cache.get("openvino_kernels")
    if kernels:
        lines += [
            "",
            "OpenVINO's GEMM kernels here (layers per IR): "
            + "; ".join(f"{f}: " + ", ".join(f"{k} x{n}" for k, n in per.items()) for f, per in kernels.items())
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_base_patch16_224")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/outside_method")
    ap.add_argument("--name", default="outside_method")
    ap.add_argument("--headline", type=Path, help="a pqv headline pruned folder whose int8 files join the round-robin")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    cache = JsonCache(OUT / f"{args.name}.json")
    if not args.report_only:
        files = _export(args, cache)
        _kernels(args, cache, files)
        candidates = [Candidate("unpruned | fp32 eager", str(saved_unpruned(args.work, args.model)))]
        candidates += [Candidate(f"25% | {f}", str(Path(args.work) / f)) for f in files]
        candidates += headline_files(args.headline) if args.headline else []
        before = cpu_times()
        stats = round_robin(
            candidates,
            [1, 3, 224, 224],
            threads=args.threads,
            rounds=args.rounds,
            warmup=args.warmup,
            calls=args.calls,
            baseline="unpruned | fp32 eager",
        )
        steal = steal_fraction(before, cpu_times())
        headline = None if args.headline is None else args.headline.as_posix()
        run = {"stats": stats, "baselines": _baselines(args), "host": host_description(), "steal": steal}
        cache.put("run", {**run, "headline": headline, "rounds": args.rounds, "calls": args.calls})
    report = _report(args, cache)
    atomic_write_text(OUT / f"{args.name}.md", report)
    print(report)


if __name__ == "__main__":
    main()
