"""``pqv sweep``: the PQV-Mobile paper's experiments as one resumable run, with CSV and plots.

Experiments (figure numbers of arXiv 2408.08437):

* ``latency`` (Fig. 2): latency, size and peak memory vs pruning level x precision, per model
  (random-init weights: latency does not depend on the values; every file and the eager model
  timed in a fresh process, round-robin, see :mod:`pqv_lightning.export.benchmark`), with each variant's
  achieved GOP/s as a fraction of the host's measured GEMM throughput (``gemm``);
* ``models`` (Fig. 6): the same cells for a second model at equal pruning levels;
* ``engines`` (Fig. 7): ``.ptl`` int8 latency per PyTorch quantized engine;
* ``accuracy`` (Fig. 4): Fashion-MNIST test accuracy after pruning + fine-tuning, and the top-1
  accuracy of every exported precision on validation images;
* ``importance`` (Fig. 5): Taylor vs Hessian vs L1 vs L2 at equal pruning, same budget.

Every finished cell is appended to ``cells.jsonl`` in the output folder and never recomputed: rerun
the same command after an interruption and it continues. ``--quick`` is a CI-sized version
(tiny models, a few hundred images), the default is the full size (hours on 2 CPU cores).
"""

from __future__ import annotations

import copy
import csv
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, InputNotFoundError
from ..export.host import gemm_throughput
from ..fileio import atomic_write
from ..settings import torch_threads
from .command import CommandFailed

__all__ = ["FULL", "QUICK", "SweepCellError", "SweepConfig", "run_sweep"]


@dataclass
class SweepConfig:
    out_dir: str = "runs/sweep"
    latency_models: list[str] = field(default_factory=lambda: ["deit_base_patch16_224", "deit3_medium_patch16_224"])
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.09375, 0.1875, 0.25, 0.5])
    precisions: list[str] = field(default_factory=lambda: ["fp32", "fp16", "int8-dynamic"])
    # precisions of the latency cells when they differ from the accuracy cells' (e.g. + int8-static);
    # None: ``precisions`` (the keys of runs without it stay valid)
    latency_precisions: list[str] | None = None
    formats: list[str] = field(default_factory=lambda: ["pte"])  # export formats of the latency/accuracy cells
    # formats of the latency cells when they differ from the accuracy cells' (e.g. every runtime);
    # None: ``formats`` (the keys of runs without it stay valid)
    latency_formats: list[str] | None = None
    engine_ratio: float = 0.09375
    # the paper's engine comparison (Fig. 7) measures the 9.375 %-pruned DeiT3-medium
    engine_models: list[str] = field(default_factory=lambda: ["deit3_medium_patch16_224"])
    accuracy_ratios: list[float] = field(default_factory=lambda: [0.0, 0.09375, 0.1875, 0.25, 0.5])
    importances: list[str] = field(default_factory=lambda: ["taylor", "hessian", "l1", "l2"])
    importance_ratio: float = 0.25
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # the importance experiment's seeds
    recipe: str = "default"  # fine-tuning recipe of the accuracy cells (pqv_lightning.apps.recipes.RECIPES)
    checkpoint: str | None = None
    data_dir: str | None = None
    train_subset: int = 16384
    test_subset: int | None = None
    epochs: int = 2
    batch_size: int = 128
    verify_batches: int = 8
    threads: int = 2
    repeats: int = 10  # timed calls per candidate and round (latency cells)
    rounds: int = 3
    experiments: list[str] = field(default_factory=lambda: ["gemm", "latency", "engines", "accuracy", "importance"])
    report_only: bool = False  # write the report from the finished cells; compute nothing
    isolate: bool = True  # every cell in a fresh worker process: memory is returned between cells


FULL = SweepConfig()
QUICK = SweepConfig(
    out_dir="runs/sweep_quick",
    latency_models=["vit_test_tiny", "vit_tiny_fmnist"],
    ratios=[0.0, 0.25, 0.5],
    engine_models=["vit_test_tiny"],
    formats=["onnx"],
    accuracy_ratios=[0.0, 0.5],
    importances=["taylor", "l2"],
    importance_ratio=0.5,
    seeds=[0, 1],
    train_subset=256,
    test_subset=256,
    epochs=1,
    batch_size=64,
    verify_batches=2,
    repeats=3,
    rounds=1,
)
EXPERIMENTS = ("gemm", "latency", "engines", "accuracy", "importance")


