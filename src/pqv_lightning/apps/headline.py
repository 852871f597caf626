"""The headline, reproduced with one command (``pqv headline``; ``benchmarks/headline.py`` runs the
same code): how far the fastest int8 file of a pruned model (DeiT-base by default) is from the
unpruned fp32 eager timm model on this host, as a spread over independent runs instead of one number.

One round-robin (:func:`pqv_lightning.export.benchmark.round_robin`: every candidate in a fresh process,
visited in turn) gives one ratio, and a VM's speed drifts by 10-30 % between runs. So the files are
exported once, with ``export_mobile``'s defaults (what ``MobileExport`` gives a user: widths padded for
OpenVINO where that is cheap), and then a short, independent round-robin is repeated ``--repeats``
times: the unpruned fp32 eager baseline and every int8 file of every pruning ratio, in the same run
each time. Each repeat's ratios come from its own run; the report gives every repeat, the median and
the range over repeats, how many repeats met each target, the host's load seen by the round-robin's
contention guard (measurements taken while other work kept more than 0.2 CPUs busy are retaken), the
share of CPU time the hypervisor stole during each repeat, the CPU clock, and the kernels OpenVINO
chose. Repeats are cached one by one in ``<results>/<name>.json``: an interrupted run continues where
it stopped.

``--heads-ratios``: pruning ratios also exported with whole attention heads removed (every kept head
stays 64 wide) instead of dimensions inside every head (``PruningConfig``'s default), timed in the
same round-robins. Whole heads are OpenVINO's width rule (``StructuredPruning(widths_for="openvino")``).

Targets (issue 13, same run): 25 %-pruned + int8 >= 9x, 9.375 % (the paper's configuration) + int8
>= 7.18x, and the fastest file <= 0.85x the latency of the fastest ONNX Runtime int8 file.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import ConfigError
from ..fileio import JsonCache, atomic_write_text
from ..hostcpu import cpu_times, steal_fraction
from .command import contention_limit, count_at_least

if TYPE_CHECKING:
    from ..export.benchmark import Candidate

# torch, the exporters and timm are imported where they are used: `pqv --help` builds this parser
__all__ = ["add_headline_arguments", "run_headline"]

BASELINE = "unpruned | fp32 eager"
TARGETS_X = {0.25: 9.0, 0.09375: 7.18}  # x unpruned fp32 eager
ORT_TARGET = 0.85  # fastest file / fastest ONNX Runtime int8 file
MAX_CONTENTION = 0.2  # the default of --max-contention: passed to round_robin; a repeat kept above it is busy


class Variant(NamedTuple):
    """One pruned model: ``ratio`` of the channels, whole heads or dimensions inside every head."""

    ratio: float
    heads: bool = False

    @property
    def key(self) -> str:  # cache and summary key
        return f"{self.ratio:g}" + (" heads" if self.heads else "")

    @property
    def prefix(self) -> str:  # of its candidates' labels
        return f"{100 * self.ratio:g}%" + (" heads" if self.heads else "")

    @property
    def title(self) -> str:
        return f"{100 * self.ratio:g} %" + (", whole heads" if self.heads else "")

    @classmethod
    def parse(cls, key: str) -> Variant:
        ratio, _, rule = key.partition(" ")
        return cls(float(ratio), rule == "heads")


def _folder(args, variant: Variant) -> Path:
    return Path(args.work) / (f"{100 * variant.ratio:g}pct" + ("_heads" if variant.heads else ""))


def _export(variant: Variant, args, cache: JsonCache) -> dict[str, Any]:
    import torch

    from ..export import TARGETS, MobileExportConfig, export_mobile
    from ..export.openvino_target import ir_gemm_kernels
    from ..models import paper_model
    from ..pruning import count_macs
    from ..pruning.adapters import input_shape_for

    key = f"export/{variant.key}"
    folder = _folder(args, variant)
    done = cache.get(key)
    if done and all((folder / f).is_file() for f in done["files"]):
        return done
    model = paper_model(args.model, variant.ratio, prune_heads=variant.heads)
    shape = list(input_shape_for(model))
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, *shape[1:], generator=g) for _ in range(2)]
    ok: list[dict[str, Any]] = []
    plan = _plan([f for f in args.formats if TARGETS[f].missing() is None], args.precisions)
    for formats, precisions in plan:
        # formats that write other precisions (int4: 'int8-dynamic-int4-weight' in .pte, 'int4-weight' in
        # ONNX / OpenVINO) export apart, each group into a folder of its own (an export replaces the model
        # files of its folder); one group, the default, writes straight into the variant's folder
        sub = "+".join(formats) if len(plan) > 1 else ""
        manifest = export_mobile(
            model,
            data[0][:1],
            MobileExportConfig.files_only(
                folder / sub,
                precisions=precisions,
                formats=formats,
                threads=args.threads,
            ),
            validation_data=data,
            calibration_data=data,
        )
        ok += [
            {**a, "file": f"{sub}/{a['file']}" if sub else a["file"]}
            for a in manifest["artifacts"]
            if a["status"] == "ok"
        ]
    row = {
        "ratio": variant.ratio,
        "prune_heads": variant.heads,
        "input": shape,
        "macs": count_macs(model, data[0][:1]),
        "files": [a["file"] for a in ok],
        "cosine": {a["file"]: a["verification"]["cosine"] for a in ok},
        "sizes": {a["file"]: a["size_bytes"] for a in ok},
        "width_padding": {a["file"]: a["width_padding"] for a in ok if a.get("width_padding")},
        "openvino_kernels": ir_gemm_kernels(folder, [a["file"] for a in ok], shape, args.threads),
    }
    cache.put(key, row)
    return row


def _plan(formats: list[str], precisions: list[str]) -> list[tuple[list[str], list[str]]]:
    """The exports to make: formats grouped by which of ``precisions`` they can write (each group one
    ``export_mobile`` call), in the order given.

    Raises:
        ConfigError: a precision none of ``formats`` can write, or a format that can write none of them.
    """
    from ..checks import check_choice
    from ..export import PRECISIONS, TARGETS
    from ..export.targets import formats_writing

    for f in formats:
        check_choice("format", f, TARGETS.names())
    for p in precisions:
        check_choice("precision", p, PRECISIONS.names())
    groups: dict[tuple[str, ...], list[str]] = {}
    for f in formats:
        can = tuple(p for p in precisions if TARGETS[f].supports(PRECISIONS[p]))
        if not can:
            raise ConfigError(f"format {f!r} can write none of --precisions {precisions}")
        groups.setdefault(can, []).append(f)
    written = {p for can in groups for p in can}
    for p in precisions:
        if p not in written:
            raise ConfigError(
                f"precision {p!r}: none of --formats {formats} can write it; formats that can: "
                f"{formats_writing(PRECISIONS[p])}"
            )
    return [(fs, list(can)) for can, fs in groups.items()]


def _candidates(args, exports: dict[Variant, dict[str, Any]]) -> list[Candidate]:
    import torch

    from ..export.benchmark import Candidate
    from ..models import paper_model

    eager = Path(args.work) / "unpruned.pt"
    if not eager.is_file():
        torch.save(paper_model(args.model), eager)
    out = [Candidate(BASELINE, str(eager))]
    for variant, row in exports.items():
        out += [Candidate(f"{variant.prefix} | {f}", str(_folder(args, variant) / f)) for f in row["files"]]
    return out


def _summary(stats: dict[str, dict], variants: list[Variant]) -> dict[str, Any]:
    """Per variant: the fastest file of this repeat, its ratio to the baseline and to the fastest
    ONNX Runtime int8 file of the same repeat."""
    base = stats[BASELINE]["median_ms"]
    out = {"baseline_ms": base}
    for v in variants:
        files = {k.split(" | ", 1)[1]: s for k, s in stats.items() if k.split(" | ", 1)[0] == v.prefix}
        best = min(files, key=lambda f: files[f]["median_ms"])
        ort = [s["median_ms"] for f, s in files.items() if f.endswith(".onnx")]
        out[v.key] = {
            "best": best,
            "best_ms": files[best]["median_ms"],
            "x_eager": base / files[best]["median_ms"],
            "vs_ort": files[best]["median_ms"] / min(ort) if ort else None,
        }
    return out


def _repeat(
    args, candidates: list[Candidate], shape: list[int], variants: list[Variant], cache: JsonCache, i: int
) -> None:
    from ..export.benchmark import round_robin
    from ..export.host import host_description

    before = cpu_times()
    stats = round_robin(
        candidates,
        shape,
        threads=args.threads,
        rounds=args.rounds,
        warmup=args.warmup,
        calls=args.calls,
        baseline=BASELINE,
        max_contention=args.max_contention,
        progress=lambda r, label: print(f"repeat {i + 1}, round {r + 1}: {label}", flush=True),
    )
    cache.put(
        f"repeat/{i}",
        {
            "stats": stats,
            "summary": _summary(stats, variants),
            "host": host_description(),
            "steal": steal_fraction(before, cpu_times()),
        },
    )


def _busy(rep: dict[str, Any], limit: float | None) -> bool:
    """A repeat with a measurement kept although the host was busy through every retry: it does not
    count, and the next run takes it again (``limit`` None: every repeat counts)."""
    return limit is not None and any((s.get("contention_max") or 0.0) > limit for s in rep["stats"].values())


def _stale(rep: dict[str, Any] | None, candidates: list[Candidate], limit: float | None) -> bool:
    """Not measured yet, measured on a busy host, or with other candidates than this run's."""
    return rep is None or _busy(rep, limit) or sorted(rep["stats"]) != sorted(c.label for c in candidates)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (range {min(values):.2f}-{max(values):.2f}x)"


