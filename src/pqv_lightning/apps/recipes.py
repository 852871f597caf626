"""End-to-end recipes used by the demo and the benchmarks: fine-tune the Fashion-MNIST ViT with
structured pruning and measure test accuracy, parameters and MACs before and after."""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ..callbacks import KnowledgeDistillation, StructuredPruning
from ..callbacks.structured_pruning import ITERATIVE_STEPS
from ..classifier import ImageClassifier
from ..data import FashionMNISTDataModule
from ..errors import ConfigError
from ..fileio import file_digest
from ..models import bundled_checkpoint
from ..pruning import EventSchedule, PruningConfig, count_macs, count_params
from ..pruning.config import DEFAULT_PRUNING_RATIO
from ..settings import dropped_log_lines

__all__ = [
    "RECIPES",
    "FinetuneResult",
    "recipe_settings",
    "default_checkpoint",
    "evaluate",
    "export_table",
    "finetune_with_pruning",
    "format_table",
]


def default_checkpoint() -> Path | None:
    """The pretrained Fashion-MNIST ViT: ``$PQV_FMNIST_CHECKPOINT`` if set, else the checkpoint
    bundled with the package (``pqv_lightning/assets/vit_tiny_fmnist.pt``); None when neither exists."""
    env = os.environ.get("PQV_FMNIST_CHECKPOINT")
    if env:
        return Path(env)
    try:
        return bundled_checkpoint("vit_tiny_fmnist")
    except FileNotFoundError:
        return None


#: Named fine-tuning recipes (keyword arguments of :func:`finetune_with_pruning`), all 256 optimizer
#: steps of batch 128. ``"v0.2"`` is the recipe of releases up to 0.2; ``"default"`` is the best one
#: measured by ``benchmarks/fmnist_recovery.py`` and is what the demo and the sweep use.
RECIPES: dict[str, dict[str, Any]] = {
    "v0.2": {
        "lr": 2e-4,
        "warmup_steps": 0,
        "epochs": 2,
        "train_subset": 16384,
        "iterative_steps": 4,
        "prune_span": 0.25,
        "ratio_schedule": "cubic",
    },
}
# measured in benchmarks/results/fmnist_recovery_recipe.md: lr 2e-4 recovers pruned models best (5e-5 keeps the
# unpruned control but costs 0.35 pt at 25 %), a 10 % warm-up and distillation from the unpruned network help both
RECIPES["distillation"] = {
    **RECIPES["v0.2"],
    "warmup_fraction": 0.1,
    "distill_alpha": 0.5,
    "distill_tau": 2.0,
    "teacher_precision": "auto",  # bf16 where the CPU has bf16 instructions, else fp32 (3.9x slower emulated)
}
# benchmarks/results/fmnist_recovery_methods.md: least-squares reconstruction of every Linear at each event keeps
# the pruned network close to the unpruned one (one-shot 25 % / 50 % channels: ~90.5 % / ~90 % before any training),
# so fine-tuning then wants the gentle rate that also keeps the unpruned model's accuracy (5e-5)
RECIPES["default"] = {
    **RECIPES["distillation"],
    "lr": 5e-5,
    "pruning_kwargs": {"reconstruct": True, "reconstruct_layers": "all"},
}
#: ``pqv demo``'s budget: one pass over 4,096 training images (32 optimizer steps of 128) with 2 pruning
#: events after 4-batch statistics windows (steps 4 and 8), then fine-tuning to the end.
#: ``benchmarks/results/fmnist_recovery_budget.md`` (default recipe, 25 %, 3 seeds, 10,000 test images):
#: 90.52 +- 0.08 %, against 90.56 +- 0.11 % for the demo's budget before (8,192 images, 4 events after
#: 8-batch windows), in about a third of the fine-tuning time.
DEMO_BUDGET: dict[str, int] = {"epochs": 1, "train_subset": 4096, "accumulate_batches": 4, "iterative_steps": 2}
#: Top-1 accuracy of a checkpoint on a whole test set, measured once by :func:`evaluate` (float32, 2
#: threads), keyed by (the checkpoint's sha256, first 16 hex digits; the test set's
#: ``FashionMNISTDataModule.split_digest``): the bundled ViT on the Debian package's Fashion-MNIST.
#: ``pqv demo`` shows it as the pretrained row instead of measuring it again (80 s of a 2-core
#: CPU); ``pqv demo --reevaluate`` measures; ``tests/test_data_models.py`` re-measures it (slow tier).
RECORDED_TEST_ACCURACY: dict[tuple[str, str], float] = {
    ("ace3f5e02bc9ebf1", "e63ca673c908c3871024e75bfe96d35cd968cc772ea1ec5d64f59b26b92ab235"): 0.9093,
}