class SweepCellError(CommandFailed):
    """A cell's worker process failed (its traceback is on stderr); finished cells are kept."""


class CellStore:
    """Finished cells, one JSON line each; a torn last line (a crash mid-write) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cells: dict[str, list[dict[str, Any]]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.cells[item["key"]] = item["rows"]

    def __contains__(self, key: str) -> bool:
        return key in self.cells

    def add(self, key: str, rows: list[dict[str, Any]]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"key": key, "rows": rows}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.cells[key] = rows


# ---------------------------------------------------------------------------------------------- cells
def _latency_cell(
    config: SweepConfig,
    model_name: str,
    ratio: float,
    formats: list[str],
    precisions: list[str],
    engines: list[str] | None,
    work: Path,
) -> list[dict[str, Any]]:
    from ..export import MobileExportConfig, export_mobile
    from ..export.benchmark import Candidate, round_robin
    from ..models import paper_model
    from ..pruning import count_macs, count_params
    from ..pruning.adapters import input_shape_for

    candidates = []
    if ratio > 0:
        # the unpruned fp32 eager model runs in this cell's round-robin too: every ratio against it is
        # measured in one run (dividing by another cell's number carried this VM's drift, ~8 %)
        torch.save(paper_model(model_name), work / "unpruned.pt")
        candidates.append(Candidate("unpruned fp32 eager", str(work / "unpruned.pt")))
    model = paper_model(model_name, ratio)
    shape = input_shape_for(model)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(2, *shape[1:], generator=g) for _ in range(2)]
    macs = count_macs(model, data[0][:1])
    out = work / "export"
    manifest = export_mobile(
        model,
        data[0][:1],
        MobileExportConfig.files_only(
            out,
            precisions=precisions,
            formats=formats,
            engines=engines,
            threads=config.threads,
        ),
        validation_data=data,
    )
    # latency and memory: every file and the eager model in a fresh process, round-robin
    torch.save(model, work / "eager.pt")
    ok = [a for a in manifest["artifacts"] if a["status"] != "skipped"]
    candidates.append(Candidate("fp32 eager", str(work / "eager.pt")))
    candidates += [Candidate(a["file"], str(out / a["file"]), a["engine"]) for a in ok]
    baseline = candidates[0].label  # the unpruned fp32 eager model of this cell
    stats = round_robin(
        candidates,
        list(shape),
        threads=config.threads,
        rounds=config.rounds,
        warmup=3,
        calls=config.repeats,
        baseline=baseline,
    )
    common = {"model": model_name, "ratio": ratio, "params": count_params(model), "macs": macs}
    rows = [
        {
            **common,
            "variant": "fp32 eager",
            "format": "eager",
            "precision": "fp32",
            "engine": None,
            "size_mb": None,
            "cosine": 1.0,
            **stats["fp32 eager"],
        }
    ]
    for a in ok:
        rows.append(
            {
                **common,
                "variant": a["file"],
                "format": a["format"],
                "precision": a["precision"],
                "engine": a["engine"],
                "size_mb": a["size_bytes"] / 2**20,
                "cosine": a["verification"]["cosine"],
                "partitions": a.get("partitions"),
                **stats[a["file"]],
            }
        )
    for r in rows:
        r["achieved_gops"] = 2 * macs / (r["median_ms"] * 1e6)
        r["unpruned_eager_ms"] = stats[baseline]["median_ms"]
        r["x_vs_unpruned_eager"] = r.pop("speedup_vs_baseline")  # same cell, same run
    return rows


def _accuracy_cell(
    config: SweepConfig,
    checkpoint: str | None,
    ratio: float,
    importance: str,
    precisions: list[str],
    work: Path,
    seed: int = 0,
) -> list[dict[str, Any]]:
    from ..callbacks import MobileExport
    from .recipes import finetune_with_pruning, recipe_settings

    export = MobileExport(
        precisions=precisions,
        formats=list(config.formats),
        output_dir=str(work / "export"),
        overwrite=True,
        threads=config.threads,
        repeats=3,
        warmup=1,
        verify_batches=config.verify_batches,
        calibration_batches=2,
        min_top1_agreement=0.0,
        measure_memory=False,
        log_artifact=False,
        rank="none",
    )
    if checkpoint is None:
        raise ConfigError(
            "the accuracy experiments need a Fashion-MNIST checkpoint: --checkpoint or $PQV_FMNIST_CHECKPOINT"
        )
    steps = config.epochs * (config.train_subset // config.batch_size)
    recipe = recipe_settings(config.recipe, budget=False)
    if steps < 64:  # short budgets: one-shot after one statistics window
        recipe["iterative_steps"] = 1
    result = finetune_with_pruning(
        checkpoint,
        label=f"{importance} {ratio:g}",
        importance=importance,
        pruning_ratio=ratio,
        accumulate_batches=min(8, max(1, steps // 8)),
        train_subset=config.train_subset,
        epochs=config.epochs,
        batch_size=config.batch_size,
        data_dir=config.data_dir,
        test_subset=config.test_subset,
        seed=seed,
        extra_callbacks=[export],
        **recipe,
    )
    common = {
        "ratio": ratio,
        "importance": importance,
        "seed": seed,
        "recipe": config.recipe,
        "test_acc": result.test_acc,
        "test_images": result.test_images,
        "params": result.params,
        "macs": result.macs,
        "steps": result.steps,
        "seconds": result.seconds,
    }
    rows = [{**common, "precision": "fp32 eager", "val_acc": None}]
    for a in (export.manifest or {}).get("artifacts", []):
        if a["status"] != "skipped":
            rows.append(
                {
                    **common,
                    "format": a["format"],
                    "precision": a["precision"],
                    "val_acc": a["verification"].get("top1_accuracy"),
                    "val_images": a["verification"]["samples"],
                    "top1_agreement": a["verification"]["top1_agreement"],
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------- driver
def _cells(config: SweepConfig, checkpoint: str | None) -> list[tuple[str, str, Callable[[Path], list[dict]] | None]]:
    """``(experiment, key, compute)`` in run order; ``compute`` is None for a cell that shares the key (and
    rows) of an earlier one."""
    import torch.backends.quantized as q

    cells: list[tuple[str, str, Callable[[Path], list[dict]] | None]] = []
    # Every setting that changes a cell's numbers is in its key, so a resumed run never mixes cells
    # measured under other settings (they are recomputed instead).
    timing = dict(threads=config.threads, rounds=config.rounds, repeats=config.repeats)
    if "gemm" in config.experiments:
        cells.append(("gemm", _key("gemm", threads=config.threads), lambda w: [gemm_throughput(config.threads)]))
    if "latency" in config.experiments:
        latency_precisions = config.latency_precisions or config.precisions
        latency_formats = config.latency_formats or config.formats
        for m in config.latency_models:
            for r in config.ratios:
                # (the key name stays "format": a one-format list gives the keys of the one-format sweep)
                cells.append(
                    (
                        "latency",
                        _key(
                            "latency", format=latency_formats, model=m, ratio=r, precisions=latency_precisions, **timing
                        ),
                        partial(_latency_cell, config, m, r, list(latency_formats), latency_precisions, None),
                    )
                )
    if "engines" in config.experiments:
        engines: list[str] = [e for e in ("x86", "fbgemm", "qnnpack", "onednn") if e in q.supported_engines]
        for m in config.engine_models:
            cells.append(
                (
                    "engines",
                    _key("engines", model=m, ratio=config.engine_ratio, engines=engines, **timing),
                    partial(_latency_cell, config, m, config.engine_ratio, ["ptl"], ["int8-dynamic"], engines),
                )
            )
    needs_data = {"accuracy", "importance"} & set(config.experiments)
    if needs_data and checkpoint is None:
        raise InputNotFoundError(
            "the accuracy/importance experiments need a Fashion-MNIST ViT checkpoint: pass "
            "--checkpoint (or set $PQV_FMNIST_CHECKPOINT; the bundled one is missing from this "
            "installation)"
        )
    data = dict(
        train_subset=config.train_subset,
        epochs=config.epochs,
        batch_size=config.batch_size,
        test_subset=config.test_subset,
        data_dir=config.data_dir,
        verify_batches=config.verify_batches,
        threads=config.threads,
        checkpoint=_digest(checkpoint) if needs_data else None,
        recipe=_recipe_digest(config.recipe) if needs_data else None,
    )

    def accuracy_key(r: float) -> str:
        return _key("accuracy", format=config.formats, ratio=r, precisions=config.precisions, **data)

    if "accuracy" in config.experiments:
        for r in config.accuracy_ratios:
            cells.append(
                (
                    "accuracy",
                    accuracy_key(r),
                    partial(_accuracy_cell, config, checkpoint, r, "taylor", config.precisions),
                )
            )
    if "importance" in config.experiments:
        for seed in config.seeds:  # seed-major: an interrupted run has every criterion at the first seeds
            for imp in config.importances:
                if (
                    imp == "taylor"
                    and seed == 0
                    and "accuracy" in config.experiments
                    and config.importance_ratio in config.accuracy_ratios
                ):  # the same run: share its cell
                    cells.append(("importance", accuracy_key(config.importance_ratio), None))
                    continue
                cells.append(
                    (
                        "importance",
                        _key(
                            "importance",
                            format=config.formats,
                            importance=imp,
                            ratio=config.importance_ratio,
                            seed=seed,
                            **data,
                        ),
                        partial(_accuracy_cell, config, checkpoint, config.importance_ratio, imp, ["fp32"], seed=seed),
                    )
                )
    return cells


def _recipe_digest(name: str) -> str:
    """A recipe's identity by content: a changed recipe recomputes the cells that used it."""
    import hashlib

    from .recipes import recipe_settings

    settings = recipe_settings(name, budget=False)
    return f"{name}:" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def _key(kind: str, **settings: Any) -> str:
    """``kind|name=value|...``: a cell's identity, with every setting that changes its numbers."""
    return "|".join(
        [kind] + [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in settings.items()]
    )


