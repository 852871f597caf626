"""Post-training quantization and export to mobile/edge file formats, every artifact verified.

:func:`export_mobile` is the Trainer-free entry point (the ``MobileExport`` callback wraps it):

* works on a deep copy: the model passed in is never converted;
* formats (``formats=[...]``, one target class each in :data:`TARGETS`):

  - ``pte``: ExecuTorch program with the XNNPACK delegate (extra ``executorch``);
  - ``onnx``: ONNX with ONNX Runtime quantization (extra ``onnx``);
  - ``ptl``: TorchScript Lite Interpreter (legacy, deprecated upstream; one file per torch
    quantized engine ``x86``, ``fbgemm``, ``qnnpack``, ``onednn`` for int8);

* precisions ``fp32``, ``fp16``, ``int8-dynamic`` (int8 weights, activations quantized per call),
  ``int8-static`` (weights and activations, calibrated) and, in ``.pte`` only, torchao's
  ``int8-dynamic-int4-weight`` / ``int8-dynamic-int8-weight`` (:mod:`.intx`); a network trained with
  fake quantization (:mod:`.qat`) is exported as the float network under it, and the manifest says
  which files compute what it trained; only Linear layers (plus MatMul/Conv
  in ONNX, the patch-embedding conv in ``.ptl`` static) are quantized — LayerNorm, softmax, GELU
  and the residual adds stay float (quantizing the residual stream of a ViT destroys its accuracy);
* each file is loaded back with the runtime that will execute it (Lite Interpreter, ExecuTorch
  runtime, ONNX Runtime) and compared with the fp32 eager model on the given batches (top-1
  agreement, max abs logit error, cosine, accuracy with labels); pt2e-quantized ``.pte`` files are
  also compared with their in-Python quantized model, which checks the lowering alone;
* latency of every artifact and of the fp32 eager model, in the same process with fixed threads,
  warm-up and repeats (median, p90, ratio to fp32 eager), and peak memory of inference (a fresh
  process per artifact);
* ``manifest.json`` beside the artifacts; every file is written to a temporary name and renamed,
  so an interruption leaves neither a half-written artifact nor a manifest entry for it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from .._version import __version__
from ..checks import (
    check_bool,
    check_choice,
    check_example_tensor,
    check_forward,
    check_int,
    check_mapping,
    check_names,
    check_number,
    check_writable_dir,
    first_line,
)
from ..errors import ConfigError
from ..fileio import atomic_write_text, commit_staged, file_digest, staged_name
from ..hostcpu import usable_cpus
from ..outputs import tensor_module
from ..progress import Progress
from ..settings import executorch_threads, quantized_engine, torch_threads
from ..workers import LineWorker, WorkerFailed, wait_readable
from .benchmark import Candidate, round_robin, summarize, target_modules, time_calls
from .padding import MAX_GROWTH, WidthPaddingError, pad_widths
from .precisions import PRECISIONS, Precision
from .qat import matching_precisions, strip_fake_quant_
from .targets import TARGETS, ExportTarget

__all__ = [
    "ENGINES",
    "ON_FAILURE",
    "PRECISIONS",
    "RANKINGS",
    "TARGETS",
    "ExportFailedError",
    "MobileExportConfig",
    "check_output_dir",
    "export_mobile",
    "host_default_engine",
    "rank_artifacts",
]

#: torch's quantized engines (fixed by torch, not an extension point)
ENGINES: tuple[str, ...] = ("x86", "fbgemm", "qnnpack", "onednn")
#: how the manifest's ``best`` artifact is chosen (see :func:`rank_artifacts`)
RANKINGS: tuple[str, ...] = ("round-robin", "in-process", "none")
#: what a failed artifact does: marked in the manifest, or raised
ON_FAILURE: tuple[str, ...] = ("warn", "raise")
#: what ``input_normalization`` looks like, for its error message
NORMALIZATION_EXAMPLE = "{'mean': [0.286], 'std': [0.353]}"
#: seconds a build worker may take to start (import torch and the runtimes, load the model)
WORKER_START_TIMEOUT_S = 600.0
#: CPUs other work may keep busy while a round-robin ranking times a file before it is retaken, and
#: past which (after the retakes) the manifest's ``best`` carries a ``caveat``
ROUND_ROBIN_MAX_CONTENTION = 0.2


def __getattr__(attr: str):
    if attr == "FORMATS":  # the 0.1 tuple, now a live view of the registry
        return TARGETS.names()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def host_default_engine() -> str:
    """The best supported quantized engine for this host: ``x86`` on x86-64, ``qnnpack`` on ARM."""
    supported = torch.backends.quantized.supported_engines
    preferred = ("qnnpack",) if platform.machine().lower() in ("arm64", "aarch64") else ("x86", "fbgemm", "onednn")
    for engine in (*preferred, "qnnpack"):
        if engine in supported:
            return engine
    raise RuntimeError(f"this torch build has no quantized engine (supported: {supported})")


@dataclass
class MobileExportConfig:
    """What to export and how to check it.

    Args:
        precisions: names in :data:`PRECISIONS` (``fp32``, ``fp16``, ``int8-dynamic``, ``int8-static``
            and any you registered).
        formats: names in :data:`TARGETS` (``pte``, ``onnx``, ``ptl``); ``pte`` and ``onnx`` need
            the extras of the same name (checked here, before any training).
        engines: subset of :data:`ENGINES`, for ``ptl`` int8 files; ``None`` = :func:`host_default_engine`.
        delegation_friendly: for ``pte``, swap timm Attention/LayerNorm for numerically identical
            modules XNNPACK can take whole (2 partitions instead of ~62 for a ViT); see
            :mod:`pqv_lightning.export.delegation`.
        output_dir: folder for the artifacts and ``manifest.json``.
        overwrite: allow a non-empty ``output_dir`` (its previous artifacts are replaced).
        min_top1_agreement: an artifact whose top-1 agreement with fp32 eager is below this fails.
        on_failure: ``"warn"`` (an artifact that fails export, loading, verification or timing is
            marked ``skipped``/``failed`` in the manifest with the stage and reason, and the rest go on)
            or ``"raise"`` (the first artifact that is not ``ok`` raises :class:`ExportFailedError`
            naming the file and the stage; the manifest keeps the artifacts finished before it).
        threads: torch threads for verification and latency.
        warmup, repeats: latency measurement (batch of ``example_input``).
        verify_batches, calibration_batches: how many batches of the loaders to use.
        measure_memory: peak resident memory of a fresh process that loads the artifact and runs it,
            and how much of it loading + inference added over the started runtime (an in-process number
            would include everything else the process ever allocated). With ``rank="round-robin"``
            the ranking's timing processes (one per artifact) measure it, at no extra cost; otherwise
            (and for an artifact the ranking did not time) a probe process per artifact that loads it
            and runs 3 inferences (2-5 s each). ``memory["measured_in"]`` says which.
        pad_widths: grow the model's widths (embedding, heads x head dim, MLP hidden) to multiples
            of this before export, computing exactly the same function (:func:`.padding.pad_widths`;
            each width only when that grows it by at most 12.5 %; checked on ``example_input``,
            verified against the unpadded model like every file).
            ``"auto"`` (default): only for targets whose runtime runs such widths faster
            (``ExportTarget.width_multiple``; OpenVINO: 64, others none: padding adds MACs they
            pay for); an integer >= 2: for every target; ``None``: never. A model it cannot pad
            (not a timm ViT, a custom block) is exported unpadded and ``optimizations_skipped`` says why.
        jobs: how many files are written and verified at once, each in a worker process of its own
            (a plain subprocess: a script is never re-run in it); the first file is always built in
            this process, and every file is timed here, one by one, after all are built.
            ``"auto"`` (default): as many workers as this process may use CPUs (at most
            ``MAX_AUTO_JOBS``) when the first file takes ``PARALLEL_AFTER_S`` (20 s) or longer, else
            none (a worker's start-up, ~15 s, would cost a small model more than it saves): they
            start once the first file has taken ``START_WORKERS_AFTER_S`` (10 s) and take the other
            files from 20 s on, while this process still builds the first; an integer >= 1: that
            many, started at once (1: every file in this process). ExecuTorch's lowering is
            single-threaded Python: the demo's 9 files take about half as long with 2 workers on 2
            cores. The manifest's ``build`` says how the files were built (and why not in workers,
            e.g. a model whose class is defined in ``__main__`` cannot be sent to one).
        rank: how the manifest's ``best`` (the fastest verified artifact on this host) is chosen:
            ``"round-robin"`` times every ``ok`` artifact and the fp32 eager model each in a
            process of its own, in turn, ``rank_rounds`` rounds of ``rank_calls`` calls (the method
            of ``pqv bench``, except that each process is started and loaded once and kept for every
            round: 3-8 s of start-up and loading per artifact, plus the calls);
            ``"in-process"`` ranks by the latency measured above (no extra time; runtimes in one
            process disturb each other, so a close ranking can be wrong); ``"none"``: no ``best``.
    """

    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8-dynamic"])
    formats: list[str] = field(default_factory=lambda: ["ptl"])
    engines: list[str] | None = None
    delegation_friendly: bool = True
    output_dir: str = "mobile_export"
    overwrite: bool = False
    min_top1_agreement: float = 0.9
    on_failure: str = "warn"
    threads: int = 2
    warmup: int = 3
    repeats: int = 20
    verify_batches: int = 8
    calibration_batches: int = 8
    measure_memory: bool = True
    pad_widths: int | str | None = "auto"
    jobs: int | str = "auto"
    rank: str = "round-robin"
    rank_rounds: int = 3
    rank_calls: int = 10

    @classmethod
    def files_only(cls, output_dir: str | os.PathLike[str], **fields: Any) -> MobileExportConfig:
        """A config that writes and verifies the files and does nothing more, for code that times them
        itself (the benchmarks, ``pqv headline``, the latency budgets): one call per file instead of a
        timing (``warmup=0, repeats=1``), 2 verification and calibration batches, no memory probe, no
        ranking, no agreement floor, and an earlier export in ``output_dir`` replaced. ``fields`` set any
        field, these included.

        >>> MobileExportConfig.files_only("out", formats=["onnx"]).rank
        'none'
        """
        defaults: dict[str, Any] = {
            "overwrite": True,
            "warmup": 0,
            "repeats": 1,
            "verify_batches": 2,
            "calibration_batches": 2,
            "measure_memory": False,
            "min_top1_agreement": 0.0,
            "rank": "none",
        }
        return cls(output_dir=str(output_dir), **{**defaults, **fields})

    def validate(self) -> None:
        check_names("precisions", self.precisions, PRECISIONS.names)
        check_names("formats", self.formats, TARGETS.names)
        for fmt in self.formats:
            reason = TARGETS[fmt].missing()
            if reason:
                raise ConfigError(reason)
            for name in self.precisions:
                TARGETS[fmt].handler(PRECISIONS[name])  # raises when the format cannot apply it
        if self.engines is not None:
            check_names("engines", self.engines, ENGINES)
            missing = [e for e in self.engines if e not in torch.backends.quantized.supported_engines]
            if missing:
                raise ConfigError(
                    f"engines {missing} are not supported by this torch build; supported: "
                    f"{torch.backends.quantized.supported_engines}"
                )
        for name in ("delegation_friendly", "overwrite", "measure_memory"):
            check_bool(name, getattr(self, name))
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir).strip():
            raise ConfigError(f"output_dir={self.output_dir!r} must be a folder path (a non-empty string)")
        if not (
            self.pad_widths is None
            or self.pad_widths == "auto"
            or (isinstance(self.pad_widths, int) and not isinstance(self.pad_widths, bool) and self.pad_widths >= 2)
        ):
            raise ConfigError(f"pad_widths={self.pad_widths!r}; allowed: 'auto', None or an integer >= 2")
        if self.jobs != "auto" and not (
            isinstance(self.jobs, int) and not isinstance(self.jobs, bool) and self.jobs >= 1
        ):
            raise ConfigError(f"jobs={self.jobs!r}; allowed: 'auto' or an integer >= 1")
        check_choice("rank", self.rank, RANKINGS)
        check_choice("on_failure", self.on_failure, ON_FAILURE)
        check_number("min_top1_agreement", self.min_top1_agreement, minimum=0, maximum=1)
        for name in ("threads", "repeats", "verify_batches", "calibration_batches", "rank_rounds", "rank_calls"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("warmup", self.warmup, minimum=0)


# ---------------------------------------------------------------------------------------------- files
#: what an interrupted export leaves in its folder (hidden temporary files of atomic writes, the
#: round-robin ranking's and the build workers' working folders): removed by the next export to the folder
_LEFTOVER_PATTERNS = (".model_*", ".manifest.json.*", ".rank-*", ".build-*")


def _leftovers(out: Path) -> list[Path]:
    return sorted({p for pattern in _LEFTOVER_PATTERNS for p in out.glob(pattern)})


def check_output_dir(config: MobileExportConfig) -> None:
    """Refuse an output folder that is a file, cannot be created or written (probed for real), or is
    not empty without ``overwrite`` (leftovers of an interrupted export do not count: the export
    removes them). Leaves nothing behind, so it can run before a long fit."""
    out = check_writable_dir("output_dir", config.output_dir)
    if out.is_dir() and not config.overwrite:
        leftovers = set(_leftovers(out))
        if any(p not in leftovers for p in out.iterdir()):
            raise ConfigError(f"output_dir={str(out)!r} is not empty; pass overwrite=True to replace its artifacts")


def _prepare_dir(config: MobileExportConfig) -> Path:
    check_output_dir(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in _leftovers(out):  # an earlier export was killed: its temporary files and timing folder
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if config.overwrite:  # replace our own previous artifacts (never other files) so none goes stale
        old_files = [
            p
            for t in TARGETS.values()
            for suffix in (t.suffix, *t.companion_suffixes)
            for p in out.glob(f"model_*{suffix}")
        ]
        for old in [*old_files, out / "manifest.json"]:
            old.unlink(missing_ok=True)
    return out


def _write_manifest(path: Path, manifest: dict[str, Any], described: Sequence[Path] = ()) -> None:
    """Write ``manifest.json`` atomically. When that fails (a full disk), the files it would have been
    the first to describe (``described``) are removed, so the folder holds exactly what the previous
    manifest lists, and the error says so."""
    try:
        atomic_write_text(path, json.dumps(manifest, indent=1))
    except OSError as exc:
        for f in described:
            f.unlink(missing_ok=True)
        removed = f"; removed {[f.name for f in described]}, which it would have described" if described else ""
        raise ExportFailedError(
            f"could not write {path} ({first_line(exc)}){removed}. The folder holds what "
            "the previous manifest lists (if any)"
        ) from exc


# ---------------------------------------------------------------------------------------------- checks
@torch.no_grad()
def _verify(
    run, expected: Sequence[torch.Tensor], batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]]
) -> dict[str, Any]:
    """``run``'s outputs on ``batches`` against ``expected``, the fp32 eager model's logits for the same
    batches (computed once per export, not once per file)."""
    agree = total = 0
    max_err, cos_sum, correct_logits, labels = 0.0, 0.0, [], []
    for ref, (x, y) in zip(expected, batches, strict=True):
        out = run(x)
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        total += len(x)
        max_err = max(max_err, float((ref - out).abs().max()))
        cos_sum += float(torch.nn.functional.cosine_similarity(ref, out, dim=-1).sum())
        if y is not None:
            correct_logits.append(out)
            labels.append(y)
    result = {
        "samples": total,
        "top1_agreement": agree / total,
        "max_abs_logit_error": max_err,
        "cosine": cos_sum / total,
    }
    if labels:
        logits = torch.cat(correct_logits)
        result["top1_accuracy"] = float(
            multiclass_accuracy(logits, torch.cat(labels), num_classes=logits.shape[-1], average="micro")
        )
    return result


def _inference_memory(probe: str, path: str, shape: Sequence[int], threads: int, engine: str | None) -> dict[str, Any]:
    """Peak RSS of a fresh process while it loads ``path`` and runs 3 inferences (Linux /proc), and
    how much of it the model added over the process with torch and the runtime imported."""
    proc = subprocess.run(
        [sys.executable, "-c", probe, path, ",".join(map(str, shape)), str(threads), engine or "-"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        error = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        return {"error": error}  # the manifest's memory entry holds the reason
    before, after = (int(v) for v in proc.stdout.split()[-2:])  # KiB
    return {"peak_rss_mb": after / 1024, "load_and_inference_mb": (after - before) / 1024, "measured_in": "probe"}


def _latency(run, example: torch.Tensor, warmup: int, repeats: int) -> dict[str, Any]:
    stats = summarize(time_calls(run, example, warmup, repeats))
    return {
        "median_ms": stats["median_ms"],
        "p90_ms": stats["p90_ms"],
        "min_ms": stats["min_ms"],
        "repeats": repeats,
        "warmup": warmup,
    }


def _batches(data: Iterable | None, limit: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    if data is None:
        return out
    for item in data:
        if len(out) >= limit:
            break
        if isinstance(item, torch.Tensor):
            out.append((item.float().cpu(), None))
        else:
            x, y = item[0], item[1] if len(item) > 1 else None
            out.append((x.float().cpu(), y.cpu() if isinstance(y, torch.Tensor) else None))
    return out


class ExportFailedError(RuntimeError):
    """``on_failure="raise"``: an artifact was not ``ok``; the message names the file and the stage."""


# ---------------------------------------------------------------------------------------------- entry point
def runtime_versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "pqv_lightning": __version__}
    for dist in ("executorch", "torchao", "onnx", "onnxruntime", "onnxscript", "openvino", "nncf"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def export_mobile(
    model: nn.Module,
    example_input: torch.Tensor,
    config: MobileExportConfig | None = None,
    *,
    validation_data: Iterable | None = None,
    calibration_data: Iterable | None = None,
    input_normalization: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Quantize and export ``model`` to every format x precision of ``config``; verify and time each file.

    ``progress(done, total, what)`` is called after each file and, while the files are ranked round-robin,
    after each timed run (:mod:`pqv_lightning.progress`).

    ``validation_data`` / ``calibration_data`` yield tensors or ``(x, y)`` pairs (a DataLoader).
    Verification uses ``validation_data`` (``example_input`` when None); ``int8-static`` needs
    ``calibration_data`` (or ``validation_data``). ``.pte`` programs take inputs of exactly
    ``example_input``'s shape (use batch 1 for a phone); ``.onnx`` files take any batch. Returns the
    manifest (also in ``output_dir/manifest.json``).

    Example::

        manifest = export_mobile(model, torch.randn(1, 1, 32, 32),
                                 MobileExportConfig(precisions=["fp32", "int8-dynamic"], formats=["pte", "onnx"],
                                                    output_dir="out"),
                                 validation_data=dm.val_dataloader())
    """
    config = MobileExportConfig() if config is None else config
    if not isinstance(config, MobileExportConfig):
        raise ConfigError(f"config must be a MobileExportConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    check_example_tensor("example_input", example_input)
    check_mapping("input_normalization", input_normalization, NORMALIZATION_EXAMPLE)
    engines = list(config.engines or [host_default_engine()])
    calibration = _batches(
        calibration_data if calibration_data is not None else validation_data, config.calibration_batches
    )
    precisions = [PRECISIONS[p] for p in config.precisions]
    calibrated = [p.name for p in precisions if p.needs_calibration]
    if calibrated and not calibration:
        raise ConfigError(f"precisions {calibrated} need calibration_data (or validation_data) to calibrate on")
    example = example_input.detach().float().cpu()
    reference = copy.deepcopy(model).eval().float().cpu()
    # a network trained with fake quantization (QuantizationAwareTraining, prepare_qat_) is exported as the
    # float network under it: quantized with the scheme it trained for, a file computes what was trained
    trained_qat = strip_fake_quant_(reference)
    if trained_qat is not None:
        trained_qat["matches"] = matching_precisions(reference, trained_qat, precisions)
    # before any file is written; a Hugging Face model is exported as its logits
    reference = tensor_module(reference, check_forward("example_input", reference, example))
    # the model each format exports (width-padded where it asks for that), one copy per multiple
    padded: dict[int, tuple[nn.Module, dict[str, Any]]] = {}
    sources = {f: _padded_source(TARGETS[f], reference, example, config.pad_widths, padded) for f in config.formats}
    for fmt in config.formats:  # a model a format cannot write at a precision: refused before the folder is touched
        for precision in precisions:
            TARGETS[fmt].check_model(sources[fmt][0], precision)
    out = _prepare_dir(config)
    verify = _batches(validation_data, config.verify_batches) or [(example, None)]

    manifest: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": runtime_versions(),
        "host": {
            "machine": platform.machine(),
            "threads": config.threads,
            "default_engine": host_default_engine(),
            "xnnpack": bool(torch._C._is_xnnpack_enabled()),
        },
        "input": {"shape": list(example.shape), "dtype": str(example.dtype), "normalization": input_normalization},
        "artifacts": [],
    }
    if trained_qat is not None:
        manifest["qat"] = trained_qat
    manifest_path = out / "manifest.json"
    # threads (torch's and, for .pte, ExecuTorch's pool) and the quantized engine are the caller's again
    # when this returns
    with contextlib.ExitStack() as settings:
        settings.enter_context(torch_threads(config.threads))
        if "pte" in config.formats:
            settings.enter_context(executorch_threads(config.threads))
        with torch.no_grad():
            baseline = _latency(reference, example, config.warmup, config.repeats)
            expected = [reference(x) for x, _ in verify]
        manifest["baseline_fp32_eager"] = {"latency": baseline}
        ctx = _BuildContext(
            sources=sources,
            precisions={p.name: p for p in precisions},
            example=example,
            calibration=[x for x, _ in calibration],
            verify=verify,
            expected=expected,
            config=config,
            default_engine=engines[0],
            out=str(out),
        )
        # every file to write, in order: format x precision (x engine, where the precision depends on one)
        variants = [
            (fmt, precision.name, engine)
            for fmt in config.formats
            for precision in precisions
            for engine in (engines if TARGETS[fmt].engine_dependent and precision.engine_dependent else [None])
        ]
        built, errors, manifest["build"] = _build_all(ctx, variants, progress)
        try:
            # timed one by one in this process once nothing else builds, then named and described
            for i, entry in enumerate(built):
                if entry["status"] == "not built":  # an earlier file failed under on_failure="raise"
                    break
                if entry["status"] == "built":
                    entry = built[i] = _finish_one(entry, example, config, baseline, out)
                if trained_qat is not None:  # the file computes what quantization-aware training trained
                    entry["from_qat"] = entry["precision"] in trained_qat["matches"]
                manifest["artifacts"].append(entry)
                _write_manifest(manifest_path, manifest, _files_of(entry, TARGETS[entry["format"]], out))
                if entry["status"] == "ok":
                    continue
                if config.on_failure == "raise" and entry["status"] == "skipped":
                    raise errors.get(i) or ExportFailedError(f"{entry['file']}: {entry['reason']}")
                what = "failed verification" if entry["status"] == "failed" else "skipped"
                warnings.warn(f"MobileExport: {entry['file']} {what}: {entry['reason']}", stacklevel=2)
                if config.on_failure == "raise":
                    raise ExportFailedError(f"{entry['file']}: {entry['reason']}")
        finally:  # an interruption or a failure: no staged file stays behind
            _discard_staged(built)
        if config.rank != "none":
            manifest["best"] = rank_artifacts(manifest, out, reference, example, config, progress)
        if config.measure_memory:
            _memory_after_ranking(manifest, out, example.shape, config.threads)
    _write_manifest(manifest_path, manifest)
    return manifest


