import gzip
import json
import struct
from pathlib import Path

import pytest
import torch

from pqv_lightning.apps.recipes import default_checkpoint, evaluate, train_vit_checkpoint
from pqv_lightning.classifier import ImageClassifier
from pqv_lightning.data import DEFAULT_FMNIST_DIR, FashionMNISTDataModule, read_idx
from pqv_lightning.models import create_vit, load_vit_checkpoint, paper_model, save_vit_checkpoint

HAVE_FMNIST = Path(DEFAULT_FMNIST_DIR, "train-images-idx3-ubyte.gz").is_file()


def _write_idx(path, array: torch.Tensor):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + struct.pack(">" + "I" * array.dim(), *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.numpy().tobytes())


def test_read_idx_round_trip_and_errors(tmp_path):
    arr = torch.randint(0, 255, (3, 28, 28), dtype=torch.uint8)
    _write_idx(tmp_path / "x.gz", arr)
    assert torch.equal(read_idx(tmp_path / "x.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(tmp_path / "bad")
    with gzip.open(tmp_path / "short.gz", "wb") as fh:
        fh.write(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="expected 18"):
        read_idx(tmp_path / "short.gz")


def test_fmnist_datamodule_from_custom_dir(tmp_path):
    for split, n in (("train", 12), ("t10k", 4)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", torch.full((n, 28, 28), 255, dtype=torch.uint8))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", torch.arange(n, dtype=torch.uint8) % 10)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), batch_size=4, val_size=4, augment=False)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 32, 32) and y.dtype == torch.long
    white = (1 - 0.2860) / 0.3530
    assert x[0, 0, 16, 16].item() == pytest.approx(white) and x[0, 0, 0, 0].item() == pytest.approx(-0.2860 / 0.3530)
    assert len(dm.val_set) == 4 and len(dm.test_set) == 4


def test_fmnist_missing_dir_is_a_clear_error(tmp_path):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        dm.setup("fit")


def test_create_vit_errors():
    with pytest.raises(ValueError, match="unknown model_name='not_a_model'"):
        create_vit("not_a_model")
    with pytest.raises(ValueError, match="has no pretrained weights"):
        create_vit("vit_test_tiny", pretrained=True)
    assert create_vit("deit_tiny_patch16_224", num_classes=3).head.out_features == 3


def test_paper_model_prunes_head_dims_or_whole_heads():
    def widths(m):
        attn = m.blocks[0].attn
        return m.patch_embed.proj.out_channels, attn.num_heads, attn.qkv.out_features // (3 * attn.num_heads)

    assert widths(paper_model("vit_test_tiny")) == (64, 4, 16)
    assert widths(paper_model("vit_test_tiny", 0.25, round_to=None)) == (48, 4, 12)  # dims inside every head
    heads = paper_model("vit_test_tiny", 0.25, round_to=None, prune_heads=True)
    assert widths(heads) == (48, 3, 16)  # whole heads: each kept head keeps its width
    assert heads(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_checkpoint_format_round_trip(tmp_path):
    model = create_vit("vit_test_tiny").eval()
    path = save_vit_checkpoint(model, tmp_path / "m.pt", recipe={"epochs": 1}, normalize=[0.286, 0.353], pad=2)
    assert not list(tmp_path.glob(".*.tmp"))
    loaded, meta = load_vit_checkpoint(path)
    assert meta["config"]["dim"] == 64 and meta["input"] == [1, 32, 32]
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x), model.half().float()(x), rtol=1e-3, atol=1e-3)
    with pytest.raises(FileNotFoundError):
        load_vit_checkpoint(tmp_path / "missing.pt")


