"""``pqv coverage``: which model families work, generated rather than written.

Every family of :data:`FAMILIES` (small random-initialized configurations of the models users
fine-tune) goes through: prune 25 % and 50 % of the channels (``l2``), a MAC budget (half the MACs),
save + reload from the pruned structure (outputs compared), a short fit with ``StructuredPruning``
(Taylor) and ``KnowledgeDistillation``, and export + verification to every installed format at fp32
and int8-dynamic. Each cell says ``ok`` (with the numbers), ``refused: <the message>`` (a
``ConfigError`` before any work: what a user sees) or ``FAILED: <error>`` (a bug). Finished families
are cached in ``OUT/rows.jsonl`` (rerun to continue); the table goes to ``OUT/coverage.md``.

    pqv coverage                               # every family -> runs/coverage/coverage.md
    pqv coverage --families vit deit3_layerscale resnet --formats onnx --out /tmp/cov
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["FAMILIES", "Family", "check_family", "coverage_table", "run_coverage"]


def _output(output: Any) -> torch.Tensor:
    """The tensor a family's output is checked by (every family here has one)."""
    from ..outputs import main_tensor

    found = main_tensor(output)
    assert found is not None, f"no logits or hidden state in a {type(output).__name__}"
    return found


@dataclass(frozen=True)
class Family:
    """One row: a timm model name with the overrides that make it small, and its input shape."""

    model: str
    kwargs: dict[str, Any]
    shape: tuple[int, int, int]
    note: str = ""
    # or "torchvision": ``model`` is a class of torchvision.models.vision_transformer; "hf": a class of
    # transformers built from its config class with ``kwargs`` (the ``hf`` extra)
    source: str = "timm"

    def build(self, seed: int = 0):
        import torch

        torch.manual_seed(seed)
        if self.source == "torchvision":
            from torchvision.models import vision_transformer

            model = getattr(vision_transformer, self.model)(num_classes=10, **self.kwargs).eval()
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initializes its head
            return model
        if self.source == "hf":
            import transformers

            cls = getattr(transformers, self.model)
            return cls(cls.config_class(num_labels=10, **self.kwargs)).eval()
        import timm

        model = timm.create_model(self.model, pretrained=False, num_classes=10, **self.kwargs).eval()
        head = model.get_classifier()  # type: ignore[operator]  # timm's models have it
        # timm's head_init_scale (BEiT, EVA: 0.001) leaves random-init logits near 1e-4, below what int8
        # activations resolve; a fine-tuned head is not that small
        if isinstance(head, torch.nn.Linear) and float(head.weight.std()) < 1e-3:
            torch.nn.init.normal_(head.weight, std=0.02)
        return model


_VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
_HF_VIT = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)

#: the families users fine-tune, each at a size that runs in seconds on a CPU
FAMILIES: dict[str, Family] = {
    "vit": Family("vit_tiny_patch16_224", _VIT, (3, 32, 32), "ViT / DeiT"),
    "deit_distilled": Family("deit_tiny_distilled_patch16_224", _VIT, (3, 32, 32), "two heads"),
    "deit3_layerscale": Family("deit3_small_patch16_224", {**_VIT, "init_values": 1e-5}, (3, 32, 32), "LayerScale"),
    "vit_reg_tokens": Family(
        "vit_base_patch16_reg4_gap_256", {**_VIT, "reg_tokens": 4}, (3, 32, 32), "register tokens, average pooling"
    ),
    "vit_qk_norm": Family("vit_tiny_patch16_224", {**_VIT, "qk_norm": True}, (3, 32, 32), "q/k LayerNorm"),
    "resnet": Family("resnet10t", {}, (3, 64, 64)),
    "convnext": Family("convnext_atto", {}, (3, 64, 64), "LayerScale"),
    "efficientnet": Family("efficientnet_b0", {}, (3, 64, 64), "squeeze-excite"),
    "mobilenetv3": Family("mobilenetv3_small_050", {}, (3, 64, 64), "hard-swish, squeeze-excite"),
    "regnet": Family("regnetx_002", {}, (3, 64, 64)),
    "torchvision_vit": Family(
        "VisionTransformer",
        dict(image_size=32, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128),
        (3, 32, 32),
        "nn.MultiheadAttention",
        source="torchvision",
    ),
    "eva02": Family(
        "eva02_tiny_patch14_224",
        {"img_size": 28, "depth": 2},
        (3, 28, 28),
        "rotary embedding, SwiGLU fused in one Linear",
    ),
    "eva02_swiglu": Family(
        "eva02_base_patch14_224",
        {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4},
        (3, 32, 32),
        "rotary embedding, SwiGLU",
    ),
    "beit": Family(
        "beit_base_patch16_224",
        {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4},
        (3, 32, 32),
        "relative position bias",
    ),
    "swin": Family(
        "swin_tiny_patch4_window7_224",
        {"img_size": 32, "window_size": 4, "embed_dim": 32, "depths": (1, 1), "num_heads": (2, 4)},
        (3, 32, 32),
        "window attention, patch merging",
    ),
    "swinv2": Family(
        "swinv2_tiny_window8_256",
        {"img_size": 32, "window_size": 4, "embed_dim": 32, "depths": (1, 1), "num_heads": (2, 4)},
        (3, 32, 32),
        "cosine attention, log-spaced position bias",
    ),
    "hf_vit": Family("ViTForImageClassification", _HF_VIT, (3, 32, 32), "Hugging Face", source="hf"),
    "hf_deit": Family(
        "DeiTForImageClassificationWithTeacher", _HF_VIT, (3, 32, 32), "Hugging Face, two heads", source="hf"
    ),
    "hf_dinov2": Family(
        "Dinov2ForImageClassification",
        {**_HF_VIT, "mlp_ratio": 2},
        (3, 32, 32),
        "Hugging Face, LayerScale, [CLS, mean] classifier",
        source="hf",
    ),
    "hf_swin": Family(
        "SwinForImageClassification",
        dict(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4),
        (3, 32, 32),
        "Hugging Face",
        source="hf",
    ),
    "levit": Family("levit_128s", {"img_size": 64}, (3, 64, 64), "no adapter: how a refusal reads"),
}