def _memory_after_ranking(manifest: dict[str, Any], out: Path, shape: Sequence[int], threads: int) -> None:
    """The memory of each written file not measured while it was built: the largest its round-robin
    timing process reached (that process loaded the file alone and ran it, like a probe: no process
    more), or a probe where the ranking did not time it (it failed verification, the ranking failed)."""
    for entry in manifest["artifacts"]:
        if entry["status"] in ("skipped", "not built") or entry.get("memory") is not None:
            continue
        target, ranked = TARGETS[entry["format"]], entry.get("latency_round_robin")
        if ranked is not None:
            entry["memory"] = {
                "peak_rss_mb": ranked["peak_rss_mb"],
                "load_and_inference_mb": ranked["load_and_inference_mb"],
                "measured_in": "round-robin timing process",
            }
        elif target.memory_probe:
            entry["memory"] = _inference_memory(
                target.memory_probe, str(out / entry["file"]), shape, threads, entry["engine"]
            )


def _files_of(entry: dict[str, Any], target: ExportTarget, out: Path) -> list[Path]:
    """The files on disk that a manifest entry describes (none for a skipped artifact)."""
    if entry["status"] == "skipped":
        return []
    return [out / entry["file"], *target.companions(out / entry["file"])]


def _best_entry(
    artifact: dict[str, Any],
    stats: dict[str, float],
    speedup: float,
    method: str,
    baseline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest's ``best``; both latencies by their median. With round-robin ``stats`` / ``baseline``
    timed while other work kept more CPUs busy than the limit (after the retakes), a ``caveat`` says so:
    such a ratio can be far off (a busy host slows one process more than another)."""
    best = {
        "file": artifact["file"],
        "format": artifact["format"],
        "runtime": artifact.get("runtime"),
        "precision": artifact["precision"],
        "engine": artifact["engine"],
        "median_ms": stats["median_ms"],
        "p90_ms": stats["p90_ms"],
        "speedup_vs_fp32_eager": speedup,
        "statistic": "median / median",
        "method": method,
    }
    busy = {
        label: s["contention_max"]
        for label, s in (("this file", stats), ("fp32 eager", baseline or {}))
        if s.get("contention_max") is not None and s["contention_max"] > ROUND_ROBIN_MAX_CONTENTION
    }
    if busy:
        best["caveat"] = (
            "measured on a busy host: other work kept "
            + ", ".join(f"{v:.2f} CPUs busy while {k} was timed" for k, v in busy.items())
            + f" (limit {ROUND_ROBIN_MAX_CONTENTION}, after retakes); the ratio may be far off: time again "
            "on a quiet host (pqv bench)"
        )
    return best


def rank_artifacts(
    manifest: dict[str, Any],
    out: Path,
    reference: nn.Module,
    example: torch.Tensor,
    config: MobileExportConfig,
    progress: Progress | None = None,
) -> dict[str, Any] | None:
    """The fastest verified (``ok``) artifact of ``manifest`` on this host, or None when none is.

    ``config.rank="round-robin"``: every ``ok`` artifact and ``reference`` (fp32 eager, saved to a
    temporary ``.pt``) are timed each in a process of its own (started and loaded once, kept for
    every round), in turn (:func:`~.benchmark.round_robin` with ``fresh_processes=False``);
    each artifact gets a ``latency_round_robin`` entry and the ranking is by its median. When the
    reference cannot be pickled for the worker processes (a class defined in ``__main__`` or a
    function), or a worker fails, the ranking falls back to the in-process latencies and says why in
    ``method``. ``"in-process"``: by the latencies measured during export.
    """
    ok = [a for a in manifest["artifacts"] if a["status"] == "ok"]
    if not ok:
        return None
    threads = config.threads
    if config.rank == "round-robin":
        try:
            with tempfile.TemporaryDirectory(prefix=".rank-", dir=out) as work:
                eager = Path(work) / "fp32_eager.pt"
                torch.save(reference, eager)
                candidates = [Candidate("fp32 eager", str(eager))]
                candidates += [Candidate(a["file"], str(out / a["file"]), a["engine"]) for a in ok]
                runs = config.rank_rounds * len(candidates)
                timed: list[str] = []

                def one_run(round_index: int, label: str) -> None:
                    timed.append(label)
                    if progress is not None:
                        progress(len(timed), runs, f"ranking round {round_index + 1}: {label}")

                stats = round_robin(
                    candidates,
                    list(example.shape),
                    threads=threads,
                    rounds=config.rank_rounds,
                    warmup=config.warmup,
                    calls=config.rank_calls,
                    baseline="fp32 eager",
                    max_contention=ROUND_ROBIN_MAX_CONTENTION,
                    progress=one_run,
                    fresh_processes=False,  # one start-up and load per file, not per round
                )
        except Exception as exc:  # noqa: BLE001 - the artifacts are fine; only the ranking method changes
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(
                f"MobileExport: round-robin ranking failed ({reason}); ranking by in-process latency", stacklevel=3
            )
            fallback = f"in-process latency (round-robin failed: {reason})"
        else:
            manifest["baseline_fp32_eager"]["latency_round_robin"] = stats["fp32 eager"]
            for a in ok:
                a["latency_round_robin"] = stats[a["file"]]
            winner = min(ok, key=lambda a: stats[a["file"]]["median_ms"])
            method = (
                f"round-robin: every artifact and fp32 eager in a process of its own, {config.rank_rounds} rounds x "
                f"{config.rank_calls} calls, {threads} threads, batch {example.shape[0]}"
            )
            return _best_entry(
                winner, stats[winner["file"]], stats[winner["file"]]["speedup_vs_baseline"], method, stats["fp32 eager"]
            )
    else:
        fallback = "in-process latency (measured during export, all runtimes in one process)"
    winner = min(ok, key=lambda a: a["latency"]["median_ms"])
    return _best_entry(winner, winner["latency"], winner["latency"]["speedup_vs_fp32_eager"], fallback)


def _cosine(run, reference, batches) -> float:
    total, cos = 0, 0.0
    for x, _ in batches:
        cos += float(torch.nn.functional.cosine_similarity(reference(x), run(x), dim=-1).sum())
        total += len(x)
    return cos / total


def _padded_source(
    target: ExportTarget,
    reference: nn.Module,
    example: torch.Tensor,
    pad: int | str | None,
    cache: dict[int, tuple[nn.Module, dict[str, Any]]],
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model ``target`` exports: ``reference`` with widths padded to the multiple ``pad`` asks for
    (one copy per multiple, kept in ``cache``), and the manifest's ``width_padding`` entry (None when
    no padding was asked for this target)."""
    multiple = target.width_multiple if pad == "auto" else pad
    assert not isinstance(multiple, str), "MobileExportConfig.validate allows 'auto', an int or None"
    if not multiple:
        return reference, None
    if multiple not in cache:
        model = copy.deepcopy(reference)
        try:
            changes = pad_widths(model, multiple)
        except Exception as exc:  # noqa: BLE001 - an optimization: export the model unpadded and say why
            reason = str(exc) if isinstance(exc, WidthPaddingError) else f"{type(exc).__name__}: {exc}"
            cache[multiple] = reference, {"multiple": multiple, "applied": False, "reason": reason}
        else:
            with torch.no_grad():
                ref, out = reference(example), model(example)
            error = (
                float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-12)) if ref.shape == out.shape else None
            )
            if error is None or error > 1e-4:  # a forward that uses the widths itself (e.g. returns features)
                reason = (
                    f"the padded model's output differs (shape {tuple(out.shape)} vs {tuple(ref.shape)}, "
                    f"relative error {error})"
                )
                cache[multiple] = reference, {"multiple": multiple, "applied": False, "reason": reason}
            else:
                applied = any(k != "kept" for k in changes)
                cache[multiple] = (
                    (model if applied else reference),
                    {"multiple": multiple, "applied": applied, "widths": changes, "max_relative_error": error},
                )
    return cache[multiple]


