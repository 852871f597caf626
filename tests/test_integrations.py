"""StructuredPruning under WandbLogger (offline) and LightningCLI (YAML trainer.callbacks)."""

import json

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from pqv_lightning import StructuredPruning
from pqv_lightning.classifier import ImageClassifier

from conftest import make_trainer, random_loader


def test_wandb_offline_gets_metrics_and_tables(tmp_path, lit_model, monkeypatch, offline_wandb):
    logger = offline_wandb
    logged = []
    original = logger.log_metrics

    def spy(metrics, step=None):
        logged.append(dict(metrics))
        return original(metrics, step)

    monkeypatch.setattr(logger, "log_metrics", spy)
    pruning = StructuredPruning(importance="l2", pruning_ratio=0.5, iterative_steps=2, accumulate_batches=1)
    trainer = make_trainer(tmp_path, [pruning], max_epochs=2, logger=logger, log_every_n_steps=1)
    trainer.fit(lit_model, random_loader(64, 16))
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    table_dir = run_dir / "files" / "media" / "table" / "pruning"
    events = sorted(table_dir.glob("events_*.table.json"), key=lambda p: p.stat().st_mtime)
    assert events, f"no event table in {table_dir}"
    table = json.loads(events[-1].read_text())
    assert table["columns"] == [
        "event",
        "target_ratio",
        "ratio_reached",
        "params",
        "macs",
        "seconds",
        "removed_by_ratio",
        "removed_by_threshold",
    ]
    assert [row[0] for row in table["data"]] == [1, 2]
    widths = sorted(table_dir.glob("widths_event_2_*.table.json"))
    rows = {r[0]: r[1:] for r in json.loads(widths[-1].read_text())["data"]}
    assert rows["blocks.0.mlp.fc1"] == [32, 128]
    pruning_metrics = [m for m in logged if "pruning/params" in m]
    assert [m["pruning/event"] for m in pruning_metrics] == [1.0, 2.0]
    assert pruning_metrics[-1]["pruning/params"] == sum(p.numel() for p in lit_model.parameters())


class RandomDataModule(pl.LightningDataModule):
    def __init__(self, n: int = 64, batch_size: int = 16):
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        ds = TensorDataset(torch.randn(self.n, 1, 32, 32, generator=g), torch.randint(0, 10, (self.n,), generator=g))
        return DataLoader(ds, batch_size=self.batch_size)


def test_lightning_cli_yaml_callbacks(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 2,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {
                    "class_path": "pqv_lightning.StructuredPruning",
                    "init_args": {
                        "importance": "taylor",
                        "pruning_ratio": 0.5,
                        "iterative_steps": 2,
                        "accumulate_batches": 2,
                        "interval": "epoch",
                        "ignored_layers": ["head"],
                    },
                }
            ],
        },
        "model": {"model_name": "vit_test_tiny", "lr": 0.001},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(
        ImageClassifier, RandomDataModule, args=["fit", "--config", str(path)], save_config_kwargs={"overwrite": True}
    )
    (pruning,) = [c for c in cli.trainer.callbacks if isinstance(c, StructuredPruning)]
    assert [e.index for e in pruning.events] == [1, 2]
    assert cli.model.model.patch_embed.proj.out_channels == 32

    bad = dict(config)
    bad["trainer"] = {
        **config["trainer"],
        "callbacks": [{"class_path": "pqv_lightning.StructuredPruning", "init_args": {"importance": "fisher"}}],
    }
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError) as exc:  # the callback's own error, wrapped by jsonargparse
        LightningCLI(ImageClassifier, RandomDataModule, args=["fit", "--config", str(path)])
    chain, e = [], exc.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("importance='fisher' is not registered; allowed: ['taylor'" in m for m in chain)


def test_shipped_example_config_parses_and_builds(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("example_cli", root / "examples" / "cli.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cli = example.main(
        args=[
            "--config",
            str(root / "examples" / "configs" / "fmnist_prune.yaml"),
            "--model.pretrained=false",
            "--model.model_name=vit_test_tiny",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    (pruning,) = [c for c in cli.trainer.callbacks if isinstance(c, StructuredPruning)]
    assert (pruning.config.importance, pruning.config.pruning_ratio, pruning.schedule.frequency) == ("taylor", 0.5, 60)
    assert cli.datamodule.train_subset == 16384