def _digest(path: str | None) -> str | None:
    """A checkpoint's identity by content (its sha256, 16 hex digits), not by where it lies."""
    if path is None:
        return None
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:16]


def _cell_worker(config: dict[str, Any], checkpoint: str | None, key: str, work: str, result: str) -> None:
    compute = next(c for _, k, c in _cells(SweepConfig(**config), checkpoint) if k == key and c is not None)
    rows = compute(Path(work))
    atomic_write(Path(result), lambda p: Path(p).write_text(json.dumps(rows)))


def _in_worker(config: SweepConfig, checkpoint: str | None, key: str, work: Path) -> list[dict[str, Any]]:
    """Compute one cell in a fresh ``spawn`` process. Lowering and fine-tuning DeiT-sized models leaves
    gigabytes behind in a long-lived process (allocator caches, export state); a worker per cell
    gives it all back, so the sweep's memory stays that of its largest cell."""
    import multiprocessing

    result = work / "rows.json"
    worker = multiprocessing.get_context("spawn").Process(
        target=_cell_worker, args=(asdict(config), checkpoint, key, str(work), str(result)), name=f"sweep {key}"
    )
    worker.start()
    worker.join()
    if worker.exitcode != 0 or not result.is_file():
        raise SweepCellError(
            f"sweep cell {key!r} failed in its worker process (exit code {worker.exitcode}); its "
            "traceback is printed above. Finished cells are kept: rerun the same command to continue."
        )
    return json.loads(result.read_text())


