import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import lightning.pytorch as pl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from pqv_lightning.classifier import ImageClassifier  # noqa: E402

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    # the 2-process DDP runs belong to the slow tier (each spawns its own ranks: ~15-30 s)
    for item in items:
        if item.get_closest_marker("ddp") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


def tiny_vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    cfg = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=4)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def random_loader(n: int = 128, batch_size: int = 16, seed: int = 0, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def image_batches(n: int = 3, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (images, labels) batches of 1x32x32 noise and random labels: what export verification and
    calibration read in the tests."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def quick_export_config(output_dir, **kw):
    """A MobileExportConfig that is fast to run in a test: few timed calls, no memory probe, built and
    ranked in process (build workers and round-robin ranking have their own tests); anything in ``kw``
    wins."""
    from pqv_lightning.export import MobileExportConfig

    defaults = dict(output_dir=str(output_dir), repeats=2, warmup=1, measure_memory=False, rank="in-process", jobs=1)
    return MobileExportConfig(**{**defaults, **kw})


def step_pruning(**kw):
    """StructuredPruning with step-interval windows (taylor, 50 %, two events of two statistics steps,
    opening after steps 1 and 4); anything in ``kw`` wins."""
    from pqv_lightning import StructuredPruning

    defaults = dict(
        importance="taylor",
        pruning_ratio=0.5,
        iterative_steps=2,
        accumulate_batches=2,
        interval="step",
        start=1,
        frequency=3,
    )
    return StructuredPruning(**{**defaults, **kw})


def make_trainer(tmp_path, callbacks, **kw) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    defaults.update(kw)
    return pl.Trainer(callbacks=callbacks, **defaults)


@pytest.fixture
def lit_model():
    pl.seed_everything(0, verbose=False)
    return ImageClassifier("vit_test_tiny", lr=1e-3)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """A WandbLogger in WANDB_MODE=offline writing under tmp_path; the run is finished afterwards."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="pqv-test", save_dir=str(tmp_path))
    yield logger
    wandb.finish()


@pytest.fixture(scope="session")
def exported_tiny(tmp_path_factory):
    """One exported artifact set for the tests that only read files (never write into it):
    ``tiny_vit(depth=1)`` at fp32 and int8-dynamic in every format whose extra is installed (``.ptl``
    for the x86 engine), verified on 2 random batches, memory measured, ranked round-robin (1 round
    of 3 calls). Returns (folder, manifest)."""
    from pqv_lightning.export import TARGETS, MobileExportConfig, export_mobile

    formats = [f for f in ("pte", "onnx", "openvino", "ptl") if TARGETS[f].missing() is None]
    out = tmp_path_factory.mktemp("exported_tiny") / "out"
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 1, 32, 32, generator=g) for _ in range(2)]
    manifest = export_mobile(
        tiny_vit(depth=1),
        data[0][:1],
        MobileExportConfig(
            precisions=["fp32", "int8-dynamic"],
            formats=formats,
            engines=["x86"],
            output_dir=str(out),
            repeats=2,
            warmup=1,
            verify_batches=2,
            min_top1_agreement=0.0,
            rank="round-robin",
            rank_rounds=1,
            rank_calls=3,
        ),
        validation_data=data,
    )
    # random-init logits are nearly tied, so top-1 agreement is noisy here: cosine is the check
    assert all(a["status"] == "ok" and a["verification"]["cosine"] > 0.99 for a in manifest["artifacts"])
    return out, manifest