def _report(args, cache: JsonCache) -> str:
    from ..export.host import host_label

    measured = [
        cache.get(k)
        for k in sorted((k for k in cache.data if k.startswith("repeat/")), key=lambda k: int(k.split("/")[1]))
    ]
    if not measured:
        return "no repeats measured yet"
    keys = sorted((k for k in measured[-1]["summary"] if k != "baseline_ms"), key=lambda k: Variant.parse(k))
    repeats = [
        r
        for r in measured
        if not _busy(r, args.max_contention) and sorted(k for k in r["summary"] if k != "baseline_ms") == sorted(keys)
    ]
    if not repeats:
        return "no repeats measured on a quiet host yet"
    # the export row knows the rule (a --prune-heads run of the first version keyed whole heads as "0.25")
    variants = [
        Variant(v.ratio, v.heads or bool(cache.get(f"export/{k}").get("prune_heads")))
        for k, v in ((k, Variant.parse(k)) for k in keys)
    ]
    hosts = sorted({host_label(r["host"]) for r in repeats})
    size = "x".join(map(str, cache.get(f"export/{keys[0]}")["input"][2:]))
    lines = [
        f"**Headline ratios of `{args.model}`**, batch 1, {size}, {args.threads} threads, on {', '.join(hosts)}: "
        f"{len(repeats)} independent round-robins (each {args.rounds} rounds x {args.calls} calls per candidate, "
        + (
            f"every candidate in a fresh process; a measurement taken while other work kept more than "
            f"{args.max_contention} CPUs busy is retaken)."
            if args.max_contention is not None
            else "every candidate in a fresh process; no contention limit: every measurement kept)."
        )
        + " Each repeat's ratio is against the unpruned fp32 eager model of the same repeat. "
        "Pruned: dimensions inside every head (the default), or whole heads.",
        "",
        "| repeat | fp32 eager, unpruned | "
        + " | ".join(f"{v.title}: fastest file | ms | x eager | vs ORT int8" for v in variants)
        + " | worst contention | steal | CPU clock |",
        "|---:|---:|" + "---|---:|---:|---:|" * len(variants) + "---:|---:|---:|",
    ]
    for i, rep in enumerate(repeats, 1):
        s = rep["summary"]
        cells = [
            f"{s[k]['best']} | {s[k]['best_ms']:.1f} | {s[k]['x_eager']:.2f}x | "
            + ("-" if s[k]["vs_ort"] is None else f"{s[k]['vs_ort']:.2f}x")
            for k in keys
        ]
        worst = [v["contention_max"] for v in rep["stats"].values() if v.get("contention_max") is not None]
        retaken = sum(v.get("retaken", 0) for v in rep["stats"].values())
        load = f"{max(worst):.2f} CPUs" if worst else "-"
        lines.append(
            f"| {i} | {s['baseline_ms']:.1f} ms | "
            + " | ".join(cells)
            + f" | {load}{f', {retaken} retaken' if retaken else ''} | {_percent(rep.get('steal'))} | "
            + (f"{rep['host']['mhz']} MHz" if rep["host"].get("mhz") else "-")
            + " |"
        )
    lines += [
        "",
        "| pruned | target | x unpruned fp32 eager: median (range) | repeats meeting it | fastest file: median ms "
        "| fastest / ONNX Runtime int8: median (range) | repeats <= 0.85x | fastest file (repeats) |",
        "|---|---:|---|---:|---:|---|---:|---|",
    ]
    for k, v in zip(keys, variants):
        rows = [rep["summary"][k] for rep in repeats]
        xs, vs = [x["x_eager"] for x in rows], [x["vs_ort"] for x in rows if x["vs_ort"] is not None]
        target = TARGETS_X.get(v.ratio)
        met = f"{sum(x >= target for x in xs)}/{len(xs)}" if target else "-"
        winners: dict[str, int] = {}
        for x in rows:
            winners[x["best"]] = winners.get(x["best"], 0) + 1
        ort = (
            (
                f"{statistics.median(vs):.2f}x (range {min(vs):.2f}-{max(vs):.2f}x) | "
                f"{sum(x <= ORT_TARGET for x in vs)}/{len(vs)}"
            )
            if vs
            else "- | -"
        )
        lines.append(
            f"| {v.title} | {f'>= {target}x' if target else '-'} | {_spread(xs)} | {met} | "
            f"{statistics.median(x['best_ms'] for x in rows):.1f} | {ort} | "
            + ", ".join(f"{f} ({n})" for f, n in sorted(winners.items(), key=lambda kv: -kv[1]))
            + " |"
        )
    if len(measured) > len(repeats):
        lines += [
            "",
            f"{len(measured) - len(repeats)} more repeat(s) left out: measured with other candidates, or a "
            f"measurement was kept although other work kept more than {args.max_contention} CPUs busy through "
            "every retry (the next run retakes them).",
        ]
    base = [rep["summary"]["baseline_ms"] for rep in repeats]
    lines += [
        "",
        f"The unpruned fp32 eager baseline over the repeats: median {statistics.median(base):.1f} ms, range "
        f"{min(base):.1f}-{max(base):.1f} ms.",
        "",
        *_file_table(repeats, cache, keys, variants),
        "",
        _host_details(repeats[-1]["host"], cache, keys),
    ]
    return "\n".join(lines)


