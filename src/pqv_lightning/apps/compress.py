"""``pqv compress``: a trained model to pruned, quantized, verified, timed mobile files, no training.

    pqv compress                                        # the bundled Fashion-MNIST ViT, 25 % channels
    pqv compress --ratio 0.5 --output-dir runs/vit50    # half the channels
    pqv compress --model deit_base_patch16_224 --weights deit.pt --calibration imagenet/train \\
                 --validation imagenet/val --validation-images 2000 --formats onnx openvino

The model is ``--checkpoint`` (the bundled ``vit_tiny_fmnist.pt`` format; default: the bundled ViT)
or ``--model`` (a timm / pqv model name; ``--weights`` a state-dict file, ``--pretrained`` the hub's
weights). Calibration and validation images come from a Fashion-MNIST IDX folder (calibration: a
random draw from the training split; validation: the test split), an ImageFolder (``<class>/*.jpg``,
resized and normalized the way timm's data config for the model says) or a tensor file
(``torch.save`` of images, of ``(images, labels)`` or of ``{"images": ..., "labels": ...}``).
For the bundled ViT both default to the installed Fashion-MNIST (``--data-dir``). Validation data is
optional elsewhere (without it, no accuracy, only agreement with the unpruned model).

Pruning is post-training (:func:`pqv_lightning.compress.compress`): one-shot or ``--events`` events,
each followed by a least-squares refit of the Linear layers on the calibration images. Everything
lands in ``--output-dir``: ``pruned.pt``, the exported files with ``manifest.json``, ``compress.json``
and the trade-off table ``compress.md``. An interrupted run resumes: run the same command again.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputNotFoundError

__all__ = ["add_compress_arguments", "run_compress"]

#: what a Fashion-MNIST IDX folder holds (the training images: the folder's mark)
_IDX_MARK = "train-images-idx3-ubyte.gz"


def add_compress_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .command import LazyChoices, count_at_least

    importance = LazyChoices("pqv_lightning.pruning.importance", "IMPORTANCE")
    targets = LazyChoices("pqv_lightning.export.targets", "TARGETS")
    precisions = LazyChoices("pqv_lightning.export.precisions", "PRECISIONS")
    rankings = LazyChoices("pqv_lightning.export.core", "RANKINGS")
    model = ap.add_argument_group("model")
    model.add_argument("--checkpoint", default=None, help="a vit_tiny_fmnist.pt-format checkpoint (default: bundled)")
    model.add_argument("--model", default=None, metavar="NAME", help="a timm or pqv model name instead")
    model.add_argument("--weights", default=None, metavar="PATH", help="state-dict file for --model")
    model.add_argument("--pretrained", action="store_true", help="--model with its hub weights (needs network)")
    data = ap.add_argument_group("data")
    data.add_argument(
        "--calibration",
        default=None,
        metavar="PATH",
        help="calibration images: Fashion-MNIST IDX folder, ImageFolder or tensor file (default for the "
        "bundled ViT: --data-dir's training split)",
    )
    data.add_argument(
        "--validation",
        default=None,
        metavar="PATH",
        help="labelled validation images, same kinds (default for the bundled ViT: --data-dir's test split)",
    )
    data.add_argument(
        "--data-dir",
        default=None,
        help="Fashion-MNIST folder (default: $PQV_FMNIST_DIR, else /usr/share/datasets/fashion-mnist)",
    )
    data.add_argument(
        "--calibration-images",
        type=count_at_least(1),
        default=None,
        metavar="N",
        help="calibration images used (default: CompressConfig's, 256)",
    )
    data.add_argument(
        "--validation-images", type=count_at_least(1), default=None, metavar="N", help="first N only (default: all)"
    )
    data.add_argument("--seed", type=int, default=0, help="draw of the calibration images (default 0)")
    prune = ap.add_argument_group("pruning (unset: PruningConfig's defaults, L2 importance, reconstruction)")
    budget = prune.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, default=None, help="channel ratio to remove (default 0.25)")
    budget.add_argument("--target-macs", type=float, default=None, help="MAC budget: fraction (< 1) or count")
    budget.add_argument("--target-params", type=float, default=None, help="parameter budget: fraction or count")
    budget.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=None,
        metavar="POINTS",
        help="an accuracy floor instead: the largest ratio whose validation accuracy stays within this many "
        "points of the unpruned model (searched; needs validation data)",
    )
    budget.add_argument(
        "--target-latency",
        type=float,
        default=None,
        metavar="MS",
        help="a latency budget instead: ms per call, or below 1 a fraction of the unpruned model, measured "
        "on --latency-for at --latency-precision on this host (searched by exporting and timing)",
    )
    prune.add_argument(
        "--latency-for", default=None, choices=targets, metavar="FORMAT", help="%(choices)s (default: onnx)"
    )
    prune.add_argument(
        "--latency-precision", default=None, choices=precisions, metavar="PRECISION", help="default: fp32"
    )
    prune.add_argument(
        "--latency-allocation",
        default=None,
        choices=LazyChoices("pqv_lightning.latency_budget", "ALLOCATIONS"),
        help="how --target-latency's widths are chosen: one ratio for every layer, or a width per group from "
        "a per-layer latency table of the runtime (default: uniform)",
    )
    prune.add_argument(
        "--max-ratio", type=float, default=None, help="largest ratio the floor's search tries (default 0.9)"
    )
    prune.add_argument("--events", type=count_at_least(1), default=None, help="pruning events (default 1)")
    prune.add_argument("--importance", default=None, choices=importance, metavar="NAME", help="%(choices)s")
    prune.add_argument("--round-to", type=count_at_least(1), default=None, metavar="N", help="widths multiple of N")
    prune.add_argument("--no-reconstruct", action="store_true", help="prune without the least-squares refit")
    export = ap.add_argument_group("export")
    export.add_argument(
        "--formats",
        nargs="+",
        default=None,
        choices=targets,
        metavar="FORMAT",
        help="%(choices)s (default: pte, onnx and openvino where installed, else ptl)",
    )
    export.add_argument(
        "--precisions",
        nargs="+",
        default=None,
        choices=precisions,
        metavar="PRECISION",
        help="%(choices)s (default: MobileExportConfig's, fp32 int8-dynamic)",
    )
    export.add_argument("--rank", default=None, choices=rankings, metavar="HOW", help="%(choices)s (naming 'best')")
    export.add_argument("--threads", type=count_at_least(1), default=None, help="threads (default 2)")
    export.add_argument("--output-dir", default="runs/compressed", help="where everything goes")
    export.add_argument("--overwrite", action="store_true", help="replace what --output-dir holds")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.description = __doc__.split("\n\n")[0]
    return ap


# ---------------------------------------------------------------------------------------------- model
def _load_model(args) -> tuple[Any, dict[str, Any] | None, bool]:
    """(model, input normalization for the manifest, is it the Fashion-MNIST ViT format)."""
    from ..models import create_vit, load_vit_checkpoint

    if args.model and args.checkpoint:
        raise ConfigError("give --checkpoint or --model, not both")
    if (args.weights or args.pretrained) and not args.model:
        raise ConfigError("--weights and --pretrained go with --model NAME")
    if args.weights and args.pretrained:
        raise ConfigError("give --weights or --pretrained, not both")
    if args.model:
        model = create_vit(args.model, pretrained=args.pretrained)
        if args.weights:
            _load_weights(model, args.weights)
        return model.eval(), None, False
    from .recipes import default_checkpoint

    path = args.checkpoint or default_checkpoint()
    if path is None:
        raise InputNotFoundError("no bundled checkpoint in this installation: give --checkpoint or --model")
    try:
        model, meta = load_vit_checkpoint(path)
    except ConfigError as exc:
        raise ConfigError(f"--checkpoint {path}: {exc}") from None
    normalize = meta.get("normalize")
    norm = (
        {"mean": [normalize[0]], "std": [normalize[1]], "pad": meta.get("pad", 0)}
        if isinstance(normalize, (list, tuple)) and len(normalize) == 2
        else None
    )
    return model, norm, meta.get("dataset") == "fashion-mnist"


def _load_weights(model, path: str) -> None:
    from ..checks import first_line
    from ..fileio import load_tensors

    blob = load_tensors(path, "--weights")
    state = blob.get("state_dict", blob.get("model", blob)) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"--weights {path}: not a state dict (a dict of tensors, or one under 'state_dict')")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"--weights {path} does not fit --model: {first_line(exc)}") from None


# ---------------------------------------------------------------------------------------------- data
def _source(path: str | None, name: str, fmnist_dir: str | None) -> tuple[str, Path]:
    """("idx" | "folder" | "tensors", path) of a data argument; None: the Fashion-MNIST folder."""
    if path is None:
        from ..data import FashionMNISTDataModule

        dm = FashionMNISTDataModule(data_dir=fmnist_dir)
        dm.check_files()
        return "idx", dm.data_dir
    p = Path(path)
    if p.is_file():
        return "tensors", p
    if not p.is_dir():
        raise InputNotFoundError(f"--{name} {path}: no such file or folder")
    return ("idx" if (p / _IDX_MARK).is_file() else "folder"), p


def fmnist_images(path: Path, split: str, count: int | None, seed: int | None):
    """The first ``count`` images and labels of a Fashion-MNIST IDX split, preprocessed like the bundled ViT;
    a random draw of them when ``seed`` is given (calibration), else in the split's order."""
    import torch

    from ..data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(data_dir=str(path))
    dm.check_files((split,))
    data = dm._load(split)
    images, labels = data.tensors
    if seed is not None:  # a random draw (calibration); validation keeps the split's order
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        images, labels = images[order], labels[order]
    return images[:count], labels[:count]


