import csv
import importlib.util
import json

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from pqv_lightning import MobileExport, StructuredPruning
from pqv_lightning.export import host_default_engine

from conftest import make_trainer, random_loader


def _export(tmp_path, **kw):
    kw.setdefault("output_dir", str(tmp_path / "export"))
    kw.setdefault("repeats", 2)
    kw.setdefault("warmup", 1)
    kw.setdefault("measure_memory", False)
    kw.setdefault("rank", "in-process")  # round-robin ranking: test_export_ranking.py
    kw.setdefault("min_top1_agreement", 0.5)  # random-init logits are nearly tied
    return MobileExport(**kw)


def test_exports_the_pruned_network_after_fit_and_leaves_the_module_alone(tmp_path, lit_model):
    from torch.jit.mobile import _load_for_lite_interpreter

    export = _export(tmp_path, precisions=["fp32", "int8-dynamic", "int8-static"], engines=[host_default_engine()])
    pruning = StructuredPruning(importance="l2", pruning_ratio=0.5, iterative_steps=1, accumulate_batches=1)
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(tmp_path, [pruning, export], max_epochs=1, logger=logger)
    trainer.fit(lit_model, random_loader(64, 16), random_loader(32, 16))
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest == json.loads(json.dumps(export.manifest))
    assert [a["status"] for a in manifest["artifacts"]] == ["ok", "ok", "ok"]
    assert all(a["verification"]["samples"] == 32 for a in manifest["artifacts"])  # the val loader's batches
    lite = _load_for_lite_interpreter(str(tmp_path / "export" / "model_fp32.ptl"))
    x = torch.randn(2, 1, 32, 32)
    lit_model.eval()
    torch.testing.assert_close(lite(x), lit_model(x), rtol=1e-5, atol=1e-5)  # the pruned weights were exported
    assert lit_model.model.patch_embed.proj.out_channels == 32
    assert all("quantized" not in type(m).__module__ for m in lit_model.modules())
    with open(logger.experiment.metrics_file_path) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("export/model_fp32_ptl/latency_median_ms")]
    assert len(rows) == 1 and float(rows[0]["export/model_fp32_ptl/size_mb"]) > 0
    best = manifest["best"]  # rank="in-process": the fastest ok artifact by the latency measured in export
    assert best["file"] == min(manifest["artifacts"], key=lambda a: a["latency"]["median_ms"])["file"]
    assert float(rows[0]["export/best/speedup_vs_fp32_eager"]) == pytest.approx(best["speedup_vs_fp32_eager"])


def test_non_empty_output_dir_is_refused_before_training(tmp_path, lit_model):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "old.ptl").write_text("keep me")
    trainer = make_trainer(tmp_path, [_export(tmp_path)], max_epochs=1)
    lit_model.training_step = lambda *a, **k: pytest.fail("training must not start")
    with pytest.raises(ValueError, match="is not empty; pass overwrite=True"):
        trainer.fit(lit_model, random_loader(32, 16))
    assert (tmp_path / "export" / "old.ptl").read_text() == "keep me"


def test_runs_after_trainer_test(tmp_path, lit_model):
    export = _export(tmp_path, precisions=["int8-dynamic"], run_on=["test"])
    trainer = make_trainer(tmp_path, [export], max_epochs=1)
    trainer.fit(lit_model, random_loader(32, 16))
    assert export.manifest is None  # not on fit
    trainer.test(lit_model, random_loader(32, 16))
    assert export.manifest["artifacts"][0]["status"] == "ok"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(precisions=["int3"]), r"unknown \['int3'\]"),
        (dict(run_on=["predict"]), r"run_on=\['predict'\]: unknown \['predict'\]; allowed"),
        (dict(calibration_loader="test"), r"calibration_loader='test' is not supported; allowed: \['val', 'train'\]"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _export(tmp_path, **kwargs)


def test_wandb_offline_gets_a_model_artifact_with_the_manifest(tmp_path, lit_model, monkeypatch, offline_wandb):
    logged = []
    run = offline_wandb.experiment
    original = run.log_artifact
    monkeypatch.setattr(run, "log_artifact", lambda art, **kw: logged.append((art, kw)) or original(art, **kw))
    export = _export(tmp_path, precisions=["fp32", "int8-dynamic"])
    trainer = make_trainer(tmp_path, [export], max_epochs=1, logger=offline_wandb)
    trainer.fit(lit_model, random_loader(32, 16), random_loader(32, 16))
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    ((artifact, kw),) = [(a, kw) for a, kw in logged if a.type == "model"]
    assert kw["aliases"] == ["latest"]
    assert artifact.metadata["artifacts"][0]["file"] == "model_fp32.ptl"
    assert sorted(artifact.manifest.entries) == sorted(
        ["manifest.json", "model_fp32.ptl", f"model_int8-dynamic_{host_default_engine()}.ptl"]
    )
    assert list((run_dir / "files" / "media" / "table" / "export").glob("manifest_*.table.json"))


@pytest.mark.slow
@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("executorch", "onnxruntime", "onnxscript")),
    reason="extras not installed: pip install 'pqv-lightning[executorch,onnx]'",
)
def test_pte_and_onnx_targets_after_fit_are_verified_and_logged(tmp_path, lit_model):
    export = _export(tmp_path, precisions=["fp32", "int8-dynamic"], formats=["pte", "onnx"])
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(tmp_path, [export], max_epochs=1, logger=logger)
    trainer.fit(lit_model, random_loader(32, 16), random_loader(32, 16))
    files = [a["file"] for a in export.manifest["artifacts"]]
    assert files == ["model_fp32.pte", "model_int8-dynamic.pte", "model_fp32.onnx", "model_int8-dynamic.onnx"]
    assert all(a["status"] == "ok" and a["verification"]["samples"] == 32 for a in export.manifest["artifacts"])
    assert export.manifest["artifacts"][0]["partitions"] <= 2
    with open(logger.experiment.metrics_file_path) as fh:
        row = next(r for r in csv.DictReader(fh) if r.get("export/model_fp32_pte/latency_median_ms"))
    assert float(row["export/model_int8-dynamic_onnx/size_mb"]) < float(row["export/model_fp32_onnx/size_mb"])


def test_an_error_inside_the_users_val_dataloader_surfaces(tmp_path, lit_model):
    import lightning.pytorch as pl

    class DataModule(pl.LightningDataModule):
        def train_dataloader(self):
            return random_loader(32, 16)

        def val_dataloader(self):
            return self.val_set  # a user's bug: never assigned

    export = _export(tmp_path, precisions=["fp32"], formats=["ptl"])
    trainer = make_trainer(tmp_path, [export], max_epochs=1, limit_val_batches=0)
    with pytest.raises(AttributeError, match="val_set"):
        trainer.fit(lit_model, datamodule=DataModule())
    assert export.manifest is None


def test_a_datamodule_without_val_dataloader_falls_back_to_the_example_input(tmp_path, lit_model):
    import lightning.pytorch as pl

    class TrainOnly(pl.LightningDataModule):
        def train_dataloader(self):
            return random_loader(32, 16)

    export = _export(tmp_path, precisions=["fp32"], formats=["ptl"], min_top1_agreement=0.0)
    trainer = make_trainer(tmp_path, [export], max_epochs=1, limit_val_batches=0)
    trainer.fit(lit_model, datamodule=TrainOnly())
    (entry,) = export.manifest["artifacts"]
    assert entry["status"] == "ok" and entry["verification"]["samples"] == 1
