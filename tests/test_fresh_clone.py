"""What a user's fresh clone does with nothing beside it (no ``../shared``): the README's first command
(``pqv demo``) on the bundled checkpoint, and every example config, each run at a tiny size from a bare
copy of the repository (tracked and not-ignored files only, as ``git clone`` gives them)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "examples" / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def bare_copy(tmp_path_factory) -> Path:
    """The repository's files in ``<tmp>/isolated/pqv-lightning``: no ``shared/`` beside it, no .venv."""
    files = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    dest = tmp_path_factory.mktemp("isolated") / "pqv-lightning"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    assert not (dest.parent.parent / "shared").exists() and not (dest.parent / "shared").exists()
    return dest


def _env(copy: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PQV_FMNIST_CHECKPOINT"}
    # the copy's own package (with its bundled checkpoint) comes first on the path
    env.update(PYTHONPATH=str(copy / "src"), WANDB_MODE="offline", WANDB_SILENT="true", **extra)
    return env


def _pqv(copy: Path, *args, timeout=900, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pqv_lightning", *args],
        cwd=copy,
        env=_env(copy, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow  # fast tier <= 5 min on 2 cores: copies the tree and installs nothing, but imports it in a new process (~13 s)
def test_the_bare_copy_imports_its_own_package_and_finds_the_bundled_checkpoint(bare_copy):
    code = "import pqv_lightning.apps.recipes as r; print(r.__file__); print(r.default_checkpoint())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=bare_copy,
        env=_env(bare_copy),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()
    assert out[0].startswith(str(bare_copy / "src"))
    assert out[1] == str(bare_copy / "src" / "pqv_lightning" / "assets" / "vit_tiny_fmnist.pt")


@pytest.mark.slow
def test_readme_first_command_runs_the_real_demo_on_the_bundled_checkpoint(bare_copy):
    """``pqv demo`` at a reduced size (fewer steps, 1,000 test images, one export format), but on the
    shipped checkpoint: the table shows the pretrained accuracy and what pruning kept of it."""
    proc = _pqv(
        bare_copy,
        "demo",
        "--train-subset",
        "1024",
        "--events",
        "2",
        "--accumulate",
        "2",
        "--test-subset",
        "1000",
        "--formats",
        "onnx",
        "--precisions",
        "fp32",
        "int8-dynamic",
        "--plots-dir",
        "runs/plots",
    )
    assert "training a small ViT" not in proc.stdout  # the stand-in path is only for a missing checkpoint
    assert "checkpoint: " + str(bare_copy / "src" / "pqv_lightning" / "assets" / "vit_tiny_fmnist.pt") in proc.stdout
    rows = json.loads((bare_copy / "runs" / "plots" / "demo_results.json").read_text())["finetune"]
    pretrained, pruned = rows
    # the bundled ViT: 90.93 % on all 10,000 test images (README), 91.6 % on the first 1,000
    assert pretrained["test_acc"] == pytest.approx(0.916, abs=0.0005)
    assert pretrained["params"] == 5_356_618
    assert pruned["params"] < 0.6 * pretrained["params"] and pruned["test_acc"] >= 0.80
    for row in rows:  # what the printed table shows
        assert f"| {100 * row['test_acc']:.2f} % | {row['params'] / 1e6:.2f} M |" in proc.stdout
    manifest = json.loads((bare_copy / "runs" / "demo_export" / "manifest.json").read_text())
    assert [a["status"] for a in manifest["artifacts"]] == ["ok", "ok"]
    best = manifest["best"]  # the demo names the fastest verified file, timed round-robin
    assert best["file"] in {"model_fp32.onnx", "model_int8-dynamic.onnx"} and best["method"].startswith("round-robin")
    assert f"fastest verified artifact on this host: {best['file']} (ONNX Runtime (CPU))" in proc.stdout


@pytest.mark.slow
def test_pqv_compress_the_bundled_vit_post_training_from_a_fresh_clone(bare_copy):
    """Issue 31's workflow on the real proxy, with no training loop: 50 % of the channels, one-shot with
    reconstruction on 256 Fashion-MNIST training images, accuracy on all 10,000 test images (>= 89.5 %)."""
    proc = _pqv(bare_copy, "compress", "--ratio", "0.5", "--formats", "onnx", "--output-dir", "runs/c50", "--quiet")
    report = json.loads((bare_copy / "runs" / "c50" / "compress.json").read_text())
    accuracy = report["stages"]["accuracy"]
    assert accuracy["images"] == 10_000 and accuracy["unpruned"] == pytest.approx(0.9093, abs=5e-5)
    assert accuracy["pruned"] >= 0.895
    assert report["stages"]["prune"]["ratio_reached"] == pytest.approx(0.5, abs=0.01)
    assert f"| pruned, fp32 eager | {100 * accuracy['pruned']:.2f} % |" in proc.stdout
    assert (bare_copy / "runs" / "c50" / "model_int8-dynamic.onnx").is_file()


def _shrink(config: dict, tmp: Path) -> dict:
    """The same config at a tiny size: a few steps, one pruning event, one small export."""
    trainer = config["trainer"]
    trainer.update(
        max_steps=4,
        max_epochs=1,
        limit_val_batches=2,
        enable_progress_bar=False,
        default_root_dir=str(tmp / "root"),
        accelerator="cpu",
        precision="32-true",
    )
    if "WandbLogger" in str(trainer.get("logger")):
        trainer["logger"]["init_args"]["save_dir"] = str(tmp)
    for cb in trainer["callbacks"]:
        args = cb.setdefault("init_args", {})
        if cb["class_path"].endswith("StructuredPruning"):
            args.update(iterative_steps=1, accumulate_batches=2, interval="step", start=0, frequency=2)
        elif cb["class_path"].endswith("MobileExport"):
            args.update(
                formats=["onnx"],
                precisions=["fp32"],
                repeats=1,
                measure_memory=False,
                rank_rounds=1,
                rank_calls=2,
                output_dir=str(tmp / "export"),
                min_top1_agreement=0.0,
                log_artifact=False,
            )
    data = config["data"]["init_args"]
    if config["data"]["class_path"].endswith("FashionMNISTDataModule"):
        data.update(train_subset=64, batch_size=16)
    else:
        data.update(root=str(tmp / "images"), image_size=32, batch_size=4, num_workers=0)
    return config


def _image_folder(root: Path, classes=2, per_class=6) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_every_example_config_runs_from_the_bare_copy(bare_copy, tmp_path, name):
    config = yaml.safe_load((bare_copy / "examples" / "configs" / name).read_text())
    config = _shrink(config, tmp_path)
    extra = []
    if config["data"]["class_path"].endswith("ImageFolderDataModule"):
        _image_folder(tmp_path / "images")
        # the config's ImageNet DeiT needs the hub: the same family, random init, at 32x32 and 2 classes
        extra = [
            "--model.model_name=deit_tiny_patch16_224",
            "--model.pretrained=false",
            "--model.num_classes=2",
            "--model.model_kwargs={img_size: 32}",
        ]
    else:
        assert config["model"] == {**config["model"], "model_name": "vit_tiny_fmnist", "pretrained": True}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    _pqv(bare_copy, "fit", "--config", str(path), *extra, WANDB_DIR=str(tmp_path))
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert [a["status"] for a in manifest["artifacts"]] == ["ok"]
    assert manifest["best"]["file"] == "model_fp32.onnx"  # the only file, ranked round-robin against fp32 eager
    assert manifest["best"]["method"].startswith("round-robin") and manifest["best"]["speedup_vs_fp32_eager"] > 0
    if any(cb["class_path"].endswith("ModelCheckpoint") for cb in config["trainer"]["callbacks"]):
        assert list((tmp_path / "root").rglob("last.ckpt")), "ModelCheckpoint(save_last=True) wrote nothing"
    if "WandbLogger" in str(config["trainer"].get("logger")):
        assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run"
