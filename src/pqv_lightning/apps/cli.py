"""The ``pqv`` command line (also ``python -m pqv_lightning``).

    pqv demo                         # prune + fine-tune the Fashion-MNIST ViT, export, table + plots
    pqv fit --config x.yaml          # LightningCLI with the plugin's callbacks and model builders
    pqv bench out/*.pte out/*.onnx deit_small_patch16_224   # latency + memory, round-robin
    pqv sweep [--quick]              # the paper's experiments: resumable, CSV + plots + results.md
    pqv headline                     # the README's headline ratio, reproduced on this host (DeiT-base, ~30 min)
    pqv compress --ratio 0.5         # a trained model -> pruned, quantized, verified, timed files; no training

Bad input (an unknown model, a missing file or data folder, a malformed option or config value)
ends with one line on stderr, ``pqv: error: ...``, and exit status 2 — no traceback. Those are the
errors the CLI and the library validate (:class:`pqv_lightning.errors.ConfigError`). Anything else is
a failure of the run or a bug: it keeps its traceback and exits 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["main"]


from ..errors import ConfigError
from .command import CLIError, LazyChoices, OneLineParser, contention_limit, count_at_least, run_command


# ---------------------------------------------------------------------------------------------- bench
def _bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="latency and memory of exported files and timm models",
        description="Latency (median/p90/min over all timed calls) and peak memory of exported "
        "artifacts (.pte, .onnx, .ptl, torch.save'd .pt modules) and of timm models by "
        "name, each timed in a fresh process, round-robin; ratios against the first "
        "candidate (or --baseline), measured in the same run.",
    )
    p.add_argument(
        "candidates",
        nargs="+",
        metavar="PATH_OR_MODEL",
        help="an artifact file, or a timm / pqv model name (timed eagerly in fp32)",
    )
    p.add_argument(
        "--shape",
        default=None,
        type=_shape,
        help="input shape, e.g. 1,3,224,224 (default: the manifest.json beside an artifact, else the "
        "model's default input size at batch 1)",
    )
    p.add_argument("--engine", default=None, help="torch quantized engine for .ptl files (default: from the manifest)")
    p.add_argument("--threads", type=count_at_least(1), default=2)
    p.add_argument("--rounds", type=count_at_least(1), default=3)
    p.add_argument("--warmup", type=count_at_least(0), default=3)
    p.add_argument("--calls", type=count_at_least(1), default=10)
    p.add_argument("--baseline", default=None, help="label of the baseline candidate (default: the first)")
    p.add_argument(
        "--max-contention",
        type=contention_limit,
        default=0.2,
        metavar="CPUS",
        help="retake a measurement during which other work kept more than this many CPUs busy beyond "
        "those --threads leaves free (Linux /proc/stat; default 0.2; 'none': keep every measurement)",
    )
    p.add_argument(
        "--retries", type=count_at_least(0), default=2, help="retakes per measurement on a busy host (default 2)"
    )
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    p.add_argument("--csv", dest="csv_out", default=None, help="write the results as CSV here")


def _shape(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.split(",")]
    except ValueError:
        dims = []
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(
            f"{text!r}: allowed is a comma-separated list of positive integers, e.g. 1,3,224,224"
        )
    return dims


def _manifest_entry(path: Path) -> tuple[dict | None, dict | None]:
    manifest = path.parent / "manifest.json"
    if not manifest.is_file():
        return None, None
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise CLIError(f"{manifest}: not valid JSON ({exc})") from exc
    entry = next((a for a in data.get("artifacts", []) if a.get("file") == path.name), None)
    return data, entry


def _resolve_candidates(args, workdir: Path):
    import torch

    from ..export.benchmark import Candidate, known_suffixes
    from ..models import create_vit
    from ..pruning.adapters import input_shape_for

    suffixes = known_suffixes()
    shape = args.shape
    candidates: list[Any] = []
    shapes: list[Any] = []
    for item in args.candidates:
        path = Path(item)
        if path.suffix in suffixes or path.exists():
            if not path.is_file():
                raise CLIError(f"{item}: no such file")
            if path.suffix not in suffixes:
                raise CLIError(f"{item}: unsupported file type {path.suffix!r}; allowed: {list(suffixes)}")
            manifest, entry = _manifest_entry(path)
            engine = args.engine or (entry or {}).get("engine")
            if manifest is not None:
                shapes.append(manifest["input"]["shape"])
            candidates.append(
                Candidate(path.name if path.name not in [c.label for c in candidates] else item, str(path), engine)
            )
        else:
            try:
                model = create_vit(item).eval()
            except ConfigError as exc:
                raise CLIError(f"{item}: not a file, and {exc}") from exc
            saved = workdir / f"{item}.pt"
            torch.save(model, saved)
            if shape is None:  # given --shape, models without a known input size are fine too
                shapes.append(list(input_shape_for(model)))
            candidates.append(Candidate(f"{item} (fp32 eager)", str(saved)))
    if shape is None:
        if not shapes:
            raise CLIError("no input shape: pass --shape, e.g. --shape 1,3,224,224")
        if any(s != shapes[0] for s in shapes):
            raise CLIError(f"candidates disagree on the input shape ({shapes}); pass --shape")
        shape = list(shapes[0])
    return candidates, shape


def cmd_bench(args) -> int:
    from ..export.benchmark import round_robin

    for flag, out in (("--json", args.json_out), ("--csv", args.csv_out)):  # before minutes of timing
        if out and (Path(out).is_dir() or not Path(out).parent.is_dir()):
            raise CLIError(f"{flag} {out}: not a file in an existing folder")
    with tempfile.TemporaryDirectory(prefix="pqv-bench-") as work:
        candidates, shape = _resolve_candidates(args, Path(work))
        labels = [c.label for c in candidates]
        baseline = args.baseline or labels[0]
        if baseline not in labels:
            raise CLIError(f"--baseline {baseline!r} is not one of {labels}")
        total = args.rounds * len(candidates)
        done = [0]

        def progress(r, label):
            done[0] += 1
            print(f"\r[{done[0]}/{total}] round {r + 1}: {label}" + " " * 20, end="", file=sys.stderr, flush=True)

        try:
            stats = round_robin(
                candidates,
                shape,
                threads=args.threads,
                rounds=args.rounds,
                warmup=args.warmup,
                calls=args.calls,
                baseline=baseline,
                progress=progress,
                max_contention=args.max_contention,
                retries=args.retries,
            )
        except RuntimeError as exc:
            raise CLIError(str(exc)) from exc
        print(file=sys.stderr)
    rows = [{"candidate": label, **s} for label, s in stats.items()]
    print(
        f"input {shape}, {args.threads} threads, {args.rounds} rounds x {args.calls} calls, a fresh process each; "
        f"baseline: {baseline}"
    )
    print(
        "| candidate | median ms | p90 ms | min ms | x baseline | peak RSS MB | load+inference MB | "
        "contention CPUs | retaken |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        contention = "-" if r["contention_max"] is None else f"{r['contention_max']:.2f}"
        print(
            f"| {r['candidate']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['min_ms']:.2f} | "
            f"{r['speedup_vs_baseline']:.2f} | {r['peak_rss_mb']:.0f} | {r['load_and_inference_mb']:.1f} | "
            f"{contention} | {r['retaken']} |"
        )
    best = min(rows, key=lambda r: r["median_ms"])
    print(f"fastest: {best['candidate']} ({best['median_ms']:.2f} ms, {best['speedup_vs_baseline']:.2f}x {baseline})")
    meta = {
        "shape": shape,
        "threads": args.threads,
        "rounds": args.rounds,
        "calls": args.calls,
        "warmup": args.warmup,
        "baseline": baseline,
        "best": best["candidate"],
        "max_contention": args.max_contention,
        "retries": args.retries,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({**meta, "results": rows}, indent=1))
    if args.csv_out:
        with open(args.csv_out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


# ---------------------------------------------------------------------------------------------- sweep
def _sweep_parser(sub) -> None:
    RECIPES = LazyChoices("pqv_lightning.apps.recipes", "RECIPES")
    TARGETS = LazyChoices("pqv_lightning.export.targets", "TARGETS")
    PRECISIONS = LazyChoices("pqv_lightning.export.precisions", "PRECISIONS")
    EXPERIMENTS = LazyChoices("pqv_lightning.apps.sweep", "EXPERIMENTS")

    p = sub.add_parser(
        "sweep",
        help="the paper's experiments as one resumable run: CSV, plots, results.md",
        description="The PQV-Mobile experiments (latency/memory vs pruning x precision, models, "
        "engines, accuracy vs pruning x precision, importance criteria) as one run. "
        "Finished cells are kept in OUT/cells.jsonl and never recomputed: rerun the same "
        "command to continue after an interruption.",
    )
    p.add_argument("--quick", action="store_true", help="CI size: tiny models, a few hundred images (minutes)")
    p.add_argument("--out", default=None, help="output folder (default runs/sweep, or runs/sweep_quick with --quick)")
    p.add_argument(
        "--experiments",
        nargs="+",
        default=None,
        choices=EXPERIMENTS,
        metavar="NAME",
        help="experiments to run: %(choices)s (default: all)",
    )
    p.add_argument(
        "--formats",
        "--format",
        nargs="+",
        default=None,
        choices=TARGETS,
        metavar="FORMAT",
        help="export formats of the latency/accuracy cells (default pte; onnx with --quick); "
        "several formats put every runtime in each latency cell's round-robin",
    )
    p.add_argument("--models", nargs="+", default=None, help="models of the latency cells")
    p.add_argument(
        "--latency-formats",
        nargs="+",
        default=None,
        choices=TARGETS,
        metavar="FORMAT",
        help="export formats of the latency cells (default: --formats), e.g. pte onnx openvino to "
        "time every runtime while the accuracy cells keep theirs",
    )
    p.add_argument(
        "--latency-precisions",
        nargs="+",
        default=None,
        choices=PRECISIONS,
        metavar="PRECISION",
        help="precisions of the latency cells (default: those of the accuracy cells, fp32 fp16 "
        "int8-dynamic), e.g. add int8-static",
    )
    p.add_argument(
        "--engine-models",
        nargs="+",
        default=None,
        help="models of the engine comparison (default deit3_medium_patch16_224, as in the paper's Fig. 7)",
    )
    p.add_argument("--checkpoint", default=None, help="Fashion-MNIST ViT checkpoint for the accuracy cells")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--recipe",
        default=None,
        choices=RECIPES,
        metavar="NAME",
        help="fine-tuning recipe of the accuracy cells (default: 'default', the best one measured)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of the importance experiment (default 0 1 2; 0 1 with --quick)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the report and plots from the finished cells only (a partial report); compute nothing",
    )


def cmd_sweep(args) -> int:
    import dataclasses

    from .sweep import FULL, QUICK, run_sweep

    config = dataclasses.replace(QUICK if args.quick else FULL)
    for name, value in (
        ("out_dir", args.out),
        ("experiments", args.experiments),
        ("formats", args.formats),
        ("latency_models", args.models),
        ("latency_precisions", args.latency_precisions),
        ("latency_formats", args.latency_formats),
        ("engine_models", args.engine_models),
        ("checkpoint", args.checkpoint),
        ("data_dir", args.data_dir),
        ("threads", args.threads),
        ("recipe", args.recipe),
        ("seeds", args.seeds),
    ):
        if value is not None:
            setattr(config, name, value)
    config.report_only = args.report_only
    if not config.report_only:  # a folder the cells can be written to, before the first cell
        from ..checks import check_writable_dir

        check_writable_dir("--out", config.out_dir)
    if config.threads < 1:
        raise CLIError(f"--threads {config.threads}: must be >= 1")
    if config.data_dir and not Path(config.data_dir).is_dir():
        raise CLIError(f"--data-dir {config.data_dir}: no such folder")
    if args.models or args.engine_models:
        from ..models import create_vit

        for name in (args.models or []) + (args.engine_models or []):
            create_vit(name)  # an unknown name fails now, not after an hour of other cells

    def progress(i, total, key, cached):
        state = "cached " if cached else ("not run yet, skipped: " if config.report_only else "")
        print(f"[{i + 1}/{total}] {state}{key}", file=sys.stderr, flush=True)

    run_sweep(config, progress)
    out = Path(config.out_dir)
    print((out / "results.md").read_text())
    print(f"-> {out}/sweep.csv, results.json, results.md and fig*.png")
    return 0


# ---------------------------------------------------------------------------------------------- coverage
def _coverage_parser(sub) -> None:
    p = sub.add_parser(
        "coverage",
        help="which model families prune, reload, fine-tune and export: a generated table",
        description="Every model family (small random-initialized timm models) through pruning 25 %% / "
        "50 %% / a MAC budget, save + reload, a short fit with the callbacks and export x "
        "verify; writes OUT/coverage.md. Finished families are cached in OUT/rows.jsonl.",
    )
    p.add_argument(
        "--families",
        nargs="+",
        default=None,
        metavar="NAME",
        choices=LazyChoices("pqv_lightning.apps.coverage", "FAMILIES"),
        help="families to check: %(choices)s (default: all)",
    )
    p.add_argument(
        "--formats",
        nargs="+",
        default=None,
        metavar="FORMAT",
        choices=LazyChoices("pqv_lightning.export.targets", "TARGETS"),
        help="export formats (default: every installed one)",
    )
    p.add_argument("--out", default="runs/coverage", help="output folder (default runs/coverage)")


# ---------------------------------------------------------------------------------------------- fit
def cmd_fit(rest: list[str]) -> int:
    from .lightning_cli import run_cli

    run_cli(["fit", *rest])
    return 0


# ---------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    from .compress import add_compress_arguments
    from .demo import add_demo_arguments
    from .headline import __doc__ as headline_module_doc
    from .headline import add_headline_arguments

    def headline_doc() -> str:
        return (headline_module_doc or "").split("\n\n")[0]

    parser = OneLineParser(
        prog="pqv", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{demo,fit,compress,bench,sweep,coverage,headline}"
    )
    add_demo_arguments(sub.add_parser("demo", help="prune + fine-tune the Fashion-MNIST ViT, export, table + plots"))
    sub.add_parser("fit", help="LightningCLI: pqv fit --config x.yaml (see pqv fit --help)", add_help=False)
    add_compress_arguments(
        sub.add_parser(
            "compress",
            help="a trained model -> pruned (post-training), quantized, verified, timed files; no training loop",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    _bench_parser(sub)
    _sweep_parser(sub)
    _coverage_parser(sub)
    add_headline_arguments(
        sub.add_parser(
            "headline",
            help="the headline ratio on this host: prune DeiT-base, export int8, time against fp32 eager, repeated",
            description=headline_doc(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: _dispatch(argv))


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "fit":
        return cmd_fit(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args)
    if args.command == "compress":
        from .compress import run_compress

        return run_compress(args)
    if args.command == "sweep":
        return cmd_sweep(args)
    if args.command == "headline":
        from .headline import run_headline

        return run_headline(args)
    if args.command == "coverage":
        from .coverage import run_coverage_command

        return run_coverage_command(args)
    return cmd_bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