def _folder(path: Path, model, count: int | None, seed: int | None, batch_size: int):
    import timm.data
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets

    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    try:
        folder = datasets.ImageFolder(str(path), transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"{path}: not an ImageFolder (<class>/<image> files): {exc}") from None
    order = (
        torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed)).tolist()
        if seed is not None
        else list(range(len(folder)))
    )
    return DataLoader(Subset(folder, order[:count]), batch_size=batch_size)


def _tensors(path: Path, name: str):
    import torch

    from ..fileio import load_tensors

    blob = load_tensors(path, f"--{name}")
    if isinstance(blob, torch.Tensor):
        return blob
    if isinstance(blob, dict) and isinstance(blob.get("images"), torch.Tensor):
        return [(blob["images"], blob["labels"])] if isinstance(blob.get("labels"), torch.Tensor) else blob["images"]
    if isinstance(blob, (list, tuple)) and len(blob) == 2 and all(isinstance(t, torch.Tensor) for t in blob):
        return [tuple(blob)]
    raise ConfigError(
        f"--{name} {path}: allowed is a tensor of images, (images, labels) or {{'images': ..., 'labels': ...}}"
    )


def _data(args, name: str, model, count: int | None, seed: int | None, batch_size: int):
    kind, path = _source(getattr(args, name), name, args.data_dir)
    if kind == "idx":
        return [fmnist_images(path, "train" if name == "calibration" else "test", count, seed)]
    if kind == "folder":
        return _folder(path, model, count, seed, batch_size)
    return _tensors(path, name)


