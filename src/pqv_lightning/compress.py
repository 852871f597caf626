"""From a trained model to verified, timed mobile files without a training loop.

:func:`compress` prunes a trained model post-training — one-shot or in a few events, each followed by
the least-squares reconstruction of :mod:`pqv_lightning.pruning.reconstruction` on a few hundred
calibration images (no optimizer, no labels needed) — then quantizes, exports, verifies and times it
with :func:`~pqv_lightning.export.export_mobile`, and writes a trade-off table. ``pqv compress`` is the
command line on top of it.

The work is split in stages whose results are kept in the output folder, so an interrupted run
resumes where it stopped when it is called again with the same model, calibration images and
configuration:

* ``pruned.pt`` — the pruned network: ``{"state_dict", "pqv_structured_pruning"}``, the format of a
  pruned checkpoint (:func:`~pqv_lightning.restore_pruned_module` rebuilds it on a fresh model);
* ``compress.json`` — what each finished stage measured (pruning, accuracy, export), rewritten
  atomically after each;
* the export's files and ``manifest.json``; ``compress.md`` — the trade-off table.

Example::

    from pqv_lightning.compress import CompressConfig, compress
    from pqv_lightning.export import MobileExportConfig
    from pqv_lightning.pruning import PruningConfig

    report = compress(
        model,                                  # a trained timm ViT (not modified)
        calibration_images,                     # a tensor (N, C, H, W) or batches of images
        CompressConfig(
            pruning=PruningConfig(importance="l2", pruning_ratio=0.5, reconstruct=True),
            export=MobileExportConfig(formats=["onnx"], precisions=["fp32", "int8-dynamic"], output_dir="out"),
        ),
        validation=val_loader,                  # optional (images, labels) batches: accuracy
    )
    print(report["table"])
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_bool, check_forward, check_int, check_number, check_writable_dir
from .errors import ConfigError
from .export import MobileExportConfig, export_mobile
from .export.benchmark import summarize, time_calls
from .export.host import host_description, host_label
from .fileio import atomic_write_text, load_tensors, staged
from .latency_budget import LatencyBudget, check_global_heads, ratio_for_latency, widths_for_latency
from .outputs import logits_of
from .progress import Progress
from .pruning import PruningConfig, StructuredPruner, restore_structure
from .pruning.adapters import find_adapter, input_shape_for, no_adapter_error
from .pruning.checkpoint import CHECKPOINT_KEY
from .pruning.importance import IMPORTANCE
from .pruning.reconstruction import samples_needed
from .settings import torch_threads

__all__ = ["CompressConfig", "LatencyBudget", "compress", "load_compressed", "trade_off_table"]

#: bump when the stages' files change meaning: an older folder is then not resumed from
STATE_VERSION = 1
#: the accuracy-floor search stops once the passing and the failing ratio are this close
SEARCH_RESOLUTION = 1 / 32
REPORT = "compress.json"
PRUNED = "pruned.pt"
TABLE = "compress.md"


def _default_pruning() -> PruningConfig:
    # post-training: a criterion that needs no gradients, and the refit that makes pruning nearly free
    return PruningConfig(importance="l2", reconstruct=True)


@dataclass
class CompressConfig:
    """How :func:`compress` prunes, exports and checks a trained model.

    Args:
        pruning: what to prune (:class:`~pqv_lightning.pruning.PruningConfig`: ratio or budget, events,
            criterion, ``round_to``...). Default: L2 magnitude, the default ratio (25 % of the
            channels), one event, least-squares reconstruction of every Linear. A criterion that reads
            gradients (``taylor``, ``hessian``) needs labelled calibration batches.
        export: what files to write, and where (:class:`~pqv_lightning.export.MobileExportConfig`; its
            ``output_dir`` is this run's folder, its ``overwrite`` lets a run replace a folder that
            holds another run).
        calibration_images: how many calibration images to use (the first ones given); fewer are
            refused when the reconstruction's widest layer needs more (the error says how many).
        validation_images: use only the first N validation images (None: all; they are held in memory).
        batch_size: images per forward pass during calibration, accuracy and reconstruction.
        time_unpruned: time the unpruned model in fp32 eager too (same warm-up and repeats as the
            export's baseline), so the table states each file's speed-up over the model given.
        max_accuracy_drop: an accuracy floor instead of a size, in percentage points (``0.5``: at most
            half a point below the unpruned model): the channel ratio is searched (bisection to within
            :data:`SEARCH_RESOLUTION`, each trial pruned and refitted from the unpruned model and
            evaluated on all validation images) and the largest ratio whose fp32 validation accuracy
            stays within the drop is compressed; ``pruning.pruning_ratio`` is then not used. Needs
            labelled validation data, and no MAC / parameter budget. The floor is met on the data it was
            searched on; hold out other data to report an unbiased accuracy.
        max_ratio: the largest channel ratio the accuracy-floor search tries, in ``(0, 1)``.
        target_latency: a latency budget on one export target instead of a size
            (:class:`~pqv_lightning.latency_budget.LatencyBudget`: ms or a fraction of the unpruned
            model, the format and precision it is measured on): the smallest channel ratio whose file
            meets it on this host is searched (:func:`~pqv_lightning.latency_budget.ratio_for_latency`,
            trials kept for resume) and compressed; the table puts the search's measurement beside the
            exported file's. Not with a MAC / parameter budget or an accuracy floor.
    """

    pruning: PruningConfig = field(default_factory=_default_pruning)
    export: MobileExportConfig = field(default_factory=MobileExportConfig)
    calibration_images: int = 256
    validation_images: int | None = None
    batch_size: int = 64
    time_unpruned: bool = True
    max_accuracy_drop: float | None = None
    max_ratio: float = 0.9
    target_latency: LatencyBudget | None = None

    def validate(self) -> None:
        if not isinstance(self.pruning, PruningConfig):
            raise ConfigError(f"pruning must be a PruningConfig, got {type(self.pruning).__name__}")
        if not isinstance(self.export, MobileExportConfig):
            raise ConfigError(f"export must be a MobileExportConfig, got {type(self.export).__name__}")
        self.pruning.validate()
        self.export.validate()
        check_int("calibration_images", self.calibration_images, minimum=1)
        if self.validation_images is not None:
            check_int("validation_images", self.validation_images, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_bool("time_unpruned", self.time_unpruned)
        check_number("max_ratio", self.max_ratio, minimum=0, maximum=1, min_open=True, max_open=True)
        if self.target_latency is not None:
            if not isinstance(self.target_latency, LatencyBudget):
                raise ConfigError(
                    f"target_latency must be a LatencyBudget (e.g. LatencyBudget(0.5, format='onnx')), got "
                    f"{type(self.target_latency).__name__}"
                )
            self.target_latency.validate()
            others = {**self.pruning.budget, "max_accuracy_drop": self.max_accuracy_drop}
            given = {k: v for k, v in others.items() if v is not None}
            if given:
                raise ConfigError(f"give target_latency or {given}, not both: each decides the ratio")
            if self.target_latency.allocation == "global":
                check_global_heads(bool(self.pruning.prune_num_heads))
            if self.pruning.global_pruning or self.pruning.group_widths is not None:
                raise ConfigError(
                    "target_latency decides the widths (LatencyBudget.allocation: 'uniform' or 'global'); "
                    "allowed: global_pruning=False and no group_widths"
                )
        if self.max_accuracy_drop is not None:
            check_number("max_accuracy_drop", self.max_accuracy_drop, minimum=0, maximum=100)
            if self.pruning.budget:
                name, value = next(iter(self.pruning.budget.items()))
                raise ConfigError(
                    f"max_accuracy_drop={self.max_accuracy_drop!r} searches the ratio: give it or a budget "
                    f"({name}={value!r}), not both"
                )


# ---------------------------------------------------------------------------------------------- inputs
def _images_and_labels(data: Any, limit: int | None, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``limit`` images of ``data`` (a tensor of images, or batches of images or of
    ``(images, labels)``) as one float tensor, with their labels when every batch has them."""
    if isinstance(data, torch.Tensor):
        batches: Iterable[Any] = [data]
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        batches = data
    else:
        raise ConfigError(
            f"{name} must be a tensor of images (N, C, H, W) or an iterable of image batches or "
            f"(images, labels) batches (a DataLoader), got {type(data).__name__}"
        )
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    labelled = True
    count = 0
    for item in batches:
        if limit is not None and count >= limit:
            break
        x, y = (item, None) if isinstance(item, torch.Tensor) else (item[0], item[1] if len(item) > 1 else None)
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
            raise ConfigError(
                f"{name}: a batch holds {type(x).__name__}"
                + (f" of shape {list(x.shape)} and dtype {x.dtype}" if isinstance(x, torch.Tensor) else "")
                + "; allowed: float image tensors (N, C, H, W)"
            )
        xs.append(x.detach().float().cpu())
        if isinstance(y, torch.Tensor) and y.shape[:1] == x.shape[:1]:
            ys.append(y.detach().long().cpu())
        else:
            labelled = False
        count += len(x)
    if not xs:
        raise ConfigError(f"{name} holds no images")
    shapes = {tuple(x.shape[1:]) for x in xs}
    if len(shapes) > 1:
        raise ConfigError(f"{name}: batches of different image shapes {sorted(shapes)}; allowed: one shape")
    images = torch.cat(xs)[:limit]
    if not bool(torch.isfinite(images).all()):
        raise ConfigError(f"{name} contains NaN or infinite values")
    labels = torch.cat(ys)[:limit] if labelled and ys else None
    return images, labels


def _check_shape(model: nn.Module, images: torch.Tensor, name: str) -> None:
    expected = tuple(input_shape_for(model))[1:]
    if tuple(images.shape[1:]) != expected:
        raise ConfigError(
            f"{name}: images of shape {list(images.shape[1:])} do not fit {type(model).__name__}, which takes "
            f"{list(expected)} (channels, height, width)"
        )


def _check_enough(model: nn.Module, config: PruningConfig, images: torch.Tensor) -> None:
    """Refuse calibration too small for the widest refitted layer's least-squares system."""
    if not config.reconstruct:
        return
    adapter = find_adapter(model)
    assert adapter is not None
    layers = config.layers_to_refit(adapter, model)
    needed, layer, width = samples_needed(model, layers, images[:1])
    if len(images) < needed:
        raise ConfigError(
            f"calibration has {len(images)} images; the reconstruction of {layer!r} ({width} inputs) needs at "
            f"least {needed}: give {needed} or more (calibration_images), or reconstruct=False"
        )


def _check_criterion(config: PruningConfig, labels: torch.Tensor | None) -> None:
    if IMPORTANCE[config.importance].statistics is not None and labels is None:
        free = [n for n in IMPORTANCE.names() if IMPORTANCE[n].statistics is None]
        raise ConfigError(
            f"importance={config.importance!r} reads gradients of a loss: give labelled calibration batches "
            f"((images, labels)), or a criterion that needs none: {free}"
        )


def _digest(model: nn.Module, config: CompressConfig, *data: torch.Tensor | None) -> str:
    """What a finished stage depends on: the model's weights, the configuration and the data."""
    h = hashlib.sha256(f"v{STATE_VERSION} {type(model).__qualname__}".encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name} {list(tensor.shape)} {tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    settings = dataclasses.asdict(config)  # every option, nested configs included
    for where in ("output_dir", "overwrite"):  # where the files go is not what they hold
        settings["export"].pop(where)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for tensor in data:
        h.update(b"-" if tensor is None else tensor.contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- stages
def _prune(
    model: nn.Module,
    config: CompressConfig,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    progress: Progress | None,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Prune a copy of ``model``: each event on the calibration images, then its reconstruction."""
    pruned = copy.deepcopy(model).float().cpu()
    t0 = time.perf_counter()
    pruner = StructuredPruner(pruned, config.pruning, example_inputs=images[:1])
    batches = list(images.split(config.batch_size))
    for _ in range(pruner.iterative_steps):
        if pruner.stats is not None:  # gradient criteria: one pass over the labelled calibration images
            assert labels is not None
            pruned.eval()
            for x, y in zip(batches, labels.split(config.batch_size), strict=True):
                pruned.zero_grad(set_to_none=True)
                F.cross_entropy(_logits(pruned, x), y).backward()
                pruner.accumulate()
        pruner.step(calibration=batches, progress=progress)
    pruned.zero_grad(set_to_none=True)
    pruned.eval()
    events = [dataclasses.asdict(e) for e in pruner.events]
    last = pruner.events[-1]
    info = {
        "seconds": time.perf_counter() - t0,
        "config": dataclasses.asdict(pruner.config),
        "ratio_reached": pruner.ratio_reached(),
        "params_before": pruner.initial_params,
        "params_after": last.params_after,
        "macs_before": pruner.initial_macs,
        "macs_after": last.macs_after,
        "widths": pruner.widths(),
        "events": events,
    }
    return pruned, pruner.state_dict(), info


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = logits_of(model(x))  # a Hugging Face classifier's output holds them
    if logits is None:
        raise ConfigError(f"{type(model).__name__} returns no logits tensor: accuracy and gradient criteria need one")
    return logits


@torch.no_grad()
def _accuracy(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((_logits(model, x).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def _save_pruned(path: Path, network: nn.Module, structure: dict[str, Any], key: str) -> None:
    blob = {"state_dict": network.state_dict(), CHECKPOINT_KEY: structure, "compress_key": key}
    with staged(path) as tmp:
        torch.save(blob, tmp)


def load_compressed(model: nn.Module, path: str | Path) -> nn.Module:
    """The pruned network of a :func:`compress` folder (or its ``pruned.pt``), rebuilt on ``model``
    (a fresh, unpruned instance of the model that was compressed; reshaped in place and returned)."""
    path = Path(path)
    file = path / PRUNED if path.is_dir() else path
    blob = load_tensors(file, "pruned")
    if not isinstance(blob, dict) or CHECKPOINT_KEY not in blob or "state_dict" not in blob:
        raise ConfigError(f"{str(file)!r} is not a pruned network written by compress()")
    restore_structure(model, blob[CHECKPOINT_KEY])
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def _latency(model: nn.Module, example: torch.Tensor, export: MobileExportConfig) -> dict[str, float]:
    with torch_threads(export.threads), torch.no_grad():
        return summarize(time_calls(model.eval(), example, export.warmup, export.repeats))


# ---------------------------------------------------------------------------------------------- main
def compress(
    model: nn.Module,
    calibration: Any,
    config: CompressConfig | None = None,
    *,
    validation: Any = None,
    input_normalization: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Prune ``model`` post-training, export it, verify and time every file; returns the report
    (also in ``<output_dir>/compress.json``), whose ``"table"`` is the trade-off table in Markdown.

    ``calibration``: images the pruning and its reconstruction run on (and ``int8-static`` calibrates
    on): a tensor ``(N, C, H, W)`` or batches of images or of ``(images, labels)`` (a DataLoader);
    labels are needed only by gradient criteria. ``validation``: optional ``(images, labels)``
    batches: the unpruned and the pruned model's accuracy on all of them, and each file's accuracy
    on the export's verification batches. ``model`` is not modified. ``progress(done, total, what)``
    is told of each refitted layer and each exported file.

    Everything is checked before long work: the configuration, the folder (empty, or a previous run
    of the same inputs to resume, or ``export.overwrite``), the image shape against the model's
    input, enough calibration images for the reconstruction, a criterion that needs labels.
    """
    config = CompressConfig() if config is None else config
    if not isinstance(config, CompressConfig):
        raise ConfigError(f"config must be a CompressConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    if find_adapter(model) is None:
        raise no_adapter_error(model)
    images, labels = _images_and_labels(calibration, config.calibration_images, "calibration")
    _check_shape(model, images, "calibration")
    reference = copy.deepcopy(model).float().cpu().eval()
    check_forward("calibration", reference, images[:1])
    _check_criterion(config.pruning, labels)
    _check_enough(reference, config.pruning, images)
    val: list[tuple[torch.Tensor, torch.Tensor]] = []
    val_images = val_labels = None
    if validation is not None:
        val_images, val_labels = _images_and_labels(validation, config.validation_images, "validation")
        _check_shape(model, val_images, "validation")
        if val_labels is not None:
            val = list(zip(val_images.split(config.batch_size), val_labels.split(config.batch_size), strict=True))
    if config.max_accuracy_drop is not None and not val:
        raise ConfigError(
            f"max_accuracy_drop={config.max_accuracy_drop!r} needs labelled validation data "
            "(validation=(images, labels) batches; pqv compress --validation)"
        )
    key = _digest(reference, config, images, labels, val_images, val_labels)
    out = check_writable_dir("output_dir", config.export.output_dir)
    report = _open_folder(out, key, config.export.overwrite)

    stages = report["stages"]
    pruned_file = out / PRUNED
    if "prune" in stages and pruned_file.is_file():
        pruned = load_compressed(copy.deepcopy(reference), pruned_file)
    else:
        pruning = config.pruning
        if config.max_accuracy_drop is not None:
            ratio = _search(reference, config, images, labels, val, report, out, progress)
            pruning = dataclasses.replace(pruning, pruning_ratio=ratio)
        if config.target_latency is not None:
            decided = _latency_search(reference, config, images, report, out, progress)
            if isinstance(decided, dict):  # global allocation: a width per group
                pruning = dataclasses.replace(pruning, pruning_ratio=None, group_widths=decided)
            else:
                pruning = dataclasses.replace(pruning, pruning_ratio=decided)
        run = dataclasses.replace(config, pruning=pruning)
        pruned, structure, stages["prune"] = _prune(reference, run, images, labels, progress)
        _save_pruned(pruned_file, pruned, structure, key)
        _write_report(out, report)
    if val and "accuracy" not in stages:
        stages["accuracy"] = {
            "images": sum(len(y) for _, y in val),
            "unpruned": _accuracy(reference, val),
            "pruned": _accuracy(pruned, val),
        }
        _write_report(out, report)
    if config.time_unpruned and "unpruned_latency" not in stages:
        stages["unpruned_latency"] = _latency(reference, images[:1], config.export)
        _write_report(out, report)
    if "export" not in stages or not (out / "manifest.json").is_file():
        t0 = time.perf_counter()
        export = dataclasses.replace(config.export, output_dir=str(out), overwrite=True)
        manifest = export_mobile(
            pruned,
            images[:1],
            export,
            validation_data=val or None,
            calibration_data=list(images.split(config.batch_size)),
            input_normalization=input_normalization,
            progress=progress,
        )
        stages["export"] = {"seconds": time.perf_counter() - t0, "manifest": "manifest.json"}
        report["manifest"] = manifest
        _write_report(out, report)
    else:
        report["manifest"] = json.loads((out / "manifest.json").read_text())
    report["table"] = trade_off_table(report)
    atomic_write_text(out / TABLE, report["table"] + "\n")
    _write_report(out, report)
    return report


def _search(
    reference: nn.Module,
    config: CompressConfig,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    val: Sequence[tuple[torch.Tensor, torch.Tensor]],
    report: dict[str, Any],
    out: Path,
    progress: Progress | None,
) -> float:
    """The largest channel ratio in ``(0, max_ratio]`` (to within :data:`SEARCH_RESOLUTION`) whose pruned,
    refitted network keeps fp32 validation accuracy within ``max_accuracy_drop`` points of the unpruned
    one, by bisection (accuracy is taken to fall as the ratio grows). Every trial is kept in the report."""
    assert config.max_accuracy_drop is not None
    search = report["stages"].setdefault("search", {"max_accuracy_drop": config.max_accuracy_drop, "trials": {}})
    if "unpruned" not in search:
        search["unpruned"] = _accuracy(reference, val)
        _write_report(out, report)
    floor = search["unpruned"] - config.max_accuracy_drop / 100
    trials: dict[str, dict[str, float]] = search["trials"]

    def passes(ratio: float) -> bool:
        name = f"{ratio:.6f}"
        if name not in trials:
            t0 = time.perf_counter()
            trial = dataclasses.replace(config, pruning=dataclasses.replace(config.pruning, pruning_ratio=ratio))
            network, _, info = _prune(reference, trial, images, labels, None)
            trials[name] = {
                "ratio": ratio,
                "ratio_reached": info["ratio_reached"],
                "accuracy": _accuracy(network, val),
                "seconds": time.perf_counter() - t0,
            }
            _write_report(out, report)
            if progress is not None:
                progress(len(trials), len(trials), f"ratio {ratio:.3f}: {100 * trials[name]['accuracy']:.2f} %")
        return trials[name]["accuracy"] >= floor

    lo, hi = 0.0, config.max_ratio
    if passes(hi):
        lo = hi
    while hi - lo > SEARCH_RESOLUTION:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if passes(mid) else (lo, mid)
    if lo == 0.0:
        smallest = min(trials.values(), key=lambda t: t["ratio"])
        raise ConfigError(
            f"max_accuracy_drop={config.max_accuracy_drop!r}: no channel ratio keeps validation accuracy within "
            f"{config.max_accuracy_drop} points of the unpruned {100 * search['unpruned']:.2f} %; the smallest ratio "
            f"tried, {smallest['ratio']:.3f}, reached {100 * smallest['accuracy']:.2f} % (trials in {out / REPORT})"
        )
    search["ratio"] = lo
    _write_report(out, report)
    return lo


def _latency_search(
    reference: nn.Module,
    config: CompressConfig,
    images: torch.Tensor,
    report: dict[str, Any],
    out: Path,
    progress: Progress | None,
) -> float | dict[str, int]:
    """The channel ratio (uniform allocation, :func:`ratio_for_latency`) or the width per group (global
    allocation, :func:`widths_for_latency`) of ``config.target_latency``, its trials kept in the report."""
    budget = config.target_latency
    assert budget is not None
    stages = report["stages"]
    done = stages.get("latency", {})
    if "group_widths" in done:
        return dict(done["group_widths"])
    if "ratio" in done:
        return float(done["ratio"])
    trials = dict(done.get("trials", {}))

    def on_trial(row: dict[str, Any]) -> None:
        trials[row["key"]] = row
        stages["latency"] = {"trials": trials}
        _write_report(out, report)
        if progress is not None:
            what = f"ratio {row['ratio']:.3f}" if "ratio" in row else "a width per group"
            progress(len(trials), len(trials), f"{what}: {row['ms']:.2f} ms")

    decided: float | dict[str, int]
    if budget.allocation == "global":  # a unit's cost: its saliency under the Fisher on the calibration images
        decided, info = widths_for_latency(
            reference,
            budget,
            config.pruning,
            example_inputs=images[:1],
            trials=trials,
            on_trial=on_trial,
            calibration=list(images.split(config.batch_size)),
        )
    else:
        decided, info = ratio_for_latency(
            reference, budget, config.pruning, example_inputs=images[:1], trials=trials, on_trial=on_trial
        )
    stages["latency"] = info
    _write_report(out, report)
    return decided


def _open_folder(out: Path, key: str, overwrite: bool) -> dict[str, Any]:
    """The report to continue: the folder's own when it holds a run of the same inputs, else a new one
    (a folder with other content needs ``overwrite``; our previous files are then removed)."""
    fresh: dict[str, Any] = {
        "version": STATE_VERSION,
        "key": key,
        "host": host_label(host_description()),
        "stages": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            previous = {}
        if previous.get("key") == key and previous.get("version") == STATE_VERSION:
            previous.pop("table", None)
            return previous
    if any(p for p in out.iterdir() if not p.name.startswith(".")) and not overwrite:
        what = "a compress run of other inputs" if path.is_file() else "other files"
        raise ConfigError(
            f"output_dir={str(out)!r} holds {what}; pass overwrite=True (--overwrite) to replace it, or another "
            "folder (a run with the same model, calibration and options resumes in its own folder)"
        )
    for name in (REPORT, PRUNED, TABLE):
        (out / name).unlink(missing_ok=True)
    return fresh


def _write_report(out: Path, report: dict[str, Any]) -> None:
    atomic_write_text(out / REPORT, json.dumps({k: v for k, v in report.items() if k != "manifest"}, indent=1))


def trade_off_table(report: dict[str, Any]) -> str:
    """Markdown: the unpruned and pruned model in fp32 eager, then every exported file: accuracy,
    parameters / MACs, size, latency and speed-up over the unpruned model."""
    stages, manifest = report["stages"], report.get("manifest") or {}
    prune = stages["prune"]
    acc = stages.get("accuracy", {})
    unpruned_ms = (stages.get("unpruned_latency") or {}).get("median_ms")
    pruned_ms = (manifest.get("baseline_fp32_eager") or {}).get("latency", {}).get("median_ms")

    def pct(value: float | None) -> str:
        return f"{100 * value:.2f} %" if value is not None else "-"

    def ms(value: float | None) -> str:
        return f"{value:.2f} ms" if value else "-"

    def speedup(value: float | None) -> str:
        return f"{unpruned_ms / value:.2f}x" if value and unpruned_ms else "-"

    verified = next(
        (a["verification"].get("samples") for a in manifest.get("artifacts", []) if a.get("verification")), None
    )
    lines = [
        f"Pruned {100 * prune['ratio_reached']:.1f} % of the channels in {len(prune['events'])} event(s), "
        f"{prune['seconds']:.1f} s; accuracy "
        + (f"on {acc['images']:,} validation images" if acc else "not measured (no labelled validation data)")
        + (f"; a file's on the {verified} images it was verified on" if verified and acc else "")
        + f". Host: {report.get('host', '?')}.",
        "",
        "| model | accuracy | params | MACs | size | latency (median) | vs unpruned fp32 eager | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|",
        f"| unpruned, fp32 eager | {pct(acc.get('unpruned'))} | {prune['params_before'] / 1e6:.2f} M | "
        f"{prune['macs_before'] / 1e6:.1f} M | - | {ms(unpruned_ms)} | {'1.00x' if unpruned_ms else '-'} | - |",
        f"| pruned, fp32 eager | {pct(acc.get('pruned'))} | {prune['params_after'] / 1e6:.2f} M | "
        f"{prune['macs_after'] / 1e6:.1f} M | - | {ms(pruned_ms)} | {speedup(pruned_ms)} | - |",
    ]
    for a in manifest.get("artifacts", []):
        if a["status"] == "skipped":
            lines.append(f"| {a['file']} | skipped: {a['reason']} | | | | | | |")
            continue
        v = a.get("verification", {})
        lat = (a.get("latency") or {}).get("median_ms")  # in-process, like both eager rows
        lines.append(
            f"| {a['file']} ({a['status']}) | {pct(v.get('top1_accuracy'))} | | | {a['size_bytes'] / 2**20:.2f} MB | "
            f"{ms(lat)} | {speedup(lat)} | {pct(v.get('top1_agreement'))} |"
        )
    search = stages.get("search")
    if search and "ratio" in search:
        trials = sorted(search["trials"].values(), key=lambda t: t["ratio"])
        tried = ", ".join(f"{t['ratio']:.3f}: {100 * t['accuracy']:.2f} %" for t in trials)
        lines += [
            "",
            f"Accuracy floor: at most {search['max_accuracy_drop']} points below the unpruned "
            f"{100 * search['unpruned']:.2f} % on the validation images; ratio {search['ratio']:.3f} chosen from "
            f"{len(trials)} trials (ratio: fp32 accuracy; {tried}).",
        ]
    latency = stages.get("latency")
    if latency and "ratio" in latency:
        budget = LatencyBudget(**latency["budget"])
        file = next(
            (
                a
                for a in manifest.get("artifacts", [])
                if a.get("format") == budget.format and a.get("precision") == budget.precision and a["status"] == "ok"
            ),
            None,
        )
        measured = ""
        if file is not None:
            ranked = (file.get("latency_round_robin") or {}).get("median_ms")
            measured = f"; the exported {file['file']}: {ms(ranked or file['latency']['median_ms'])}" + (
                " (ranked round-robin)" if ranked else " (in-process)"
            )
        lines += [
            "",
            f"Latency budget: {budget.describe()} (a fraction {latency['budget_fraction']:.3f} of the unpruned "
            f"{latency['unpruned_ms']:.2f} ms): ratio {latency['ratio']:.3f} chosen from {len(latency['trials'])} trials, "
            f"its file measured {latency['predicted_ms']:.2f} ms ({latency['predicted_fraction']:.3f}) in the "
            f"search{measured}.",
        ]
    best = manifest.get("best")
    if best:
        lines += [
            "",
            f"Fastest verified file on this host: {best['file']} ({best['runtime']}), {ms(best['median_ms'])}.",
        ]
    return "\n".join(lines)