def recorded_test_accuracy(checkpoint: str | Path, dm: FashionMNISTDataModule) -> float | None:
    """The :data:`RECORDED_TEST_ACCURACY` of ``checkpoint`` on ``dm``'s whole test set; None when
    nothing is recorded for this file and these data, or when ``dm`` evaluates a subset."""
    if dm.test_subset is not None:
        return None
    return RECORDED_TEST_ACCURACY.get((file_digest(checkpoint), dm.split_digest("test")))


#: Keys of a recipe that set the data budget (the demo and the sweep choose their own).
BUDGET_KEYS = ("epochs", "train_subset")


def recipe_settings(name: str, budget: bool = True) -> dict[str, Any]:
    """The :func:`finetune_with_pruning` keyword arguments of recipe ``name`` (a copy); ``budget=False``
    leaves out the data budget (:data:`BUDGET_KEYS`)."""
    if name not in RECIPES:
        raise ConfigError(f"recipe={name!r} is not defined; allowed: {sorted(RECIPES)}")
    return {k: copy.deepcopy(v) for k, v in RECIPES[name].items() if budget or k not in BUDGET_KEYS}


@dataclass
class FinetuneResult:
    label: str
    importance: str
    pruning_ratio: float
    events: int
    steps: int
    test_acc: float
    params: int
    macs: int
    seconds: float
    test_images: int = 0
    recorded: bool = False  # test_acc from RECORDED_TEST_ACCURACY, not measured in this run


