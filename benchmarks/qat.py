"""int4 and int8 weights after pruning, post-training vs quantization-aware training (issue 30).

For each channel ratio and seed, the bundled Fashion-MNIST ViT is fine-tuned with the default recipe
(256 optimizer steps, 4 pruning events with reconstruction in the first quarter, distillation from
the unpruned network; ``round_to=32`` so that int4 groups of 32 divide every width) three ways,
same total step budget:

* ``ptq``: the recipe as it is; then the trained network is measured in fp32 and quantized
  post-training to int8 weights (``int8-dynamic-int8-weight``) and to int4 weights
  (``int8-dynamic-int4-weight``, groups of 32);
* ``qat-int4`` / ``qat-int8``: the same recipe with ``QuantizationAwareTraining`` for that scheme,
  from right after the last pruning event to the end.

Accuracy is top-1 on all 10,000 test images. A quantized network is evaluated as torchao's
fake-quantized network, which computes exactly what the scheme's post-training quantization (and
the ``.pte`` file lowered from it, up to float rounding) computes (tests/test_qat.py checks both).
With ``--export``, the first seed's networks of each ratio are exported — ``.pte`` fp32, the pt2e
``int8-dynamic`` and both torchao schemes; ``.onnx`` and OpenVINO fp32, ``int8-dynamic`` and
``int4-weight`` (int4 weight-only); a QAT network at its scheme only — verified, timed round-robin
in fresh processes and their peak inference memory measured: file size, latency and memory per file.
Each trained network's state is kept in ``benchmarks/results/qat_networks/`` (not in git) so that
``--export`` can be run after training.

Every finished (ratio, seed, arm) is cached in ``benchmarks/results/qat.json``: the script resumes
where it stopped; ``--report-only`` writes ``qat.md`` from what finished.

    python benchmarks/qat.py --ratios 0.5 0.25 --seeds 0 1 2 --export
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from pqv_lightning import QuantizationAwareTraining
from pqv_lightning.apps.recipes import default_checkpoint, evaluate, finetune_with_pruning, recipe_settings
from pqv_lightning.data import FashionMNISTDataModule
from pqv_lightning.export import MobileExportConfig, export_mobile
from pqv_lightning.export.host import host_description, host_label
from pqv_lightning.export.qat import prepare_qat_
from pqv_lightning.fileio import atomic_write_text, file_digest
from pqv_lightning.settings import torch_threads

OUT = Path(__file__).parent / "results"
TEST_IMAGES = 10_000
INT4, INT8W, INT4W = "int8-dynamic-int4-weight", "int8-dynamic-int8-weight", "int4-weight"
NETWORKS = OUT / "qat_networks"
ARMS = {"ptq": None, "qat-int4": INT4, "qat-int8": INT8W}
ROUND_TO = 32


class _Keep(pl.Callback):
    """Keeps the trained network when fit ends."""

    def __init__(self) -> None:
        self.network: torch.nn.Module | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.network = pl_module.model


def _settings(ratio: float) -> dict[str, Any]:
    settings = recipe_settings("default")
    settings["pruning_kwargs"] = {**settings.get("pruning_kwargs", {}), "round_to": ROUND_TO}
    return {**settings, "pruning_ratio": ratio}


def _quantized_accuracy(network: torch.nn.Module, scheme: str, dm: FashionMNISTDataModule) -> float:
    fake = copy.deepcopy(network)
    prepare_qat_(fake, scheme)
    return evaluate(fake, dm)


def run_arm(ckpt: Path, ratio: float, seed: int, arm: str) -> tuple[dict[str, Any], torch.nn.Module]:
    keep = _Keep()
    extra: list[pl.Callback] = [keep]
    if ARMS[arm] is not None:
        extra.append(QuantizationAwareTraining(scheme=ARMS[arm]))
    result = finetune_with_pruning(ckpt, label=arm, seed=seed, extra_callbacks=extra, **_settings(ratio))
    assert keep.network is not None
    row = asdict(result)
    row["widths"] = sorted(
        {
            (n.rsplit(".", 1)[-1], m.in_features)
            for n, m in keep.network.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
    )
    if arm == "ptq":
        dm = FashionMNISTDataModule(seed=seed)
        row["accuracy"] = {
            "fp32": result.test_acc,
            INT8W: _quantized_accuracy(keep.network, INT8W, dm),
            INT4: _quantized_accuracy(keep.network, INT4, dm),
        }
    else:
        row["accuracy"] = {ARMS[arm]: result.test_acc}  # the fake-quantized network: what its file computes
    return row, keep.network


def export_arm(network: torch.nn.Module, arm: str, threads: int) -> dict[str, Any]:
    dm = FashionMNISTDataModule(seed=0)
    dm.setup("fit")
    val = [batch for _, batch in zip(range(4), dm.val_dataloader())]
    runs = (
        [(["pte"], ["fp32", "int8-dynamic", INT8W, INT4]), (["onnx", "openvino"], ["fp32", "int8-dynamic", INT4W])]
        if arm == "ptq"
        else [(["pte"], [ARMS[arm]])]
    )
    artifacts: list[dict[str, Any]] = []
    manifest: dict[str, Any] = {}
    for formats, precisions in runs:  # .pte and the others apart: each config's precisions run in all its formats
        with tempfile.TemporaryDirectory() as out:
            config = MobileExportConfig(
                precisions=precisions, formats=formats, output_dir=out, threads=threads, rank="round-robin"
            )
            manifest = export_mobile(network, torch.randn(1, 1, 32, 32), config, validation_data=val)
        artifacts += [
            {**a, "ranked": a.get("latency_round_robin"), "run_baseline_ms": _baseline(manifest)}
            for a in manifest["artifacts"]
        ]
    return {
        "from_qat": manifest.get("qat", {}).get("matches", []),
        "files": [
            {
                "format": a["format"],
                "precision": a["precision"],
                "status": a["status"],
                "size_bytes": a.get("size_bytes"),
                "latency": a.get("latency"),
                "ranked": a["ranked"],
                "baseline_ms": a["run_baseline_ms"],
                "memory": a.get("memory"),
                "verification": a.get("verification"),
            }
            for a in artifacts
        ],
    }


def _baseline(manifest: dict[str, Any]) -> float | None:
    base = manifest["baseline_fp32_eager"]
    return (base.get("latency_round_robin") or base["latency"]).get("median_ms")


def _stats(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread} %"


def report(cache: dict[str, Any], ratios: list[float], seeds: list[int], command: str) -> str:
    se = 100 * math.sqrt(0.9 * 0.1 / TEST_IMAGES)
    hosts = sorted({r["host"] for r in cache.values()})
    lines = [
        f"`{command}` — {'; '.join(hosts)}; top-1 on all {TEST_IMAGES:,} test images (standard error of one "
        f"accuracy near 90 %: {se:.2f} pt, of a difference of two: {se * math.sqrt(2):.2f} pt); ± is the std over "
        "seeds. int8 / int4 rows are the fake-quantized networks (exactly the scheme's post-training "
        "quantization, see the script's docstring).",
        "",
        "| channel ratio | widths (in) | seeds | fp32 | int8 PTQ | int8 QAT | int4 PTQ | int4 QAT | int4 loss PTQ → QAT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ratio in ratios:
        rows = {arm: [cache[k] for s in seeds if (k := _key(ratio, s, arm)) in cache] for arm in ARMS}
        ptq, q4, q8 = rows["ptq"], rows["qat-int4"], rows["qat-int8"]
        if not ptq:
            continue
        fp32 = [100 * r["accuracy"]["fp32"] for r in ptq]
        p8 = [100 * r["accuracy"][INT8W] for r in ptq]
        p4 = [100 * r["accuracy"][INT4] for r in ptq]
        a4 = [100 * r["accuracy"][INT4] for r in q4]
        a8 = [100 * r["accuracy"][INT8W] for r in q8]
        loss = (
            f"{statistics.mean(fp32) - statistics.mean(p4):.2f} → {statistics.mean(fp32) - statistics.mean(a4):.2f} pt"
            if a4
            else "-"
        )
        widths = ", ".join(f"{n} {w}" for n, w in ptq[0]["widths"] if n != "head")
        lines.append(
            f"| {ratio:g} | {widths} | {len(ptq)}/{len(q4)}/{len(q8)} | {_stats(fp32)} | {_stats(p8)} | "
            f"{_stats(a8) if a8 else '-'} | {_stats(p4)} | {_stats(a4) if a4 else '-'} | {loss} |"
        )
    exported = [(k, r) for k, r in cache.items() if r.get("export")]
    if exported:
        lines += [
            "",
            "Files (first seed): size, latency ranked round-robin with each file in a process of its own (median, "
            "batch 1), peak resident memory of inference (a fresh process per file).",
            "",
            "| channel ratio | network | format | precision | status | size | vs fp32 file | latency | vs fp32 eager | "
            "peak memory |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _, r in sorted(exported, key=lambda kr: (kr[1]["pruning_ratio"], kr[1]["label"])):
            files = r["export"]["files"]
            twin = cache.get(_key(r["pruning_ratio"], r["seed"], "ptq"), {}).get("export", {})
            fp32_sizes = {  # a QAT network's file is compared with its PTQ twin's fp32 file
                f.get("format", "pte"): f["size_bytes"] for f in twin.get("files", []) if f["precision"] == "fp32"
            }
            for f in files:
                fp32_size = fp32_sizes.get(f.get("format", "pte"))
                lat = (f.get("ranked") or f.get("latency") or {}) if f["status"] == "ok" else {}
                size = f.get("size_bytes")
                mem = (f.get("memory") or {}).get("peak_rss_mb")
                lines.append(
                    f"| {r['pruning_ratio']:g} | {r['label']} | {f.get('format', 'pte')} | {f['precision']} | {f['status']} | "
                    + (f"{size / 2**20:.2f} MB" if size else "-")
                    + " | "
                    + (f"{size / fp32_size:.3f}x" if size and fp32_size else "-")
                    + " | "
                    + (f"{lat['median_ms']:.2f} ms" if "median_ms" in lat else "-")
                    + " | "
                    + (
                        f"{speedup:.2f}x"
                        if (speedup := lat.get("speedup_vs_baseline", lat.get("speedup_vs_fp32_eager")))
                        else "-"
                    )
                    + " | "
                    + (f"{mem:.0f} MB" if mem else "-")
                    + " |"
                )
    return "\n".join(lines) + "\n"


def _key(ratio: float, seed: int, arm: str) -> str:
    return f"{ratio:g}/{seed}/{arm}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--export", action="store_true", help="export, verify and time the first seed's networks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="qat")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    ckpt = Path(default_checkpoint())
    digest = file_digest(ckpt)
    cache_file = OUT / f"{args.name}.json"
    saved = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    cache: dict[str, Any] = saved.get("rows", {}) if saved.get("checkpoint") == digest else {}
    host = host_description()
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = " ".join(["python benchmarks/qat.py", *shown])
    with torch_threads(args.threads):
        for seed in args.seeds:  # seed-major: every (ratio, arm) gets one seed before any gets a second
            for ratio in args.ratios:
                for arm in args.arms:
                    k = _key(ratio, seed, arm)
                    want_export = args.export and seed == args.seeds[0]
                    if args.report_only or (k in cache and (not want_export or "export" in cache[k])):
                        continue
                    saved_network = NETWORKS / f"{k.replace('/', '_')}.pt"
                    if k in cache and saved_network.is_file():  # trained before: export it
                        row, network = cache[k], torch.load(saved_network, weights_only=False)
                    else:
                        row, network = run_arm(ckpt, ratio, seed, arm)
                        row.update(seed=seed, host=host_label(host), isa=host["isa"], threads=args.threads)
                        NETWORKS.mkdir(parents=True, exist_ok=True)
                        torch.save(network, saved_network)
                    if want_export:
                        row["export"] = export_arm(network, arm, args.threads)
                    cache[k] = row
                    atomic_write_text(cache_file, json.dumps({"checkpoint": digest, "rows": cache}, indent=1))
                    print(f"{k}: {json.dumps(row['accuracy'])} ({row['seconds']:.0f} s)", flush=True)
    text = report(cache, args.ratios, args.seeds, command)
    atomic_write_text(OUT / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