def test_bundled_checkpoint_is_the_documented_file_and_ships_as_package_data(monkeypatch):
    import hashlib
    import tomllib

    from pqv_lightning.models import BUNDLED_CHECKPOINTS, bundled_checkpoint, create_vit

    path = bundled_checkpoint("vit_tiny_fmnist")
    digest = BUNDLED_CHECKPOINTS["vit_tiny_fmnist"][1]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert digest in (path.parent / "README.md").read_text()  # documented with its recipe
    package_data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "assets/*.pt" in package_data["tool"]["setuptools"]["package-data"]["pqv_lightning"]
    monkeypatch.delenv("PQV_FMNIST_CHECKPOINT", raising=False)
    assert default_checkpoint() == path
    monkeypatch.setenv("PQV_FMNIST_CHECKPOINT", "/elsewhere/vit.pt")
    assert str(default_checkpoint()) == "/elsewhere/vit.pt"  # the environment variable still wins
    model = create_vit("vit_tiny_fmnist", pretrained=True)
    assert sum(p.numel() for p in model.parameters()) == 5_356_618 and model.training
    with pytest.raises(ValueError, match=r"fixed architecture .*'embed_dim': 64"):
        create_vit("vit_tiny_fmnist", pretrained=True, embed_dim=64)
    with pytest.raises(
        ValueError, match=r"'vit_test_tiny' has no pretrained weights; families with weights: \['vit_tiny_fmnist'"
    ):
        create_vit("vit_test_tiny", pretrained=True)
    assert ImageClassifier("vit_tiny_fmnist", pretrained=True).model.embed_dim == 192


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist is not installed")
def test_bundled_checkpoint_loads_with_its_published_accuracy():
    model, meta = load_vit_checkpoint(default_checkpoint())
    assert sum(p.numel() for p in model.parameters()) == 5_356_618
    dm = FashionMNISTDataModule(test_subset=2000)
    assert evaluate(model, dm) > 0.88  # 90.9 % on all 10,000 test images


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist is not installed")
@pytest.mark.slow  # fast tier <= 5 min on 2 cores: trains a checkpoint (~12 s)
def test_project_can_make_its_own_checkpoint(tmp_path):
    path = train_vit_checkpoint(
        tmp_path / "own.pt", dim=32, depth=1, heads=2, epochs=1, batch_size=64, train_subset=512, precision="32-true"
    )
    model, meta = load_vit_checkpoint(path)
    assert meta["config"]["dim"] == 32 and 0.0 <= meta["test_accuracy"] <= 1.0
    lit = ImageClassifier(checkpoint=str(path))
    assert lit.model.embed_dim == 32


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist is not installed")
def test_demo_runs_end_to_end_at_a_tiny_size(capsys, tmp_path):
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("demo", root / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert (
        demo.main(
            [
                "--train-subset",
                "512",
                "--batch-size",
                "32",
                "--events",
                "2",
                "--accumulate",
                "2",
                "--test-subset",
                "128",
                "--ratio",
                "0.25",
                "--export-dir",
                str(tmp_path / "export"),
                "--plots-dir",
                str(tmp_path / "plots"),
                "--precisions",
                "fp32",
                "int8-dynamic",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| pretrained | - | 0 | 0 | 0 |" in out
    assert "| pruned + fine-tuned | taylor | 0.25 | 2 | 16 |" in out and "3.02 M" in out
    assert "| model_fp32.pte | ok |" in out and "| model_int8-dynamic.onnx | ok |" in out  # the extras are installed
    assert (tmp_path / "export" / "manifest.json").is_file()
    for name in ("demo_accuracy.png", "demo_export.png"):  # real PNG files
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "plots" / "demo_results.json").read_text())
    assert [r["label"] for r in results["finetune"]] == ["pretrained", "pruned + fine-tuned"]


def _augmented_batches(num_workers: int, epochs: int = 2) -> list[list[torch.Tensor]]:
    """Every sample is the same image, so each output differs only by its augmentation."""
    from torch.utils.data import DataLoader, TensorDataset

    from pqv_lightning.data import _ShiftFlip

    image = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 32, 32)
    dataset = _ShiftFlip(TensorDataset(image.expand(16, 1, 32, 32).clone(), torch.zeros(16, dtype=torch.long)))
    loader = DataLoader(dataset, batch_size=4, num_workers=num_workers, generator=torch.Generator().manual_seed(0))
    return [[x for x, _ in loader] for _ in range(epochs)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_augmentations_differ_across_workers_and_epochs_and_are_reproducible(num_workers):
    first, second = _augmented_batches(num_workers)
    # worker 0 loads batches 0 and 2, worker 1 batches 1 and 3: their draws must not be the same
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[2], first[3])
    assert not torch.equal(torch.stack(first), torch.stack(second))  # a new epoch, new augmentations
    again = _augmented_batches(num_workers)[0]
    assert torch.equal(torch.stack(first), torch.stack(again))  # a seeded loader replays exactly


def test_image_folder_datamodule_reads_real_image_files(tmp_path):
    import numpy as np
    from PIL import Image

    from pqv_lightning.data import ImageFolderDataModule
    from pqv_lightning.errors import InputNotFoundError

    colors = {"cat": (200, 40, 40), "dog": (10, 120, 250)}  # one flat color per class
    for split, n in (("train", 4), ("val", 2)):
        for cls, rgb in colors.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                img = np.empty((40, 50, 3), dtype=np.uint8)
                img[:] = rgb
                Image.fromarray(img).save(tmp_path / split / cls / f"{i}.{'png' if i % 2 else 'jpg'}", quality=100)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    dm = ImageFolderDataModule(str(tmp_path), image_size=32, batch_size=4, num_workers=0, mean=mean, std=std)
    dm.setup("fit")
    assert dm.train_set.classes == ["cat", "dog"] and len(dm.train_set) == 8 and len(dm.val_set) == 4
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and set(y.tolist()) <= {0, 1}
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 32, 32) and yv.tolist() == [0, 0, 1, 1]
    # a flat image stays flat through resize + crop; each channel is (value / 255 - mean) / std
    for img, label in zip(xv, yv):
        rgb = colors[dm.val_set.classes[label]]
        expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, mean, std)])
        assert torch.allclose(img.mean(dim=(1, 2)), expected, atol=0.05)
    with pytest.raises(InputNotFoundError, match=r"ImageFolder split .*missing.*train"):
        ImageFolderDataModule(str(tmp_path / "missing")).setup("fit")


