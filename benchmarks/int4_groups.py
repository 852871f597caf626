"""Issue 30: how small an int4 file gets, by group size and by whether the classifier stays float.

By default DeiT-base (random weights, seeded) pruned 25 % exactly as ``pqv headline`` prunes it
(``paper_model``); ``--network FILE`` takes a ``torch.save``'d network instead (e.g. a pruned
Fashion-MNIST ViT that ``benchmarks/qat.py`` trained, ``benchmarks/results/qat_networks/``). Each is
exported write-and-verify only (``MobileExportConfig.files_only``) at fp32, int8-dynamic and the
int4 precision every runtime has — ``int8-dynamic-int4-weight`` in the ``.pte`` (torchao 8da4w
lowered to XNNPACK), ``int4-weight`` in ONNX (``MatMulNBits``) and OpenVINO (NNCF) — with one
symmetric scale per group of each ``--groups`` size, with the classifier ``head`` kept fp32 (the
registered default) and quantized too (``keep_float=()``). Each variant is a precision config
registered under its own name, as a user would add one (see :mod:`pqv_lightning.export.precisions`).
A group size that does not divide a layer's width, or that the runtime cannot run, is refused before
any export; the report keeps that message as the row.

Reported per file: its size, over the fp32 file of its format (the issue's target: int4 <= 0.16x),
over the int8-dynamic file, and the cosine of its output to the fp32 model's on random inputs (with
random weights compare rows only). With ``--network``, the ``.pte`` schemes' top-1 on all 10,000
Fashion-MNIST test images too, evaluated as torchao's fake-quantized network (what the file
computes, as in ``benchmarks/qat.py``). Nothing is timed: int4 beside int8 in latency is in
``headline_int4.md`` and ``qat.md``.

    python benchmarks/int4_groups.py                         # DeiT-base, ~15 min on 2 cores
    python benchmarks/int4_groups.py --network benchmarks/results/qat_networks/0.5_1_ptq.pt \
        --input 1 1 32 32 --groups 32 96 --name int4_groups_fmnist
    python benchmarks/int4_groups.py --report-only
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pqv_lightning.errors import ConfigError
from pqv_lightning.export import MobileExportConfig, export_mobile
from pqv_lightning.export.host import host_description, host_label
from pqv_lightning.export.precisions import PRECISIONS, Int4Weight, Int8DynamicInt4Weight
from pqv_lightning.fileio import JsonCache, atomic_write_text
from pqv_lightning.models import paper_model

OUT = Path(__file__).parent / "results"
#: (format, the registered int4 precision it runs, int8 reference precision)
RUNTIMES = (
    ("pte", Int8DynamicInt4Weight(), "int8-dynamic"),
    ("onnx", Int4Weight(), "int8-dynamic"),
    ("openvino", Int4Weight(), "int8-dynamic"),
)


def _variants(base, groups: list[int]) -> list[tuple[str, Any]]:
    """``base`` at every group size, with the head kept fp32 (its default) and quantized too (``-head``)."""
    out = []
    for g in groups:
        out.append((f"{base.name}-g{g}", replace(base, name=f"{base.name}-g{g}", group_size=g)))
        out.append(
            (f"{base.name}-g{g}-head", replace(base, name=f"{base.name}-g{g}-head", group_size=g, keep_float=()))
        )
    return out


def _register(precision) -> None:
    if precision.name not in PRECISIONS:
        PRECISIONS.register(precision.name, precision)


def _export_row(model, data, fmt: str, precision: str, work: Path, threads: int) -> dict[str, Any]:
    folder = work / f"{fmt}_{precision}"
    try:
        manifest = export_mobile(
            model,
            data[0][:1],
            MobileExportConfig.files_only(folder, precisions=[precision], formats=[fmt], threads=threads),
            validation_data=data,
            calibration_data=data,
        )
    except ConfigError as err:  # a group that does not divide a width: the message is the result
        return {"status": "refused", "reason": str(err)}
    (a,) = [a for a in manifest["artifacts"] if a["precision"] == precision]
    if a["status"] != "ok":
        return {"status": a["status"], "reason": a.get("reason")}
    return {"status": "ok", "size_bytes": a["size_bytes"], "cosine": a["verification"]["cosine"]}


def _fake_quant_accuracy(network: torch.nn.Module, precision) -> float:
    """Top-1 on the 10,000 Fashion-MNIST test images of ``network`` fake-quantized for ``precision``
    (torchao's numerics: what the ``.pte`` file computes)."""
    from pqv_lightning.apps.recipes import evaluate
    from pqv_lightning.data import FashionMNISTDataModule
    from pqv_lightning.export.qat import prepare_qat_

    fake = copy.deepcopy(network)
    if precision is not None:
        prepare_qat_(fake, precision)
    return evaluate(fake, FashionMNISTDataModule(seed=0))


def _report(args, cache: JsonCache) -> str:
    model = cache.get("model")
    if model is None:
        return "nothing exported yet"
    hosts = sorted({row["host"] for key, row in cache.data.items() if "/" in key and "host" in row})
    accuracy = any("accuracy" in row for key, row in cache.data.items() if "/" in key)
    lines = [
        f"`{model['command']}` — {model['description']}, {model['params'] / 1e6:.2f} M parameters; "
        f"{'; '.join(hosts)}. MB = 2^20 bytes. Cosine: output vs the fp32 model on random inputs"
        + (
            f"; top-1: all 10,000 Fashion-MNIST test images (fp32 network {100 * cache.get('fp32_accuracy'):.2f} %), "
            "the fake-quantized network (what the `.pte` computes)."
            if accuracy
            else " (random weights: compare rows only)."
        ),
        "",
        "| format | precision | group | head | size | x fp32 file | x int8-dynamic file | cosine to fp32 |"
        + (" top-1 |" if accuracy else ""),
        "|---|---|---:|---|---:|---:|---:|---:|" + ("---:|" if accuracy else ""),
    ]
    for fmt, base, int8 in RUNTIMES:
        fp32 = (cache.get(f"{fmt}/fp32") or {}).get("size_bytes")
        ref = (cache.get(f"{fmt}/{int8}") or {}).get("size_bytes")
        rows = [("fp32", None), (int8, None), *_variants(base, model.get("groups", args.groups))]
        for name, p in rows:
            row = cache.get(f"{fmt}/{name}")
            if row is None:
                continue
            group = "-" if p is None else str(p.group_size)
            head = "fp32" if p is None or p.keep_float else "int4"
            if row["status"] != "ok":
                cells = "| | |" + (" |" if accuracy else "")
                lines.append(f"| {fmt} | {name} | {group} | {head} | {row['status']}: {row['reason']} | {cells}")
                continue
            size = row["size_bytes"]
            cells = [
                fmt,
                name,
                group,
                head,
                f"{size / 2**20:.2f} MB",
                f"{size / fp32:.3f}x" if fp32 else "-",
                f"{size / ref:.3f}x" if ref else "-",
                f"{row['cosine']:.4f}",
            ]
            if accuracy:
                cells.append(f"{100 * row['accuracy']:.2f} %" if "accuracy" in row else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _load(args) -> tuple[torch.nn.Module, str]:
    if args.network is None:
        return paper_model(args.model, args.ratio), f"{args.model} (random weights) pruned {100 * args.ratio:g} %"
    if not args.network.is_file():
        raise SystemExit(f"--network {args.network}: no such file (a torch.save'd nn.Module)")
    network = torch.load(args.network, weights_only=False)
    if not isinstance(network, torch.nn.Module):
        raise SystemExit(f"--network {args.network}: holds a {type(network).__name__}, not a torch.save'd nn.Module")
    return network.eval(), f"`{args.network.as_posix()}`"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_base_patch16_224")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--network", type=Path, help="a torch.save'd network instead of --model / --ratio")
    ap.add_argument("--input", type=int, nargs=4, default=[1, 3, 224, 224], metavar=("N", "C", "H", "W"))
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/int4_groups"))
    ap.add_argument("--name", default="int4_groups")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    bad = [g for g in args.groups if g < 1]
    if bad:
        raise SystemExit(f"--groups {bad}: group sizes must be >= 1")
    cache = JsonCache(OUT / f"{args.name}.json")
    for _, base, _ in RUNTIMES:
        for _, p in _variants(base, args.groups):
            _register(p)
    if not args.report_only:
        model, description = _load(args)
        shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
        cache.put(
            "model",
            {
                "description": description,
                "params": sum(p.numel() for p in model.parameters()),
                "command": " ".join(["python benchmarks/int4_groups.py", *shown]),
                "groups": args.groups,
            },
        )
        host = host_label(host_description())
        g = torch.Generator().manual_seed(0)
        data = [torch.randn(4, *args.input[1:], generator=g) for _ in range(2)]
        if args.network is not None and cache.get("fp32_accuracy") is None:
            cache.put("fp32_accuracy", _fake_quant_accuracy(model, None))
        for fmt, base, int8 in RUNTIMES:
            for precision, p in [("fp32", None), (int8, None), *_variants(base, args.groups)]:
                key = f"{fmt}/{precision}"
                if cache.get(key) is not None:
                    continue
                row = {**_export_row(model, data, fmt, precision, args.work, args.threads), "host": host}
                if args.network is not None and fmt == "pte" and p is not None and row["status"] == "ok":
                    row["accuracy"] = _fake_quant_accuracy(model, p)
                cache.put(key, row)
                print(key, row, flush=True)
    report = _report(args, cache)
    atomic_write_text(OUT / f"{args.name}.md", report)
    print(report)


if __name__ == "__main__":
    main()