def _file_table(repeats: list[dict[str, Any]], cache: JsonCache, keys: list[str], variants: list[Variant]) -> list[str]:
    """Every file of every variant: its median latency over the repeats, its ratio to the same repeat's
    baseline (median over repeats), its size and its cosine to the fp32 model."""
    lines = [
        "Every file (median over the repeats):",
        "",
        "| pruned | file | ms | x eager | size | cosine to fp32 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for k, v in zip(keys, variants):
        row = cache.get(f"export/{k}")
        for f in row["files"]:
            label = f"{v.prefix} | {f}"
            ms = [rep["stats"][label]["median_ms"] for rep in repeats if label in rep["stats"]]
            if not ms:
                continue
            ratios = [
                rep["summary"]["baseline_ms"] / rep["stats"][label]["median_ms"]
                for rep in repeats
                if label in rep["stats"]
            ]
            size = (row.get("sizes") or {}).get(f)
            lines.append(
                f"| {v.title} | {f} | {statistics.median(ms):.1f} | {statistics.median(ratios):.2f}x | "
                + (f"{size / 2**20:.1f} MB" if size else "-")
                + f" | {row['cosine'][f]:.4f} |"
            )
    return lines


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _host_details(host: dict[str, Any], cache: JsonCache, keys: list[str]) -> str:
    """What makes two hosts of the same name differ: the ISA, the clock, and the kernels OpenVINO chose."""
    from ..export.host import cpu_count_text

    kernels: dict[str, int] = {}
    for k in keys:
        for per_file in (cache.get(f"export/{k}").get("openvino_kernels") or {}).values():
            for name, n in per_file.items():
                kernels[name] = kernels.get(name, 0) + n
    return (
        f"Host: {host.get('cpu')} ({host.get('cpuid', 'CPUID unknown')}), {cpu_count_text(host)}, ISA "
        f"{', '.join(host.get('isa') or []) or '-'}; torch's CPU kernels: {host.get('torch_isa', '-')}; OpenVINO's "
        "GEMM kernels (layers over every IR): "
        + (", ".join(f"{name} x{n}" for name, n in kernels.items()) or "-")
        + ". ONNX Runtime (MLAS) and XNNPACK choose their kernels from the same CPU features at run time and do not "
        "report them."
    )


def add_headline_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pqv headline`` (and ``benchmarks/headline.py``)."""
    p.add_argument("--model", default="deit_base_patch16_224", help="a timm model name (random weights)")
    p.add_argument(
        "--ratios",
        type=float,
        nargs="*",
        default=[0.09375, 0.25],
        help="pruning ratios, dimensions inside every head removed (PruningConfig's default)",
    )
    p.add_argument(
        "--heads-ratios",
        type=float,
        nargs="*",
        default=[],
        help="pruning ratios also exported with whole attention heads removed, timed in the same round-robins",
    )
    p.add_argument("--formats", nargs="+", default=["pte", "onnx", "openvino"])
    p.add_argument("--precisions", nargs="+", default=["int8-dynamic", "int8-static"])
    p.add_argument("--repeats", type=count_at_least(1), default=8, help="independent round-robins (cached ones count)")
    p.add_argument("--rounds", type=count_at_least(1), default=2, help="rounds of each repeat's round-robin")
    p.add_argument("--calls", type=count_at_least(1), default=10)
    p.add_argument("--warmup", type=count_at_least(0), default=5)
    p.add_argument("--threads", type=count_at_least(1), default=2)
    p.add_argument(
        "--max-contention",
        type=contention_limit,
        default=MAX_CONTENTION,
        metavar="CPUS",
        help="retake a measurement during which other work kept more than this many CPUs busy (default "
        f"{MAX_CONTENTION}; 'none': keep every measurement, for a busy host)",
    )
    p.add_argument("--work", default="runs/headline", help="the exported files are kept here between runs")
    p.add_argument("--results", default=None, help="where NAME.json / NAME.md go (default: --work)")
    p.add_argument("--name", default="headline")
    p.add_argument("--report-only", action="store_true")


def _check(args) -> None:
    if not args.ratios and not args.heads_ratios:
        raise ConfigError("nothing to time: give --ratios and/or --heads-ratios")
    for r in [*args.ratios, *args.heads_ratios]:
        if not 0 < r < 1:
            raise ConfigError(f"pruning ratio {r}: must be in (0, 1)")
    from ..export import MobileExportConfig

    for formats, precisions in _plan(args.formats, args.precisions):  # each export's config names its bad value
        MobileExportConfig(formats=formats, precisions=precisions).validate()


def run_headline(args) -> int:
    """Export (once), repeat the round-robin, write ``NAME.json`` / ``NAME.md`` and print the report."""
    import torch

    _check(args)
    results = Path(args.results or args.work)
    cache = JsonCache(results / f"{args.name}.json")
    if not args.report_only:
        torch.set_num_threads(args.threads)
        Path(args.work).mkdir(parents=True, exist_ok=True)
        variants = [Variant(r) for r in args.ratios] + [Variant(r, heads=True) for r in args.heads_ratios]
        exports = {v: _export(v, args, cache) for v in variants}
        candidates = _candidates(args, exports)
        for i in range(args.repeats):
            if _stale(cache.get(f"repeat/{i}"), candidates, args.max_contention):
                _repeat(args, candidates, exports[variants[0]]["input"], variants, cache, i)
                atomic_write_text(results / f"{args.name}.md", _report(args, cache) + "\n")
    report = _report(args, cache)
    atomic_write_text(results / f"{args.name}.md", report + "\n")
    print(report)
    return 0