def _copy_of_test_split(src: Path, dst: Path, flip_label: bool) -> None:
    """The test split of ``src`` re-compressed into ``dst``, optionally with its first label changed."""
    dst.mkdir()
    images = read_idx(src / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(src / "t10k-labels-idx1-ubyte.gz").clone()
    if flip_label:
        labels[0] = (labels[0] + 1) % 10
    _write_idx(dst / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(dst / "t10k-labels-idx1-ubyte.gz", labels)


@pytest.mark.slow  # fast tier <= 5 min on 2 cores (issue 29)
@pytest.mark.skipif(not HAVE_FMNIST, reason="needs the Debian package dataset-fashion-mnist")
def test_a_recorded_accuracy_is_used_only_for_the_same_file_and_the_same_data(tmp_path, monkeypatch):
    """The demo's pretrained row: recorded for the bundled file on this test set (both by sha256),
    identical data however compressed; another file, one changed label or a subset: measured."""
    from pqv_lightning.apps import recipes
    from pqv_lightning.models import bundled_checkpoint

    bundled = bundled_checkpoint()
    full = FashionMNISTDataModule()
    assert recipes.recorded_test_accuracy(bundled, full) == 0.9093
    _copy_of_test_split(Path(DEFAULT_FMNIST_DIR), tmp_path / "same", flip_label=False)
    assert recipes.recorded_test_accuracy(bundled, FashionMNISTDataModule(data_dir=str(tmp_path / "same"))) == 0.9093
    _copy_of_test_split(Path(DEFAULT_FMNIST_DIR), tmp_path / "changed", flip_label=True)
    assert recipes.recorded_test_accuracy(bundled, FashionMNISTDataModule(data_dir=str(tmp_path / "changed"))) is None
    assert recipes.recorded_test_accuracy(bundled, FashionMNISTDataModule(test_subset=100)) is None
    other = save_vit_checkpoint(load_vit_checkpoint(bundled)[0], tmp_path / "copy.pt", recipe={"note": 1})
    assert recipes.recorded_test_accuracy(other, full) is None  # same weights, another file: measured
    # the demo's pretrained row takes the record without evaluating, and says so in the table
    monkeypatch.setattr(recipes, "evaluate", lambda *a: pytest.fail("evaluated although recorded"))
    row = recipes.finetune_with_pruning(bundled, label="pretrained", pruning_ratio=0.0, epochs=0, recorded_ok=True)
    assert row.recorded and row.test_acc == 0.9093 and row.test_images == 10000
    assert "| pretrained | - | 0 | 0 | 0 | 90.93 % (recorded) | 5.36 M |" in recipes.format_table([row])
    monkeypatch.setattr(recipes, "evaluate", lambda *a: 0.5)  # --reevaluate: measured
    row = recipes.finetune_with_pruning(bundled, label="pretrained", pruning_ratio=0.0, epochs=0)
    assert not row.recorded and row.test_acc == 0.5


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason="needs the Debian package dataset-fashion-mnist")
def test_the_recorded_accuracy_is_what_the_bundled_checkpoint_measures():
    """Re-measures the record (float32, this host's kernels): within 3 of 10,000 images of it."""
    from pqv_lightning.apps.recipes import RECORDED_TEST_ACCURACY
    from pqv_lightning.models import bundled_checkpoint

    model = ImageClassifier(checkpoint=str(bundled_checkpoint())).model
    measured = evaluate(model, FashionMNISTDataModule(batch_size=256))
    assert abs(measured - RECORDED_TEST_ACCURACY[(BUNDLED_SHA16, FMNIST_TEST_DIGEST)]) <= 3e-4


BUNDLED_SHA16 = "ace3f5e02bc9ebf1"
FMNIST_TEST_DIGEST = "e63ca673c908c3871024e75bfe96d35cd968cc772ea1ec5d64f59b26b92ab235"