def run_sweep(config: SweepConfig, progress: Callable[[int, int, str, bool], None] | None = None) -> dict[str, Any]:
    """Run every cell not yet in ``out_dir/cells.jsonl``; write ``sweep.csv``, ``results.json``,
    ``results.md``, ``summary.md`` and the plots. Returns ``{experiment: rows}``."""
    from .recipes import default_checkpoint, recipe_settings

    recipe_settings(config.recipe)  # an unknown recipe fails here, before any cell runs
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"seeds={config.seeds!r} must be a non-empty list of distinct integers")
    bad = [e for e in config.experiments if e not in EXPERIMENTS]
    if bad or not config.experiments:
        raise ConfigError(f"experiments={config.experiments!r}: unknown {bad}; allowed: {list(EXPERIMENTS)}")
    from ..export import PRECISIONS, TARGETS
    from ..pruning.importance import IMPORTANCE

    TARGETS.check(config.formats, "formats")
    if config.latency_formats is not None:
        TARGETS.check(config.latency_formats, "latency_formats")
    PRECISIONS.check(config.precisions)
    if config.latency_precisions is not None:
        PRECISIONS.check(config.latency_precisions, "latency_precisions")
    IMPORTANCE.check(config.importances, "importances")
    checkpoint = config.checkpoint or (str(default_checkpoint()) if default_checkpoint() else None)
    if checkpoint and not Path(checkpoint).is_file():
        raise InputNotFoundError(f"checkpoint {checkpoint}: no such file")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = CellStore(out / "cells.jsonl")
    cells = _cells(config, checkpoint)
    with torch_threads(config.threads):  # the caller's thread count is back afterwards
        for i, (_, key, compute) in enumerate(cells):
            cached = key in store
            if progress is not None:
                progress(i, len(cells), key, cached)
            if cached or config.report_only:
                continue
            with tempfile.TemporaryDirectory(dir=out, prefix=".cell-") as work:
                t0 = time.perf_counter()
                if config.isolate:
                    rows = _in_worker(config, checkpoint, key, Path(work))
                else:
                    assert compute is not None  # a cell that shares its key is cached by the one before it
                    rows = compute(Path(work))
                for r in rows:
                    r["cell_seconds"] = time.perf_counter() - t0
            store.add(key, rows)
    results: dict[str, list[dict[str, Any]]] = {e: [] for e in EXPERIMENTS}
    missing = list(dict.fromkeys(key for _, key, _ in cells if key not in store))
    for experiment, key, _ in cells:
        rows = store.cells.get(key, [])
        if experiment == "importance":  # fp32 only (a shared accuracy cell also has the other precisions)
            rows = [r for r in rows if r["precision"] in ("fp32 eager", "fp32")]
        results[experiment] += rows
    _attach_peak_fraction(results)
    _write(out, config, results, missing)
    return results


