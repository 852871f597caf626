"""Lightning glue for :func:`pqv_lightning.export.export_mobile`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from ..checks import check_bool, check_choice, check_forward, check_mapping, check_names, check_shape
from ..export import MobileExportConfig, check_output_dir, export_mobile
from ..export.core import NORMALIZATION_EXAMPLE
from ..progress import progress_bar
from ..pruning.adapters import check_model_attr, example_inputs_for, locate_model

__all__ = ["MobileExport"]

_C = MobileExportConfig  # the defaults of the export options below are its own (tests/test_options.py)


class MobileExport(Callback):
    r"""When ``fit`` ends (and/or after ``trainer.test``), quantize the trained network, export it to
    ExecuTorch ``.pte``, ONNX, OpenVINO IR and/or Lite Interpreter ``.ptl`` files per precision (and, for
    ``.ptl`` int8, per engine), verify every file with the runtime that will execute it, time it,
    rank the verified files by latency on this host and write ``manifest.json`` (with the fastest
    as ``best``: file, runtime, ratio to fp32 eager). Works with or without :class:`~pqv_lightning.StructuredPruning` in the same
    Trainer (it exports the network as it is then, pruned or not).

    Runs on global rank zero only, on a deep copy: the trained module is never converted.
    Verification uses ``verify_batches`` batches of the validation loader (the datamodule's, or the
    one given to ``fit``); ``int8-static`` calibrates on ``calibration_batches`` batches of the
    ``calibration_loader`` ("val" or "train"). Results go to every logger as ``export/<file>/...``
    metrics (the file name with ``.`` as ``_``, e.g. ``export/model_int8-dynamic_pte/latency_median_ms``);
    with ``WandbLogger`` also a manifest table and a W&B Artifact (type ``model``) holding
    the files, with the manifest as metadata.

    The export options are :class:`~pqv_lightning.export.MobileExportConfig`'s and documented there
    once (the defaults here are read from it; a test checks that they agree): ``precisions``,
    ``formats``, ``engines``, ``delegation_friendly``, ``pad_widths``, ``overwrite``,
    ``min_top1_agreement``, ``on_failure``, ``verify_batches``, ``calibration_batches``, ``threads``,
    ``warmup``, ``repeats``, ``measure_memory``, ``jobs``, ``rank``, ``rank_rounds``, ``rank_calls``. A format
    whose extra is missing is reported when the callback is created.

    Args (the callback's own):
        output_dir: where to write; default ``<trainer.default_root_dir>/mobile_export``. Checked
            before training starts.
        calibration_loader: ``"val"`` or ``"train"``: the loader ``int8-static`` calibrates on.
        run_on: ``["fit"]``, ``["test"]`` or both.
        model_attr: dotted path of the network inside the LightningModule (as for StructuredPruning).
        example_input_shape: ``[C, H, W]`` of the example the files are traced with (``.pte``
            programs take exactly this shape, batch 1); default: the first validation sample's
            shape, else the network's own input size.
        input_normalization: recorded in the manifest (e.g. ``{"mean": [0.286], "std": [0.353]}``).
        log_artifact: upload the files as a W&B Artifact when a ``WandbLogger`` is attached.

    Example::

        trainer = pl.Trainer(max_epochs=3, callbacks=[
            StructuredPruning(pruning_ratio=0.25, iterative_steps=2),
            MobileExport(precisions=["fp32", "int8-dynamic", "int8-static"], formats=["pte", "onnx"]),
        ])
        trainer.fit(lit_module, datamodule=dm)
        print(trainer.callbacks[1].manifest["artifacts"])

    Raises:
        ConfigError: when created, for an unknown precision, format or engine, a format whose extra
            is not installed, a format that cannot apply a precision, or other out-of-range values;
            at ``setup`` (before training), for an output folder that is a file, not writable, or
            not empty without ``overwrite``, and a network that cannot be found.
        ExportFailedError: with ``on_failure="raise"``, the first artifact that is not ``ok``.
    """

    def __init__(
        self,
        precisions: list[str] | None = None,  # None: the config's default list
        formats: list[str] | None = None,  # None: the config's default list
        engines: list[Literal["x86", "fbgemm", "qnnpack", "onednn"]] | None = _C.engines,
        delegation_friendly: bool = _C.delegation_friendly,
        pad_widths: int | Literal["auto"] | None = _C.pad_widths,
        output_dir: str | None = None,
        overwrite: bool = _C.overwrite,
        min_top1_agreement: float = _C.min_top1_agreement,
        on_failure: Literal["warn", "raise"] = _C.on_failure,
        verify_batches: int = _C.verify_batches,
        calibration_batches: int = _C.calibration_batches,
        calibration_loader: Literal["val", "train"] = "val",
        threads: int = _C.threads,
        warmup: int = _C.warmup,
        repeats: int = _C.repeats,
        run_on: list[Literal["fit", "test"]] | None = None,
        model_attr: str | None = None,
        example_input_shape: list[int] | None = None,
        input_normalization: dict[str, Any] | None = None,
        log_artifact: bool = True,
        measure_memory: bool = _C.measure_memory,
        jobs: int | Literal["auto"] = _C.jobs,
        rank: Literal["round-robin", "in-process", "none"] = _C.rank,
        rank_rounds: int = _C.rank_rounds,
        rank_calls: int = _C.rank_calls,
    ) -> None:
        super().__init__()
        given = {"precisions": precisions, "formats": formats, "engines": engines, "output_dir": output_dir}
        # None = the config's default (output_dir: <default_root_dir>/mobile_export, filled in at setup);
        # anything else is checked as given, never replaced ([] and "" are errors, not defaults)
        self.config = MobileExportConfig(
            **{k: v for k, v in given.items() if v is not None},
            delegation_friendly=delegation_friendly,
            pad_widths=pad_widths,
            overwrite=overwrite,
            min_top1_agreement=min_top1_agreement,
            on_failure=on_failure,
            threads=threads,
            warmup=warmup,
            repeats=repeats,
            verify_batches=verify_batches,
            calibration_batches=calibration_batches,
            measure_memory=measure_memory,
            jobs=jobs,
            rank=rank,
            rank_rounds=rank_rounds,
            rank_calls=rank_calls,
        )
        self.config.validate()
        self._default_output_dir = output_dir is None
        check_choice("calibration_loader", calibration_loader, ("val", "train"))
        self.run_on = check_names("run_on", ["fit"] if run_on is None else run_on, ("fit", "test"))
        check_model_attr(model_attr)
        if example_input_shape is not None:
            check_shape("example_input_shape", example_input_shape)
        check_mapping("input_normalization", input_normalization, NORMALIZATION_EXAMPLE)
        check_bool("log_artifact", log_artifact)
        self.calibration_loader = calibration_loader
        self.model_attr = model_attr
        self.example_input_shape = example_input_shape
        self.input_normalization = input_normalization
        self.log_artifact = log_artifact
        self.manifest: dict[str, Any] | None = None

    # ------------------------------------------------------------------ early checks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in self.run_on:
            return
        if self._default_output_dir:
            self.config.output_dir = str(Path(trainer.default_root_dir) / "mobile_export")
        # clear errors now rather than after a long fit
        _, model, adapter = locate_model(pl_module, self.model_attr)
        if self.example_input_shape is not None:  # a dry forward on the shape the files will take
            example = example_inputs_for(model, adapter, tuple(self.example_input_shape))
            check_forward("example_input_shape", model, example[:1])
        if trainer.is_global_zero:
            check_output_dir(self.config)

    # ------------------------------------------------------------------ triggers
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "fit" in self.run_on:
            self.export(trainer, pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.run_on:
            self.export(trainer, pl_module)

    # ------------------------------------------------------------------ the work
    def _loader(self, trainer: pl.Trainer, which: str):
        dm = getattr(trainer, "datamodule", None)  # Trainer sets it in fit (not a declared attribute)
        hook = "val_dataloader" if which == "val" else "train_dataloader"
        if dm is not None and is_overridden(hook, dm):
            return getattr(dm, hook)()  # the user's code: whatever it raises surfaces
        loaders = trainer.val_dataloaders if which == "val" else trainer.train_dataloader
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None and which == "val" and trainer.test_dataloaders is not None:
            loaders = trainer.test_dataloaders
            if isinstance(loaders, (list, tuple)):
                loaders = loaders[0] if loaders else None
        return loaders

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        """Export now (rank zero only). Returns the manifest."""
        if not trainer.is_global_zero:
            return None
        _, model, adapter = locate_model(pl_module, self.model_attr)
        val = self._loader(trainer, "val")
        # int8-static always finds data inside a Trainer: the chosen loader, else val, else train
        calibration = self._loader(trainer, self.calibration_loader) or val or self._loader(trainer, "train")
        if self.example_input_shape is None and val is not None:
            x = next(iter(val))
            example = (x if isinstance(x, torch.Tensor) else x[0])[:1]
        else:  # the shape the user gave wins over the data's; without either, the network's own
            example = example_inputs_for(
                model, adapter, tuple(self.example_input_shape) if self.example_input_shape else None
            )
        # trainer.test runs its end hooks under inference_mode; quantization and tracing need it off
        with torch.inference_mode(False):
            with progress_bar("MobileExport") as progress:
                self.manifest = export_mobile(
                    model,
                    example.detach().cpu().clone(),
                    self.config,
                    validation_data=val,
                    calibration_data=calibration,
                    input_normalization=self.input_normalization,
                    progress=progress,
                )
        self._log(trainer)
        ok = sum(a["status"] == "ok" for a in self.manifest["artifacts"])
        engines = self.config.engines or [f"{self.manifest['host']['default_engine']} (host default)"]
        rank_zero_info(
            f"MobileExport: {ok}/{len(self.manifest['artifacts'])} artifacts verified in "
            f"{self.config.output_dir}; engines {engines}"
        )
        best = self.manifest.get("best")
        if best:
            rank_zero_info(
                f"MobileExport: fastest verified artifact on this host: {best['file']} ({best['runtime']}), "
                f"{best['median_ms']:.2f} ms, {best['speedup_vs_fp32_eager']:.2f}x fp32 eager "
                f"[{best['method']}]" + (f"; CAVEAT: {best['caveat']}" if "caveat" in best else "")
            )
        return self.manifest

    def _log(self, trainer: pl.Trainer) -> None:
        assert self.manifest is not None
        metrics: dict[str, float] = {}
        rows = []
        for a in self.manifest["artifacts"]:
            stem = a["file"].replace(".", "_")
            if a["status"] == "skipped":
                rows.append(
                    [a["file"], a["format"], a["precision"], a["engine"], a["status"], None, None, None, None, None]
                )
                continue
            v, lat = a["verification"], a["latency"]
            metrics.update(
                {
                    f"export/{stem}/size_mb": a["size_bytes"] / 2**20,
                    f"export/{stem}/latency_median_ms": lat["median_ms"],
                    f"export/{stem}/latency_p90_ms": lat["p90_ms"],
                    f"export/{stem}/speedup_vs_fp32_eager": lat["speedup_vs_fp32_eager"],
                    f"export/{stem}/top1_agreement": v["top1_agreement"],
                    f"export/{stem}/cosine": v["cosine"],
                }
            )
            if "top1_accuracy" in v:
                metrics[f"export/{stem}/top1_accuracy"] = v["top1_accuracy"]
            rows.append(
                [
                    a["file"],
                    a["format"],
                    a["precision"],
                    a["engine"],
                    a["status"],
                    a["size_bytes"],
                    lat["median_ms"],
                    lat["speedup_vs_fp32_eager"],
                    v["top1_agreement"],
                    v.get("top1_accuracy"),
                ]
            )
        best = self.manifest.get("best")
        if best:
            metrics["export/best/latency_median_ms"] = best["median_ms"]
            metrics["export/best/speedup_vs_fp32_eager"] = best["speedup_vs_fp32_eager"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            logger.log_table(
                key="export/manifest",
                columns=[
                    "file",
                    "format",
                    "precision",
                    "engine",
                    "status",
                    "size_bytes",
                    "latency_median_ms",
                    "speedup",
                    "top1_agreement",
                    "top1_accuracy",
                ],
                data=rows,
            )
            if self.log_artifact:
                import wandb

                run = logger.experiment
                artifact = wandb.Artifact(name=f"mobile-export-{run.id}", type="model", metadata=self.manifest)
                out = Path(self.config.output_dir)
                artifact.add_file(str(out / "manifest.json"))
                for a in self.manifest["artifacts"]:
                    if a["status"] == "ok":
                        for name in (a["file"], *a.get("companions", ())):
                            artifact.add_file(str(out / name))
                run.log_artifact(artifact, aliases=["latest"])
