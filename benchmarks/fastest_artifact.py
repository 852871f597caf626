"""The fastest verified artifact on this host: every runtime and option, kernel-friendly widths, one run.

Two parts (``--part``), each cached row by row in ``benchmarks/results/<name>.json`` so an
interrupted run resumes; the Markdown report is rewritten from the cache after every row:

* ``fidelity`` — int8 attention matmuls (``int8-dynamic-attention``, ONNX Runtime) against plain
  ``int8-dynamic``: top-1 agreement with the fp32 model and accuracy on Fashion-MNIST test images
  (the bundled pretrained ViT), and logit cosine of random-init DeiT-base on random images.
  Thresholds of the issue: agreement >= 99 %, cosine >= 0.995.
* ``latency`` — DeiT-base (random weights; latency does not depend on the values), unpruned and with
  25 % and 9.375 % (the paper's own configuration) of the channels pruned by ``prune_once`` (l2)
  under each ``round_to`` width rule and head rule (``--head-rules``: ``dims`` inside every head,
  ``heads`` whole heads): fp32 eager and every int8 artifact of every runtime
  (``.pte`` ExecuTorch/XNNPACK, ``.onnx`` ONNX Runtime incl. int8 attention, OpenVINO IR). Exports
  are kept in ``--work`` (resumable); then **all** candidates and the unpruned fp32 eager baseline
  are timed in one round-robin, each in a fresh process (:func:`pqv_lightning.export.benchmark.round_robin`).
  The report gives the ratio to the unpruned fp32 eager model, to the best ONNX Runtime int8 file
  of the same model, and the share of this host's measured int8 GEMM throughput.

    python benchmarks/fastest_artifact.py --part fidelity                   # ~5 min on 2 cores
    python benchmarks/fastest_artifact.py --part latency                    # ~60 min on 2 cores
    python benchmarks/fastest_artifact.py --part latency --export-only      # the exports only (timing later)
    python benchmarks/fastest_artifact.py --part latency --report-only
    python benchmarks/fastest_artifact.py --part latency --head-rules dims heads --round-to 0 64 \
        --name fastest_artifact_heads                                       # whole heads vs head dims
    python benchmarks/fastest_artifact.py --part latency --ratios 0.09375 0.25 --round-to 0 --pad none 64 \
        --formats onnx openvino --name fastest_artifact_padding             # exact widths, padded at export

Every export here sets ``pad_widths`` itself: ``--pad none`` (the default, and the first runs) exports
the pruned widths as they are, for every format; ``--pad 64`` pads the model (same function) before
every format exports it, so the table shows what padding does to each runtime.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch

from pqv_lightning.export import PRECISIONS, TARGETS, MobileExportConfig, export_mobile, pad_widths
from pqv_lightning.export.benchmark import Candidate, round_robin
from pqv_lightning.export.host import cpu_count_text, gemm_throughput, host_description
from pqv_lightning.fileio import JsonCache, atomic_write_text
from pqv_lightning.models import paper_model
from pqv_lightning.pruning import count_macs, count_params

OUT = Path(__file__).parent / "results"
INT8 = ["int8-dynamic", "int8-static", "int8-dynamic-attention"]


Cache = JsonCache  # the resumable cache of every benchmark here (pqv_lightning.fileio)


# ---------------------------------------------------------------------------------------------- fidelity
def _fmnist_rows(args) -> list[dict[str, Any]]:
    from pqv_lightning.apps.recipes import default_checkpoint
    from pqv_lightning.data import FashionMNISTDataModule
    from pqv_lightning.models import load_vit_checkpoint

    model, _ = load_vit_checkpoint(default_checkpoint())
    dm = FashionMNISTDataModule(data_dir=args.data_dir, batch_size=256, test_subset=args.test_images)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    return _fidelity(model, batches, "vit_tiny_fmnist (pretrained, Fashion-MNIST test images)", args)


def _deit_rows(args) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 224, 224, generator=g) for _ in range(4)]
    return _fidelity(
        paper_model("deit_base_patch16_224"), batches, "deit_base_patch16_224 (random init, random images)", args
    )


def _fidelity(model, batches, label: str, args) -> list[dict[str, Any]]:
    import tempfile

    example = (batches[0] if isinstance(batches[0], torch.Tensor) else batches[0][0])[:1]
    with tempfile.TemporaryDirectory(prefix="pqv-fidelity-") as out:
        manifest = export_mobile(
            model,
            example,
            MobileExportConfig.files_only(
                out,
                precisions=["int8-dynamic", "int8-dynamic-attention"],
                formats=["onnx"],
                threads=args.threads,
                warmup=1,
                repeats=3,
                verify_batches=len(batches),
                calibration_batches=8,
            ),
            validation_data=batches,
        )
    rows = []
    for a in manifest["artifacts"]:
        v = a["verification"]
        rows.append(
            {
                "model": label,
                "precision": a["precision"],
                "samples": v["samples"],
                "top1_agreement": v["top1_agreement"],
                "cosine": v["cosine"],
                "top1_accuracy": v.get("top1_accuracy"),
                "status": a["status"],
                "reason": a.get("reason"),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------- latency
def _input_shape(model) -> list[int]:
    return [model.patch_embed.proj.in_channels, *model.patch_embed.img_size]


def _variants(args) -> list[tuple[str, float, int | None, bool, str]]:
    """(key, ratio, round_to, prune_heads, pad): the unpruned model, then every pruning ratio x head rule
    x width rule (``dims``: dimensions inside every head, the keys of the first runs; ``heads``: whole
    heads) x export padding (``none``: the keys of the first runs; or a multiple)."""
    out = [("unpruned", 0.0, None, False, "none")]
    for ratio in args.ratios:
        for rule in args.head_rules:
            for r in args.round_to:
                for pad in args.pad:
                    name = "" if rule == "dims" else "heads "
                    suffix = "" if pad == "none" else f" pad={pad}"
                    out.append(
                        (f"{100 * ratio:g}% {name}round_to={r or None}{suffix}", ratio, r or None, rule == "heads", pad)
                    )
    return out


def _folder(work: Path, key: str) -> Path:
    return work / key.replace(" ", "_").replace("%", "pct").replace("=", "")


def _widths(model) -> dict[str, int]:
    attn = model.blocks[0].attn
    return {
        "embed_dim": model.patch_embed.proj.out_channels,
        "head_dim": attn.qkv.out_features // (3 * attn.num_heads),
        "num_heads": attn.num_heads,
        "mlp_hidden": model.blocks[0].mlp.fc1.out_features,
    }


def _export_variant(
    key: str,
    ratio: float,
    round_to: int | None,
    prune_heads: bool,
    pad: str,
    args,
    work: Path,
    cache: Cache,
    seen: dict[str, str],
) -> dict[str, Any]:
    """Export every format x int8 precision of one variant (kept in ``work``); cached. A width rule that
    gives the same widths as an earlier variant of the same ratio is recorded as ``same_as`` it; so is
    a padded variant whose widths padding does not change (``pad`` pads at export, with
    ``MobileExportConfig.pad_widths``; its fp32 eager candidate is the padded model)."""
    done = cache.get(f"export/{key}")
    folder = _folder(work, key)
    if done and "same_as" in done and done["same_as"] in seen.values():
        return done
    if (
        done
        and "same_as" not in done
        and all((folder / a["file"]).is_file() for a in done["artifacts"] if a["status"] == "ok")
    ):
        seen.setdefault(json.dumps([ratio, _widths_of(done)]), key)
        return done
    model = paper_model(args.model, ratio, round_to=round_to, prune_heads=prune_heads)
    macs = count_macs(model, torch.randn(1, *_input_shape(model)))  # of the pruned model, before any padding
    if pad != "none":  # before every format (the eager candidate too), unlike pad_widths="auto" (OpenVINO only)
        pad_widths(model, int(pad))
    widths = _widths(model)
    twin = seen.get(json.dumps([ratio, widths]))
    if twin is not None:
        row = {"key": key, "ratio": ratio, "round_to": round_to, "same_as": twin, **widths}
        cache.put(f"export/{key}", row)
        return row
    shape = _input_shape(model)
    example = torch.randn(1, *shape)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, *shape, generator=g) for _ in range(2)]
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model, folder / "eager.pt")
    artifacts = []
    for fmt in [f for f in args.formats if TARGETS[f].missing() is None]:
        precisions = [p for p in INT8 if TARGETS[fmt].supports(PRECISIONS[p])]
        if ratio == 0 and not args.unpruned_artifacts:
            break
        manifest = export_mobile(
            model,
            example,
            MobileExportConfig.files_only(
                folder / fmt,
                precisions=precisions,
                formats=[fmt],
                threads=args.threads,
                pad_widths=None,
            ),
            validation_data=data,
            calibration_data=data,
        )
        for a in manifest["artifacts"]:
            artifacts.append(
                {
                    k: a.get(k)
                    for k in ("format", "runtime", "precision", "status", "reason", "size_bytes", "inference_precision")
                }
                | {"file": f"{fmt}/{a['file']}", "cosine": a.get("verification", {}).get("cosine")}
            )
    row = {
        "key": key,
        "ratio": ratio,
        "round_to": round_to,
        "pad": pad,
        "params": count_params(model),
        "macs": macs,
        "padded_macs": count_macs(model, example),
        **widths,
        "input": [1, *shape],
        "artifacts": artifacts,
    }
    cache.put(f"export/{key}", row)
    seen[json.dumps([ratio, widths])] = key
    return row


def _widths_of(row: dict[str, Any]) -> dict[str, int]:
    return {k: row[k] for k in ("embed_dim", "head_dim", "num_heads", "mlp_hidden")}


def _latency(args, cache: Cache) -> None:
    work, seen = Path(args.work), {}
    variants = [
        _export_variant(k, r, rt, heads, pad, args, work, cache, seen) for k, r, rt, heads, pad in _variants(args)
    ]
    candidates = []
    for v in variants:
        if "same_as" in v:
            continue
        folder = _folder(work, v["key"])
        candidates.append(Candidate(f"{v['key']} | fp32 eager", str(folder / "eager.pt")))
        candidates += [
            Candidate(f"{v['key']} | {a['file']}", str(folder / a["file"]))
            for a in v["artifacts"]
            if a["status"] == "ok"
        ]
    if args.export_only:
        return
    timing = cache.get("timing")
    if timing is None or args.retime or sorted(timing["stats"]) != sorted(c.label for c in candidates):
        stats = round_robin(
            candidates,
            variants[0]["input"],
            threads=args.threads,
            rounds=args.rounds,
            warmup=args.warmup,
            calls=args.calls,
            baseline="unpruned | fp32 eager",
            progress=lambda r, label: print(f"round {r + 1}: {label}", flush=True),
        )
        cache.put(
            "timing",
            {
                "stats": stats,
                "gemm": gemm_throughput(args.threads),
                "host": host_description(),
                "rounds": args.rounds,
                "calls": args.calls,
                "threads": args.threads,
            },
        )


# ---------------------------------------------------------------------------------------------- report
def _report(args, cache: Cache) -> str:
    host = host_description()
    lines = [
        f"Host: {host['cpu']} ({platform.machine()}, {cpu_count_text(host)}; "
        f"{', '.join(host['isa'])}), torch {torch.__version__}.",
        "",
    ]
    fid = [r for key in ("fidelity/fmnist", "fidelity/deit") for r in (cache.get(key) or [])]
    if fid:
        lines += [
            "**Int8 attention matmuls** (ONNX Runtime): agreement with the fp32 model",
            "",
            "| model | precision | images | top-1 agreement | cosine | accuracy |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in fid:
            acc = f"{100 * r['top1_accuracy']:.2f} %" if r.get("top1_accuracy") is not None else "-"
            lines.append(
                f"| {r['model']} | {r['precision']} | {r['samples']} | {100 * r['top1_agreement']:.2f} % | "
                f"{r['cosine']:.5f} | {acc} |"
            )
        lines.append("")
    timing = cache.get("timing")
    if timing:
        stats, gemm = timing["stats"], timing["gemm"]
        th = timing["host"]
        size = "x".join(map(str, cache.get("export/unpruned")["input"][2:]))
        lines += [
            f"**Latency** of `{args.model}`, batch 1, {size}, {timing['threads']} threads, timed on "
            f"{th['cpu']}: median of {timing['rounds']} rounds x {timing['calls']} calls, every candidate in a "
            "fresh process, round-robin, all in one run; measured int8 GEMM peak "
            f"{gemm['int8_gops']:.0f} GOP/s ({gemm['int8_source']}), fp32 {gemm['fp32_gops']:.0f} GOP/s",
            "",
            "| variant | widths (embed / head dim x heads / mlp) | GMACs | artifact | median ms | p90 ms | "
            "x unpruned fp32 eager | x best ORT int8 | int8 GEMM share | cosine |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, *_ in _variants(args):
            v = cache.get(f"export/{key}")
            if not v:
                continue
            if "same_as" in v:
                lines.append(f"| {key} | same widths as {v['same_as']} | | | | | | | | |")
                continue
            widths = f"{v['embed_dim']} / {v['head_dim']}x{v['num_heads']} / {v['mlp_hidden']}"
            labels = [f"{key} | fp32 eager"] + [f"{key} | {a['file']}" for a in v["artifacts"] if a["status"] == "ok"]
            ort = [stats[lb]["median_ms"] for lb in labels if lb in stats and lb.endswith(".onnx")]
            cos = {f"{key} | {a['file']}": a["cosine"] for a in v["artifacts"]}
            for lb in labels:
                if lb not in stats:
                    continue
                s = stats[lb]
                share = 2 * v.get("padded_macs", v["macs"]) / (s["median_ms"] * 1e6) / gemm["int8_gops"]
                vs_ort = f"{min(ort) / s['median_ms']:.2f}x" if ort else "-"
                c = cos.get(lb)
                gmacs = f"{v['macs'] / 1e9:.2f}"
                if v.get("padded_macs", v["macs"]) != v["macs"]:  # padded at export: the runtime computes more
                    gmacs += f" ({v['padded_macs'] / 1e9:.2f} padded)"
                lines.append(
                    f"| {key} | {widths} | {gmacs} | {lb.split(' | ', 1)[1]} | "
                    f"{s['median_ms']:.1f} | {s['p90_ms']:.1f} | {s['speedup_vs_baseline']:.2f}x | {vs_ort} | "
                    f"{100 * share:.0f} % | {'-' if c is None else f'{c:.4f}'} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["fidelity", "latency"], required=True)
    ap.add_argument("--model", default="deit_base_patch16_224")
    ap.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=[0.25, 0.09375],
        help="channel pruning ratios (0.09375: the paper's own configuration)",
    )
    ap.add_argument(
        "--round-to",
        type=int,
        nargs="+",
        default=[0, 8, 16, 32, 64],
        help="width rules (prune_once round_to; 0 = no rounding); rules that give the same widths as an "
        "earlier one of the same ratio are exported and timed once",
    )
    ap.add_argument(
        "--head-rules",
        nargs="+",
        choices=["dims", "heads"],
        default=["dims"],
        help="how attention widths shrink: 'dims' (inside every head) and/or 'heads' (whole heads)",
    )
    ap.add_argument(
        "--pad",
        nargs="+",
        default=["none"],
        help="'none' and/or multiples such as 64: pad_widths(model, multiple) before every format exports "
        "(the eager candidate is padded too); a variant padding does not change is timed once",
    )
    ap.add_argument(
        "--unpruned-artifacts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also export the unpruned model's int8 files (int8 alone); its fp32 eager model is always the baseline",
    )
    ap.add_argument("--formats", nargs="+", default=["pte", "onnx", "openvino"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--work", default="runs/fastest_artifact", help="exports are kept here between runs")
    ap.add_argument("--name", default="fastest_artifact")
    ap.add_argument("--retime", action="store_true", help="time again although a timing is cached")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument(
        "--export-only",
        action="store_true",
        help="latency part: export (and cache) the files only; time them in a later run on a quiet host",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Cache(OUT / f"{args.name}.json")
    if not args.report_only:
        if args.part == "fidelity":
            for key, rows in (("fidelity/fmnist", _fmnist_rows), ("fidelity/deit", _deit_rows)):
                if cache.get(key) is None:
                    cache.put(key, rows(args))
        else:
            _latency(args, cache)
    report = _report(args, cache)
    atomic_write_text(OUT / f"{args.name}.md", report + "\n")
    print(report)


if __name__ == "__main__":
    main()