COLUMNS = ("prune 25 %", "prune 50 %", "target_macs 0.5", "save + reload", "fit: pruning + KD", "export")


def _cell(run: Callable[[], str]) -> str:
    from ..checks import first_line
    from ..errors import ConfigError

    try:
        text = run()
        # an export cell with a file that was skipped or disagrees with the fp32 model is not "ok"
        return f"{'partly' if ' LOW ' in f' {text}' or 'skipped:' in text or 'failed:' in text else 'ok'} ({text})"
    except ConfigError as exc:
        return f"refused: {first_line(exc, 240).removeprefix('ConfigError: ').removeprefix('UnknownNameError: ')}"
    except Exception as exc:  # noqa: BLE001 - a cell that fails is what the matrix reports
        return f"FAILED: {first_line(exc, 300)}"


def check_family(family: Family, formats: list[str], out_dir: Path) -> dict[str, str]:
    """Every column of the matrix for ``family`` (see the module docstring)."""
    import torch

    from ..export import MobileExportConfig, export_mobile
    from ..pruning import PruningConfig, StructuredPruner, count_macs, count_params, prune_once, restore_structure

    x = torch.randn(2, *family.shape)
    row: dict[str, str] = {}
    if family.source == "hf" and importlib.util.find_spec("transformers") is None:
        return {column: "not installed: transformers (pip install 'pqv-lightning[hf]')" for column in COLUMNS}

    def prune(ratio: float) -> Callable[[], str]:
        def run() -> str:
            model = family.build()
            macs, params = count_macs(model, x[:1]), count_params(model)
            prune_once(model, PruningConfig(importance="l2", pruning_ratio=ratio), example_inputs=x[:1])
            shape = tuple(_output(model(x)).shape)
            assert shape == (2, 10), f"output {shape}"
            return f"params {count_params(model) / params:.2f}x, MACs {count_macs(model, x[:1]) / macs:.2f}x"

        return run

    def budget() -> str:
        model = family.build()
        macs = count_macs(model, x[:1])
        prune_once(model, PruningConfig(importance="l2", target_macs=0.5), example_inputs=x[:1])
        return f"MACs {count_macs(model, x[:1]) / macs:.2f}x"

    def reload() -> str:
        model = family.build()
        pruner = StructuredPruner(model, PruningConfig(importance="l2", pruning_ratio=0.25), example_inputs=x[:1])
        pruner.step()
        fresh = restore_structure(family.build(seed=1), json.loads(json.dumps(pruner.state_dict())))
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            error = float((_output(fresh.eval()(x)) - _output(model.eval()(x))).abs().max())
        assert error < 1e-5, f"reloaded outputs differ by {error}"
        return "same outputs"

    def fit() -> str:
        return _short_fit(family, x, out_dir)

    def export() -> str:
        model = family.build()
        prune_once(model, PruningConfig(importance="l2", pruning_ratio=0.25), example_inputs=x[:1])
        manifest = export_mobile(
            model,
            x[:1],
            MobileExportConfig.files_only(
                out_dir / "export",
                precisions=["fp32", "int8-dynamic"],
                formats=formats,
                repeats=2,
                verify_batches=8,
                calibration_batches=8,
            ),
            validation_data=[x],
        )
        # a random-initialized network whose logits are below int8's resolution (EfficientNet: ~1e-4) gives
        # int8 files with meaningless cosines: said so, not counted as a bad file
        with torch.no_grad():
            peak = float(_output(model.eval()(x)).abs().max())
        tiny = peak < 1e-3
        parts = []
        for a in manifest["artifacts"]:
            cosine = a.get("verification", {}).get("cosine")
            low = "" if cosine >= 0.99 else ("tiny-logit " if tiny and "int8" in a["file"] else "LOW ")
            state = f"{low}cos {cosine:.3f}" if a["status"] == "ok" else f"{a['status']}: {a['reason'][:120]}"
            parts.append(f"{a['file']} {state}")
        note = (
            (
                f" [logits of this random-initialized model are at most {peak:.0e}, below int8 resolution: a "
                "tiny-logit cosine says nothing about the file]"
            )
            if tiny
            else ""
        )
        return "; ".join(parts) + note

    for column, run in zip(COLUMNS, (prune(0.25), prune(0.5), budget, reload, fit, export)):
        row[column] = _cell(run)
    return row