def _padding_notes(padding: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """(applied, skipped) lines of the manifest for ``padding``."""
    if padding is None:
        return [], []
    m = padding["multiple"]
    if "reason" in padding:
        return [], [f"width padding to multiples of {m}: {padding['reason']}"]
    kept = padding["widths"].get("kept", {})
    skipped = (
        [
            f"width padding to multiples of {m} left "
            + ", ".join(f"{k} {a} (->{b})" for k, (a, b) in kept.items())
            + f" as they were: padding would add more than {MAX_GROWTH:.1%}"
        ]
        if kept
        else []
    )
    if not padding["applied"]:
        return ([] if kept else [f"widths already multiples of {m} (no padding needed)"]), skipped
    widths = ", ".join(f"{k} {v[0]}->{v[1]}" for k, v in padding["widths"].items() if k != "kept")
    return [f"widths padded to multiples of {m}, same function: {widths}"], skipped


@dataclass
class _BuildContext:
    """What building a file needs besides its (format, precision, engine): sent once to each build
    worker (``torch.save``), so it holds only picklable values."""

    sources: dict[str, tuple[nn.Module, dict[str, Any] | None]]  # per format: the model it exports, its padding
    precisions: dict[str, Precision]  # by name
    example: torch.Tensor
    calibration: list[torch.Tensor]
    verify: list[tuple[torch.Tensor, torch.Tensor | None]]
    expected: list[torch.Tensor]  # the fp32 eager model's logits on the verify batches
    config: MobileExportConfig
    default_engine: str
    out: str


def _build_one(
    ctx: _BuildContext, fmt: str, precision_name: str, engine: str | None, threads: int, raise_on_failure: bool
) -> dict[str, Any]:
    """Write one file under a temporary name beside its final one, load it back and verify it (against
    ``ctx.expected``, the fp32 eager model's logits), measure its memory: the manifest entry so far, with the temporary name in
    ``"staged"`` (:func:`_finish_one` times it and gives it its name), or a ``skipped`` entry (its
    temporary files removed) saying at which stage it failed. Runs in this process or a build worker
    (:mod:`.build_worker`); ``raise_on_failure`` raises :class:`ExportFailedError` instead of skipping."""
    # the precision object itself, not the registry: one registered only in the caller works in a worker too
    target, precision, config = TARGETS[fmt], ctx.precisions[precision_name], ctx.config
    source, padding = ctx.sources[fmt]
    entry = _identity(fmt, precision_name, engine)
    name = entry["file"]
    path = Path(ctx.out) / name
    stage = "export"
    started = time.perf_counter()
    tmp = staged_name(path, suffix=target.suffix)
    try:
        with quantized_engine(engine or ctx.default_engine), torch.no_grad():
            built = target.write(
                source,
                precision,
                engine or ctx.default_engine,
                ctx.example,
                ctx.calibration,
                tmp,
                {"delegation_friendly": config.delegation_friendly},
            )
            stage = "load and verify"
            run = target.load(tmp, ctx.example, threads)
            checks = _verify(run, ctx.expected, ctx.verify)
            if built.quantized_reference is not None:
                # a check of the lowering alone (the file against its in-Python quantized model): the
                # first verify batch is enough, and the in-Python model is slow (4-8 s for 512 images)
                checks["quantized_reference_cosine"] = _cosine(run, built.quantized_reference, ctx.verify[:1])
                checks["quantized_reference_samples"] = len(ctx.verify[0][0]) if ctx.verify else 0
            del run
            memory = (
                _inference_memory(target.memory_probe, tmp, ctx.example.shape, config.threads, engine)
                # with round-robin ranking, the ranking's timing processes measure it (_memory_after_ranking)
                if config.measure_memory and target.memory_probe and config.rank != "round-robin"
                else None
            )
            digest = file_digest(tmp, 64)
            size = sum(Path(f).stat().st_size for f in [Path(tmp), *target.companions(tmp)])
    except Exception as exc:  # an untraceable model, an unsupported op...: skip this variant and say why
        _discard(target, tmp)
        entry.update(status="skipped", reason=f"{stage} failed: {type(exc).__name__}: {exc}")
        if raise_on_failure:
            raise ExportFailedError(f"{name}: {entry['reason']}") from exc
        return entry
    except BaseException:  # Ctrl-C: nothing half-written stays
        _discard(target, tmp)
        raise
    pad_applied, pad_skipped = _padding_notes(padding)
    if padding is not None:
        entry["width_padding"] = padding
    entry.update(
        runtime=target.runtime,
        status="built",
        reason=None,
        staged=tmp,
        sha256=digest,
        size_bytes=size,
        optimizations_applied=pad_applied + built.applied,
        optimizations_skipped=pad_skipped + built.skipped,
        **built.details,
        verification=checks,
        memory=memory,
        build_seconds=round(time.perf_counter() - started, 2),  # write + reload + verify + memory probe
    )
    return entry


#: ``jobs="auto"`` builds the files after the first in parallel worker processes when the first took at
#: least this long (starting a worker, importing torch and the runtimes and loading the model, takes
#: ~15 s on 2 cores: below this a tiny model's files are built faster in this process)
PARALLEL_AFTER_S = 20.0
#: ``jobs="auto"`` starts the workers once the first file has been building this long, so that they
#: start up beside it (its lowering is single-threaded Python: a core is free) and are ready when it
#: is done; a first file that then ends before ``PARALLEL_AFTER_S`` stops them unused
START_WORKERS_AFTER_S = 10.0
#: at most this many build workers under ``jobs="auto"`` (each holds a copy of the model)
MAX_AUTO_JOBS = 4


def _worker_count(jobs: int | str, remaining: int) -> int:
    """How many worker processes would build the ``remaining`` files if any do (1: none)."""
    if remaining < 2:
        return 1
    if jobs == "auto":
        return min(MAX_AUTO_JOBS, usable_cpus(), remaining)
    assert isinstance(jobs, int), "MobileExportConfig.validate allows 'auto' or an int >= 1"
    return min(jobs, remaining)


def _build_processes(jobs: int | str, first_s: float, remaining: int) -> int:
    """How many worker processes build the ``remaining`` files (1: none, this process builds them)."""
    if jobs == "auto" and first_s < PARALLEL_AFTER_S:
        return 1
    return _worker_count(jobs, remaining)


def _build_all(
    ctx: _BuildContext, variants: list[tuple[str, str, str | None]], progress: Progress | None
) -> tuple[list[dict[str, Any]], dict[int, BaseException], dict[str, Any]]:
    """Build (write + verify) every variant: the first in this process, the rest in this process or in
    worker processes (``config.jobs``). Returns the entries in ``variants``' order, the exception of a
    file that failed under ``on_failure="raise"`` (the files after it are ``not built``), and how the
    files were built (the manifest's ``build``). Interrupted, it removes what it had built."""
    builder = _Builder(ctx, variants, progress)
    try:
        how = builder.run()
    except BaseException:
        _discard_staged([e for e in builder.entries if e is not None])
        raise
    return [e for e in builder.entries if e is not None], builder.errors, how


class _WorkerPool:
    """Build workers (:mod:`.build_worker`) for one export, started ``delay`` seconds after the pool is
    entered (by a timer thread; 0: at once) or when :meth:`workers` is first called, whichever comes
    first. Leaving the pool stops the timer, kills the workers and removes the saved context."""

    def __init__(self, ctx: _BuildContext, processes: int, delay: float) -> None:
        self.ctx, self.processes, self.delay = ctx, processes, delay
        self._workers: list[LineWorker] | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._work = ""

    def __enter__(self) -> _WorkerPool:
        self._work = tempfile.mkdtemp(prefix=".build-", dir=self.ctx.out)
        try:
            torch.save(self.ctx, Path(self._work) / "context.pt")
        except BaseException:  # e.g. a class defined in a function cannot be pickled
            shutil.rmtree(self._work, ignore_errors=True)
            raise
        if self.delay <= 0:
            self._start()
        else:
            self._timer = threading.Timer(self.delay, self._start)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _start(self) -> None:
        with self._lock:
            if self._workers is not None:
                return
            threads = max(1, usable_cpus() // self.processes)
            args = [str(Path(self._work) / "context.pt"), str(threads), ",".join(target_modules()) or "-"]
            self._workers = [
                LineWorker("pqv_lightning.export.build_worker", args, f"build worker {k}")
                for k in range(self.processes)
            ]

    @property
    def started(self) -> bool:
        return self._workers is not None

    def workers(self) -> list[LineWorker]:
        if self._timer is not None:
            self._timer.cancel()
        self._start()
        assert self._workers is not None
        return self._workers

    def close(self) -> None:
        """Stop the timer and kill the workers (a late timer starts none); may be called again."""
        if self._timer is not None:
            self._timer.cancel()
            if self._timer is not threading.current_thread():
                self._timer.join()
        with self._lock:
            for w in self._workers or []:
                w.kill()
            self._workers = self._workers or []

    def __exit__(self, *exc: object) -> None:
        self.close()
        shutil.rmtree(self._work, ignore_errors=True)


class _Sender:
    """Sends the pending files to a pool's workers (:func:`_build_in_workers`) from a thread of its
    own, while this process builds the first file: ``delay`` seconds after it is entered, or when
    :meth:`go` is called, unless :meth:`cancel` came first. Left with an exception, it kills the
    pool's workers so that its thread ends at once."""

    def __init__(self, builder: _Builder, pending: list[int], pool: _WorkerPool, delay: float) -> None:
        self.builder, self.pending, self.pool, self.delay = builder, pending, pool, delay
        self.started = False
        self.error: BaseException | None = None
        self._cancelled = False
        self._go = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pqv-build-sender", daemon=True)

    def __enter__(self) -> _Sender:
        self._thread.start()
        return self

    def _run(self) -> None:
        self._go.wait(max(0.0, self.delay))
        with self._lock:
            if self._cancelled:
                return
            self.started = True
        try:
            _build_in_workers(self.builder, self.pending, self.pool.workers())
        except BaseException as exc:  # noqa: BLE001 - the caller builds the rest here and says why
            self.error = exc

    def go(self) -> None:
        self._go.set()

    def join(self) -> None:
        self._thread.join()

    def cancel(self) -> bool:
        """Cancel it if it has not started sending; False when it has (the files it sent are built)."""
        with self._lock:
            if not self.started:
                self._cancelled = True
        self._go.set()
        return self._cancelled

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.cancel()
            self.pool.close()
        self._thread.join()


class _Builder:
    """The state of :func:`_build_all`: the entries so far (None: not yet built) and the exceptions."""

    def __init__(
        self, ctx: _BuildContext, variants: list[tuple[str, str, str | None]], progress: Progress | None
    ) -> None:
        self.ctx, self.variants, self.progress = ctx, variants, progress
        self.entries: list[dict[str, Any] | None] = [None] * len(variants)
        self.errors: dict[int, BaseException] = {}

    def record(self, i: int, entry: dict[str, Any]) -> None:
        self.entries[i] = entry
        if self.progress is not None:
            self.progress(sum(e is not None for e in self.entries), len(self.variants), entry["file"])

    def stopped(self) -> bool:
        """A file failed and ``on_failure="raise"``: nothing more is built."""
        return self.ctx.config.on_failure == "raise" and any(
            e is not None and e["status"] == "skipped" for e in self.entries
        )

    def build_here(self, i: int) -> None:
        config = self.ctx.config
        try:
            entry = _build_one(
                self.ctx, *self.variants[i], config.threads, raise_on_failure=config.on_failure == "raise"
            )
        except ExportFailedError as exc:
            entry = {**_identity(*self.variants[i]), "status": "skipped", "reason": str(exc).split(": ", 1)[1]}
            self.errors[i] = exc
        self.record(i, entry)

    def run(self) -> dict[str, Any]:
        config = self.ctx.config
        pending = list(range(1, len(self.variants)))
        how: dict[str, Any] = {"processes": 1}
        local = [f for f in config.formats if type(TARGETS[f]).__module__ == "__main__"]
        ahead = _worker_count(config.jobs, len(pending))
        auto = config.jobs == "auto"
        with contextlib.ExitStack() as stack:
            pool, pool_error, sender = None, None, None
            if ahead > 1 and not local:
                try:  # workers start beside the first file ("auto": once it has taken START_WORKERS_AFTER_S)
                    pool = stack.enter_context(_WorkerPool(self.ctx, ahead, START_WORKERS_AFTER_S if auto else 0.0))
                except Exception as exc:  # noqa: BLE001 - said in the manifest if workers were wanted
                    pool_error = exc
                else:  # and take the other files while it builds ("auto": once it is known to be slow)
                    sender = stack.enter_context(_Sender(self, pending, pool, PARALLEL_AFTER_S if auto else 0.0))
            started = time.perf_counter()
            if self.variants:
                self.build_here(0)
            first_s = time.perf_counter() - started
            how["first_file_s"] = round(first_s, 1)
            processes = 1 if self.stopped() else _build_processes(config.jobs, first_s, len(pending))
            if processes > 1 and local:
                how["note"] = f"built in this process: the targets of {local} are defined in __main__"
            elif processes > 1 and pool is None:
                how["note"] = f"built in this process: the build workers failed ({_reason(pool_error)})"
            if sender is not None and pool is not None:
                early = {"workers_started_early": pool.started, "sent_while_first_built": sender.started}
                if processes > 1:
                    sender.go()
                if processes > 1 or not sender.cancel():  # a quick first file: the workers stop unused
                    how.update(early)
                sender.join()
                if sender.started and sender.error is not None:
                    how["note"] = f"built in this process: the build workers failed ({_reason(sender.error)})"
                elif sender.started:
                    how["processes"] = ahead
        for i in pending:
            if self.entries[i] is None:  # not sent to a worker, or its worker died
                if self.stopped():
                    self.entries[i] = {**_identity(*self.variants[i]), "status": "not built"}
                else:
                    self.build_here(i)
        return how


def _reason(exc: BaseException | None) -> str:
    """``Type: first line`` of an exception, for a manifest note."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _identity(fmt: str, precision: str, engine: str | None) -> dict[str, Any]:
    """The first keys of a manifest entry."""
    name = f"model_{precision}" + (f"_{engine}" if engine else "") + TARGETS[fmt].suffix
    return {"file": name, "format": TARGETS[fmt].format, "precision": precision, "engine": engine}


def _build_in_workers(builder: _Builder, pending: list[int], workers: list[LineWorker]) -> None:
    """Build the ``pending`` variants in the started build ``workers``, each given the next file as
    soon as it finished one. Raises when no worker starts; a file whose worker died is left unbuilt
    (the caller builds it here)."""
    variants, record, stopped = builder.variants, builder.record, builder.stopped
    idle = []
    for w in workers:
        try:
            w.reply(timeout=WORKER_START_TIMEOUT_S)  # {"ready": true}
            idle.append(w)
        except WorkerFailed:
            pass
    if not idle:
        raise WorkerFailed(f"no build worker started: {workers[0].last_error()}")
    queue = list(pending)
    busy: dict[LineWorker, int] = {}
    while busy or (queue and idle and not stopped()):
        while idle and queue and not stopped():
            w, i = idle.pop(), queue.pop(0)
            w.send(json.dumps(list(variants[i])))
            busy[w] = i
        for w in wait_readable(list(busy)):
            i = busy.pop(w)
            try:
                record(i, w.reply())
                idle.append(w)
            except WorkerFailed:  # it died (out of memory, a crash in a runtime): built here later
                pass


def _discard_staged(entries: Sequence[dict[str, Any]]) -> None:
    for entry in entries:
        if entry.get("staged"):
            _discard(TARGETS[entry["format"]], entry.pop("staged"))


def _discard(target: ExportTarget, tmp: str) -> None:
    """Remove a staged file and its staged companions."""
    for f in [Path(tmp), *target.companions(tmp)]:
        f.unlink(missing_ok=True)


def _finish_one(
    entry: dict[str, Any], example: torch.Tensor, config: MobileExportConfig, baseline: dict[str, Any], out: Path
) -> dict[str, Any]:
    """Time a built file (in this process, with nothing else building), then give it and its companions
    their final names: the finished manifest entry. A timing failure removes the staged files and
    marks the entry ``skipped``."""
    target = TARGETS[entry["format"]]
    tmp = entry.pop("staged")
    path = out / entry["file"]
    try:
        run = target.load(tmp, example, config.threads)
        with torch.no_grad():
            latency = _latency(run, example, config.warmup, config.repeats)
        del run
    except Exception as exc:  # noqa: BLE001 - reported like a failed export
        _discard(target, tmp)
        for key in [k for k in entry if k not in ("file", "format", "precision", "engine")]:
            del entry[key]
        entry.update(status="skipped", reason=f"time failed: {type(exc).__name__}: {exc}")
        return entry
    except BaseException:
        _discard(target, tmp)
        raise
    for staged_file, final in zip(target.companions(tmp), target.companions(path)):
        os.replace(staged_file, final)
    commit_staged(tmp, path)
    latency["speedup_vs_fp32_eager"] = baseline["median_ms"] / latency["median_ms"]
    checks = entry["verification"]
    ok = checks["top1_agreement"] >= config.min_top1_agreement
    if target.companion_suffixes:
        entry["companions"] = [p.name for p in target.companions(path)]
    entry["status"] = "ok" if ok else "failed"
    entry["reason"] = (
        None
        if ok
        else (
            f"verification failed: top-1 agreement {checks['top1_agreement']:.4f} < min_top1_agreement "
            f"{config.min_top1_agreement}"
        )
    )
    entry["latency"] = latency
    # the manifest's key order of before: ... verification, latency, memory
    entry["memory"] = entry.pop("memory")
    entry["build_seconds"] = entry.pop("build_seconds")
    return entry