#: what Lightning prints when the apps make and run their own Trainers: its hardware banner, its cloud
#: tips and a notice about estimating the steps; the apps say what they do themselves
_LIGHTNING_BANNER = ("GPU available", "TPU available", "HPU available", "💡 Tip", "Loading `train_dataloader`")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's banner lines and its pytree deprecation warning (Lightning's own call into torch)
    dropped while the apps' own Trainers are built and run; the callbacks' lines and any other
    warning still show."""
    with dropped_log_lines("lightning.pytorch.utilities.rank_zero", _LIGHTNING_BANNER), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
        yield


@torch.no_grad()
def evaluate(model: torch.nn.Module, dm: FashionMNISTDataModule) -> float:
    dm.setup("test")
    model.eval()
    correct = total = 0
    for x, y in dm.test_dataloader():
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def finetune_with_pruning(
    checkpoint: str | Path,
    *,
    label: str,
    importance: str = PruningConfig.importance,
    pruning_ratio: float = DEFAULT_PRUNING_RATIO,
    iterative_steps: int = ITERATIVE_STEPS,
    accumulate_batches: int = EventSchedule.accumulate_batches,
    train_subset: int | None = 8192,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 2e-4,
    data_dir: str | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    precision: str = "32-true",
    prune_span: float = 0.6,
    prune_start: float = 0.0,
    ratio_schedule: str = PruningConfig.ratio_schedule,
    warmup_steps: int = 0,
    warmup_fraction: float | None = None,
    label_smoothing: float = 0.1,
    distill_alpha: float = 0.0,
    distill_tau: float = 1.0,
    teacher_precision: str = "auto",
    pruning_kwargs: dict[str, Any] | None = None,
    extra_callbacks: list[pl.Callback] | None = None,
    recorded_ok: bool = False,
) -> FinetuneResult:
    """Fine-tune ``checkpoint`` for ``epochs`` over ``train_subset`` images while
    :class:`StructuredPruning` runs ``iterative_steps`` events spread evenly over the first
    ``prune_span`` of the optimizer steps (``iterative_steps=1``: one-shot after one statistics
    window, then fine-tuning for the rest of the same budget). Returns test accuracy, params and MACs.

    ``warmup_steps`` (or ``warmup_fraction`` of the steps) / ``label_smoothing`` / ``lr`` go to
    :class:`ImageClassifier`; ``distill_alpha > 0``
    adds :class:`KnowledgeDistillation` (``distill_tau``, ``teacher_precision``) from the unpruned
    network; ``pruning_kwargs`` are extra :class:`StructuredPruning` arguments (e.g. regularization;
    a ``target_macs`` / ``target_params`` budget there replaces ``pruning_ratio``, which then only
    labels the result and must be > 0).
    ``prune_start``: fraction of the steps before the first statistics window (a sparse-training
    phase when ``pruning_kwargs`` holds a regularization).
    ``recorded_ok``: with ``epochs=0`` (the checkpoint as it is), take its test accuracy from
    :data:`RECORDED_TEST_ACCURACY` where one is recorded for this file and test set (the result's
    ``recorded`` is then True) instead of evaluating."""
    if not 0 < prune_span <= 1:
        raise ConfigError(f"prune_span={prune_span} must be in (0, 1]")
    if not 0 <= prune_start < 1 or prune_start + prune_span > 1:
        raise ConfigError(
            f"prune_start={prune_start} must be in [0, 1) with prune_start + prune_span <= 1 (prune_span={prune_span})"
        )
    pl.seed_everything(seed, verbose=False)
    dm = FashionMNISTDataModule(
        data_dir=data_dir, batch_size=batch_size, train_subset=train_subset, test_subset=test_subset, seed=seed
    )
    dm.setup("fit")
    steps = epochs * (dm.size("train") // batch_size)
    if warmup_fraction is not None:
        if not 0 <= warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction={warmup_fraction} must be in [0, 1)")
        warmup_steps = int(warmup_fraction * steps)
    module = ImageClassifier(
        checkpoint=str(checkpoint), lr=lr, warmup_steps=warmup_steps, label_smoothing=label_smoothing
    )
    callbacks: list[pl.Callback] = []
    if pruning_ratio > 0:
        span = max(1, int(prune_span * steps) - accumulate_batches)
        frequency = (
            max(accumulate_batches, span // max(1, iterative_steps - 1)) if iterative_steps > 1 else accumulate_batches
        )
        kwargs = dict(pruning_kwargs or {})
        # a budget (target_macs / target_params) replaces the ratio; pruning_ratio then only labels the row
        ratio = None if ("target_macs" in kwargs or "target_params" in kwargs) else pruning_ratio
        callbacks.append(
            StructuredPruning(
                importance=importance,
                pruning_ratio=ratio,
                iterative_steps=iterative_steps,
                accumulate_batches=accumulate_batches,
                interval="step",
                start=int(prune_start * steps),
                frequency=frequency,
                ratio_schedule=ratio_schedule,  # type: ignore[arg-type]  # the callback checks it
                **kwargs,
            )
        )
    if distill_alpha > 0:
        callbacks.append(
            KnowledgeDistillation(
                alpha=distill_alpha,
                tau=distill_tau,
                teacher_precision=teacher_precision,  # type: ignore[arg-type]
            )
        )
    callbacks += list(extra_callbacks or [])
    with quiet_lightning():
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=callbacks,
            precision=precision,  # type: ignore[arg-type]  # the Trainer checks it
            gradient_clip_val=1.0,
        )
        t0 = time.perf_counter()
        if steps > 0 and epochs > 0:
            trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - t0
    model = module.model
    recorded = recorded_test_accuracy(checkpoint, dm) if recorded_ok and epochs == 0 else None
    dm.setup("test")
    test_acc = evaluate(model, dm) if recorded is None else recorded
    return FinetuneResult(
        label=label,
        importance=importance if pruning_ratio > 0 else "-",
        pruning_ratio=pruning_ratio,
        events=iterative_steps if pruning_ratio > 0 else 0,
        steps=steps,
        test_acc=test_acc,
        params=count_params(model),
        macs=count_macs(model, torch.randn(1, 1, 32, 32)),
        seconds=seconds,
        test_images=dm.size("test"),
        recorded=recorded is not None,
    )


def format_table(rows: Sequence[FinetuneResult | dict[str, Any]], show_time: bool = True) -> str:
    """A Markdown table of results (``show_time=False`` drops the wall-clock column)."""
    dicts = [asdict(r) if isinstance(r, FinetuneResult) else r for r in rows]
    cols = ["run", "importance", "channel ratio", "events", "steps", "test acc", "params", "MACs"]
    cols += ["fit time"] if show_time else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for d in dicts:
        cells = [
            d["label"],
            d["importance"],
            f"{d['pruning_ratio']:g}",
            str(d["events"]),
            str(d["steps"]),
            f"{100 * d['test_acc']:.2f} %" + (" (recorded)" if d.get("recorded") else ""),
            f"{d['params'] / 1e6:.2f} M",
            f"{d['macs'] / 1e6:.1f} M",
        ]
        cells += [f"{d['seconds']:.0f} s"] if show_time else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def export_table(manifest: dict[str, Any]) -> str:
    """A Markdown table of a MobileExport manifest."""
    base = manifest["baseline_fp32_eager"]["latency"]["median_ms"]
    lines = [
        "| artifact | status | size | latency (median / p90) | vs fp32 eager | top-1 agreement | top-1 acc |",
        "|---|---|---|---|---|---|---|",
        f"| fp32 eager (baseline) | - | - | {base:.2f} ms | 1.00x | - | - |",
    ]
    for a in manifest["artifacts"]:
        if a["status"] == "skipped":
            lines.append(f"| {a['file']} | skipped: {a['reason']} | | | | | |")
            continue
        lat, v = a["latency"], a["verification"]
        acc = f"{100 * v['top1_accuracy']:.2f} %" if "top1_accuracy" in v else "-"
        lines.append(
            f"| {a['file']} | {a['status']} | {a['size_bytes'] / 2**20:.1f} MB | {lat['median_ms']:.2f} / "
            f"{lat['p90_ms']:.2f} ms | {lat['speedup_vs_fp32_eager']:.2f}x | "
            f"{100 * v['top1_agreement']:.1f} % | {acc} |"
        )
    best = manifest.get("best")
    if best:
        lines.append(
            f"\nfastest verified artifact on this host: {best['file']} ({best['runtime']}), "
            f"{best['median_ms']:.2f} ms, {best['speedup_vs_fp32_eager']:.2f}x fp32 eager [{best['method']}]"
        )
    return "\n".join(lines)


def train_vit_checkpoint(
    out: str | Path,
    *,
    dim: int = 192,
    depth: int = 12,
    heads: int = 3,
    epochs: int = 40,
    batch_size: int = 512,
    lr: float = 1e-3,
    train_subset: int | None = None,
    data_dir: str | None = None,
    precision: str = "bf16-mixed",
    seed: int = 0,
    max_steps: int = -1,
    warmup_epochs: float = 1.0,
    drop_path_rate: float = 0.1,
) -> Path:
    """Train a ViT on Fashion-MNIST from scratch and save it in the ``vit_tiny_fmnist.pt`` format.

    The defaults are the recipe of the shipped checkpoint (40 epochs, AdamW 1e-3, weight decay 0.05,
    batch 512, 1 warm-up epoch then cosine, label smoothing 0.1, shifts/flips, bf16, clipping 1.0,
    drop-path 0.1): minutes on a GPU, many hours on a CPU — shrink ``dim``/``depth``/``epochs`` there.
    """
    from ..models import save_vit_checkpoint

    pl.seed_everything(seed, verbose=False)
    dm = FashionMNISTDataModule(data_dir=data_dir, batch_size=batch_size, train_subset=train_subset, seed=seed)
    dm.setup("fit")
    steps_per_epoch = max(1, dm.size("train") // batch_size)
    module = ImageClassifier(
        "vit_tiny_fmnist",
        lr=lr,
        warmup_steps=int(warmup_epochs * steps_per_epoch),
        model_kwargs=dict(embed_dim=dim, depth=depth, num_heads=heads, drop_path_rate=drop_path_rate),
    )
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    with quiet_lightning():
        trainer = pl.Trainer(
            accelerator=accelerator,
            max_epochs=epochs,
            max_steps=max_steps,
            precision=precision,  # type: ignore[arg-type]  # the Trainer checks it
            gradient_clip_val=1.0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=dm)
    acc = evaluate(module.model.cpu().float(), dm)
    recipe = dict(epochs=epochs, lr=lr, batch_size=batch_size, train_images=dm.size("train"))
    return save_vit_checkpoint(
        module.model,  # type: ignore[arg-type]  # a timm VisionTransformer
        out,
        recipe=recipe,
        dataset="fashion-mnist",
        normalize=[0.2860, 0.3530],
        pad=2,
        test_accuracy=acc,
    )