def _short_fit(family: Family, x, out_dir: Path) -> str:
    """4 optimizer steps of a plain classifier with StructuredPruning (Taylor, 2 events) and
    KnowledgeDistillation on random data."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from ..callbacks import KnowledgeDistillation, StructuredPruning

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = family.build().train()

        def training_step(self, batch, batch_idx):
            images, labels = batch
            return F.cross_entropy(_output(self.model(images)), labels)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    g = torch.Generator().manual_seed(0)
    data = DataLoader(
        TensorDataset(torch.randn(16, *x.shape[1:], generator=g), torch.randint(0, 10, (16,), generator=g)),
        batch_size=4,
    )
    pruning = StructuredPruning(
        importance="taylor",
        pruning_ratio=0.25,
        iterative_steps=2,
        accumulate_batches=1,
        interval="step",
        frequency=1,
        example_input_shape=list(x.shape[1:]),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out_dir / "fit"),
        callbacks=[pruning, KnowledgeDistillation(alpha=0.5, tau=2.0)],
    )
    module = Classifier()
    trainer.fit(module, data)
    assert len(pruning.events) == 2 and _output(module.model(x)).shape == (2, 10)
    return f"2 events, params {pruning.events[-1].params_after / pruning.events[0].params_before:.2f}x"


def coverage_table(rows: dict[str, dict[str, Any]]) -> str:
    """The Markdown matrix of finished rows."""
    lines = ["| family | model | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for name, row in rows.items():
        family = FAMILIES.get(name)
        label = f"`{name}`" + (f" ({family.note})" if family and family.note else "")
        cells = [str(row["cells"].get(c, "")).replace("|", "/") for c in COLUMNS]
        if all(c.startswith("refused: ") for c in cells):  # a family refused as a whole: say it once
            cells = [cells[0] + " (every column)"] + ["refused"] * (len(cells) - 1)
        source = family.source if family else "timm"
        lines.append(f"| {label} | {source} `{row['model']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_coverage(
    families: list[str], formats: list[str], out: Path, progress: Callable[[str, bool], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Check each family (cached rows are kept), write ``rows.jsonl`` and ``coverage.md``; return the rows."""
    import logging
    import warnings

    from ..export.host import host_description, host_label
    from ..fileio import atomic_write_text
    from ..settings import logger_levels

    out.mkdir(parents=True, exist_ok=True)
    cache = out / "rows.jsonl"
    rows: dict[str, dict[str, Any]] = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("formats") == formats:
                    rows[row["family"]] = row
    for name in families:
        if progress:
            progress(name, name in rows)
        if name in rows:
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings(), logger_levels(["lightning.pytorch", "lightning.fabric"], logging.WARNING):
            warnings.simplefilter("ignore")
            cells = check_family(FAMILIES[name], formats, out / "work" / name)
        rows[name] = {
            "family": name,
            "model": FAMILIES[name].model,
            "formats": formats,
            "cells": cells,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        with open(cache, "a") as fh:
            fh.write(json.dumps(rows[name]) + "\n")
    ordered = {n: rows[n] for n in families if n in rows}
    host = host_description()
    text = (
        "# Model coverage (generated)\n\n"
        f"Made by `pqv coverage --families {' '.join(families)} --formats {' '.join(formats)}` on "
        f"{host_label(host)}, torch {host.get('torch')}, {time.strftime('%Y-%m-%d')}. Each family is a small "
        "random-initialized timm, torchvision or Hugging Face model (configurations in "
        "`pqv_lightning.apps.coverage.FAMILIES`). Cells: `ok` with the numbers; `partly` where an exported "
        "file was skipped (with the reason) or its logits disagree with the pruned fp32 model (`LOW cos`: "
        "cosine below 0.99); `refused: ...` is the `ConfigError` a user gets before any work; `FAILED: ...` "
        "is a bug. Export: fp32 and int8-dynamic per format, verified against the pruned fp32 model (cosine "
        "of the logits; `tiny-logit cos`: the random-initialized model's logits are below int8 resolution, "
        "so that cosine says nothing about the file).\n\n" + coverage_table(ordered) + "\n"
    )
    atomic_write_text(out / "coverage.md", text)
    return ordered


def run_coverage_command(args) -> int:
    """``pqv coverage`` for parsed ``args``."""
    from ..checks import check_names, check_writable_dir
    from ..export import TARGETS

    families = check_names("--families", args.families or list(FAMILIES), list(FAMILIES))
    installed = [f for f in TARGETS.names() if TARGETS[f].missing() is None]
    formats = check_names("--formats", args.formats or installed, installed)
    out = check_writable_dir("--out", args.out)

    def progress(name: str, cached: bool) -> None:
        print(f"{'cached ' if cached else ''}{name}", flush=True)

    rows = run_coverage(families, formats, out, progress)
    print(coverage_table(rows))
    print(f"-> {out / 'coverage.md'}")
    return 0