def _attach_peak_fraction(results: dict[str, list[dict[str, Any]]]) -> None:
    if not results["gemm"]:
        return
    peak = results["gemm"][0]
    for row in results["latency"] + results["engines"]:
        row["fraction_of_host_gemm"] = row["achieved_gops"] / _peak_for(peak, str(row["precision"]))


def _peak_for(peak: dict[str, Any], precision: str) -> float:
    """The host's GEMM throughput a file of ``precision`` is measured against: int8's for int8, fp32's
    for fp32; a half-precision file against the faster of fp32 and bf16 (OpenVINO's fp16 IRs compute
    in bf16 on CPUs with bf16 units; a gemm cell from before bf16 was measured has only fp32)."""
    if precision.startswith("int8"):
        return peak["int8_gops"]
    if precision in ("fp16", "bf16"):
        return max(peak["fp32_gops"], peak.get("bf16_gops", 0.0))
    return peak["fp32_gops"]


def _write(out: Path, config: SweepConfig, results: dict[str, list[dict[str, Any]]], missing: list[str]) -> None:
    from .sweep_report import markdown_report, summary_markdown, sweep_plots

    rows = [{"experiment": e, **r} for e, rs in results.items() for r in rs]
    fields = list(dict.fromkeys(k for r in rows for k in r))

    def write_csv(p: str) -> None:
        with open(p, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "sweep.csv", write_csv)
    atomic_write(
        out / "results.json",
        lambda p: Path(p).write_text(
            json.dumps({"config": asdict(copy.deepcopy(config)), "results": results}, indent=1)
        ),
    )
    plots = sweep_plots(results, out)
    note = (
        (
            f"**Partial report**: {len(missing)} cell(s) not run yet: "
            + ", ".join(f"`{k}`" for k in missing)
            + ". Rerun the sweep without `--report-only` to finish them.\n\n"
        )
        if missing
        else ""
    )
    atomic_write(out / "results.md", lambda p: Path(p).write_text(note + markdown_report(results, config, plots)))
    atomic_write(out / "summary.md", lambda p: Path(p).write_text(note + summary_markdown(results, config)))