# ---------------------------------------------------------------------------------------------- run
def _configs(args, formats_default: list[str]):
    """The CompressConfig of the command line: options left unset keep their one default."""
    import dataclasses

    from ..compress import CompressConfig

    base = CompressConfig()
    pruning = {
        k: v
        for k, v in (
            ("pruning_ratio", args.ratio),
            ("target_macs", args.target_macs),
            ("target_params", args.target_params),
            ("iterative_steps", args.events),
            ("importance", args.importance),
            ("round_to", args.round_to),
        )
        if v is not None
    }
    if args.target_macs is not None or args.target_params is not None:
        pruning["pruning_ratio"] = None  # a budget instead of the default ratio
    if args.no_reconstruct:
        pruning["reconstruct"] = False
    export = {
        k: v
        for k, v in (("precisions", args.precisions), ("rank", args.rank), ("threads", args.threads))
        if v is not None
    }
    export.update(formats=args.formats or formats_default, output_dir=args.output_dir, overwrite=args.overwrite)
    top = {
        k: v
        for k, v in (
            ("calibration_images", args.calibration_images),
            ("validation_images", args.validation_images),
            ("max_accuracy_drop", args.max_accuracy_drop),
            ("max_ratio", args.max_ratio),
        )
        if v is not None
    }
    if args.target_latency is not None:
        from ..latency_budget import LatencyBudget

        given = {
            k: v
            for k, v in (
                ("format", args.latency_for),
                ("precision", args.latency_precision),
                ("threads", args.threads),
                ("max_ratio", args.max_ratio),
                ("allocation", args.latency_allocation),
            )
            if v is not None
        }
        top["target_latency"] = LatencyBudget(args.target_latency, **given)
    elif args.latency_for or args.latency_precision or args.latency_allocation:
        raise ConfigError("--latency-for, --latency-precision and --latency-allocation go with --target-latency")
    try:
        return dataclasses.replace(
            base,
            pruning=dataclasses.replace(base.pruning, **pruning),
            export=dataclasses.replace(base.export, **export),
            **top,
        )
    except ConfigError as exc:
        raise ConfigError(f"pqv compress: {exc}") from None


def run_compress(args) -> int:
    from ..compress import compress
    from ..progress import progress_bar
    from .demo import _default_formats

    config = _configs(args, _default_formats())
    config.validate()  # every option, before the model or any data is read
    model, normalization, fmnist = _load_model(args)
    if not fmnist and args.calibration is None:
        raise ConfigError("--calibration PATH is needed for this model (images it will see)")
    calibration = _data(args, "calibration", model, config.calibration_images, args.seed, config.batch_size)
    validation = None
    if args.validation is not None or fmnist:
        validation = _data(args, "validation", model, config.validation_images, None, config.batch_size)
    print(f"compressing {type(model).__name__} -> {args.output_dir}/", flush=True)
    with progress_bar("compress", enabled=not args.quiet) as progress:
        report = compress(
            model, calibration, config, validation=validation, input_normalization=normalization, progress=progress
        )
    print(report["table"])
    print(f"\n{args.output_dir}/: pruned.pt, manifest.json, compress.json, compress.md and the files above")
    return 0
