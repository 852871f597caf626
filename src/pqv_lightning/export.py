"""Post-training quantization and TorchScript / Lite Interpreter export, every artifact verified.

:func:`export_mobile` is the Trainer-free entry point (the ``MobileExport`` callback will wrap it):

* works on a deep copy: the model passed in is never converted;
* precisions ``fp32``, ``fp16`` (dynamic fp16 Linear), ``int8-dynamic`` (int8 weights, dynamic
  activations) and ``int8-static`` (weights and activations, calibrated); only Linear layers (and,
  for ``int8-static``, the patch-embedding conv: PyTorch has no dynamic conv kernels) are
  quantized — LayerNorm, softmax, GELU and the residual adds stay float (quantizing the residual
  stream of a ViT destroys its accuracy);
* engines ``x86``, ``fbgemm``, ``qnnpack``, ``onednn`` (PyTorch quantized engines): one artifact
  per engine for int8 precisions, whose kernels depend on it;
* TorchScript (trace), ``torch.jit.freeze``, PyTorch's mobile optimizer where this torch build has
  XNNPACK (stock torch >= 2.13 wheels do not; the manifest records exactly which passes ran), and a
  Lite Interpreter ``.ptl``;
* each ``.ptl`` is reloaded with ``_load_for_lite_interpreter`` and compared with the fp32 eager
  model on the given batches (top-1 agreement, max abs logit error, cosine, accuracy with labels);
* latency of every artifact and of the fp32 eager model, in the same process with fixed threads,
  warm-up and repeats (median, p90, ratio to fp32 eager), and peak memory of inference (a fresh
  process per artifact);
* ``manifest.json`` beside the artifacts; every file is written to a temporary name and renamed,
  so an interruption leaves neither a half-written artifact nor a manifest entry for it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__

__all__ = ["ENGINES", "PRECISIONS", "MobileExportConfig", "check_output_dir", "export_mobile", "host_default_engine"]

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8-dynamic", "int8-static")
ENGINES: tuple[str, ...] = ("x86", "fbgemm", "qnnpack", "onednn")
_ENGINE_DEPENDENT = ("int8-dynamic", "int8-static")


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
        precisions: subset of :data:`PRECISIONS`.
        engines: subset of :data:`ENGINES`; ``None`` = :func:`host_default_engine`.
        output_dir: folder for the ``.ptl`` files and ``manifest.json``.
        overwrite: allow a non-empty ``output_dir`` (its previous artifacts are replaced).
        min_top1_agreement: an artifact whose top-1 agreement with fp32 eager is below this fails.
        on_failure: ``"warn"`` (mark it failed in the manifest) or ``"raise"``.
        threads: torch threads for verification and latency.
        warmup, repeats: latency measurement (batch of ``example_input``).
        verify_batches, calibration_batches: how many batches of the loaders to use.
        measure_memory: peak resident memory of loading + 3 inferences, measured in a fresh
            process per artifact (about 2 s each; an in-process number would include everything
            else the process ever allocated).
    """

    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8-dynamic"])
    engines: list[str] | None = None
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

    def validate(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise ValueError(f"precisions={self.precisions!r}: unknown {bad}; allowed: {list(PRECISIONS)}")
        engines = self.engines or []
        bad = [e for e in engines if e not in ENGINES]
        if bad:
            raise ValueError(f"engines={self.engines!r}: unknown {bad}; allowed: {list(ENGINES)}")
        missing = [e for e in engines if e not in torch.backends.quantized.supported_engines]
        if missing:
            raise ValueError(
                f"engines {missing} are not supported by this torch build; supported: "
                f"{torch.backends.quantized.supported_engines}"
            )
        if self.on_failure not in ("warn", "raise"):
            raise ValueError(f"on_failure={self.on_failure!r}; allowed: 'warn', 'raise'")
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            raise ValueError(f"min_top1_agreement={self.min_top1_agreement!r} must be in [0, 1]")
        for name in ("threads", "repeats", "verify_batches", "calibration_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup!r} must be >= 0")


# ---------------------------------------------------------------------------------------------- quantization
def _quantize(model: nn.Module, precision: str, engine: str, example: torch.Tensor,
              calibration: Sequence[torch.Tensor]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(deprecated|reduce_range).*")  # torch.ao's own notices
        return _quantize_copy(copy.deepcopy(model).eval().float(), precision, engine, example, calibration)


def _quantize_copy(copy_: nn.Module, precision: str, engine: str, example: torch.Tensor,
                   calibration: Sequence[torch.Tensor]) -> nn.Module:
    from torch.ao.quantization import QConfigMapping, float16_dynamic_qconfig, get_default_qconfig, quantize_dynamic

    if precision == "fp32":
        return copy_
    if precision == "fp16":
        return quantize_dynamic(copy_, {nn.Linear: float16_dynamic_qconfig}, dtype=torch.float16)
    if precision == "int8-dynamic":
        return quantize_dynamic(copy_, {nn.Linear}, dtype=torch.qint8)
    if precision == "int8-static":
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        qconfig = get_default_qconfig(engine)
        mapping = QConfigMapping().set_object_type(nn.Linear, qconfig).set_object_type(nn.Conv2d, qconfig)
        prepared = prepare_fx(copy_, mapping, (example,))
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        return convert_fx(prepared)
    raise ValueError(f"precision={precision!r}; allowed: {list(PRECISIONS)}")  # pragma: no cover - validated


def _script(model: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, list[str], list[str]]:
    """Trace, freeze and (where possible) mobile-optimize. Returns (module, applied, skipped)."""
    applied, skipped = ["torch.jit.trace"], []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(model, example, check_trace=False)
        try:
            scripted = torch.jit.freeze(scripted.eval())
            applied.append("torch.jit.freeze (constant folding, dropout removal, conv-bn folding)")
        except Exception as exc:  # pragma: no cover - freeze works for every variant we export
            skipped.append(f"torch.jit.freeze: {type(exc).__name__}: {exc}")
        if torch._C._is_xnnpack_enabled():
            from torch.utils.mobile_optimizer import optimize_for_mobile

            try:
                scripted = optimize_for_mobile(scripted)
                applied.append("torch.utils.mobile_optimizer.optimize_for_mobile")
            except Exception as exc:  # never lose the end of a long fit to the mobile optimizer
                skipped.append(f"optimize_for_mobile: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        else:
            skipped.append("optimize_for_mobile: this torch build has no XNNPACK (torch._C._is_xnnpack_enabled() is False)")
    return scripted, applied, skipped


# ---------------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def _staged(path: Path):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _atomic_write(path: Path, write) -> None:
    with _staged(path) as tmp:
        write(tmp)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(config: MobileExportConfig) -> None:
    """Refuse an output folder that is a file, not writable, or not empty without ``overwrite``.
    Touches nothing, so it can run before a long fit."""
    if not config.output_dir:
        raise ValueError("output_dir is empty; give a folder for the artifacts")
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir={str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise ValueError(f"output_dir={str(out)!r} is not empty; pass overwrite=True to replace its artifacts")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"output_dir={str(out)!r} is not writable")


def _prepare_dir(config: MobileExportConfig) -> Path:
    check_output_dir(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.overwrite:  # replace our own previous artifacts (never other files) so none goes stale
        for old in [*out.glob("model_*.ptl"), out / "manifest.json"]:
            old.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------------------------- checks
@torch.no_grad()
def _verify(run, reference: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, Any]:
    from torchmetrics.functional.classification import multiclass_accuracy

    agree = total = 0
    max_err, cos_sum, correct_logits, labels = 0.0, 0.0, [], []
    for x, y in batches:
        ref, out = reference(x), run(x)
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        total += len(x)
        max_err = max(max_err, float((ref - out).abs().max()))
        cos_sum += float(torch.nn.functional.cosine_similarity(ref, out, dim=-1).sum())
        if y is not None:
            correct_logits.append(out)
            labels.append(y)
    result = {"samples": total, "top1_agreement": agree / total, "max_abs_logit_error": max_err,
              "cosine": cos_sum / total}
    if labels:
        logits = torch.cat(correct_logits)
        result["top1_accuracy"] = float(multiclass_accuracy(logits, torch.cat(labels), num_classes=logits.shape[-1],
                                                            average="micro"))
    return result


_MEMORY_PROBE = """
import sys, torch
torch.set_num_threads(int(sys.argv[3]))
if sys.argv[4] != "-":
    torch.backends.quantized.engine = sys.argv[4]
from torch.jit.mobile import _load_for_lite_interpreter

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))

x = torch.randn(*[int(d) for d in sys.argv[2].split(",")])
with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
    fh.write("5")
before = status("VmRSS:")
model = _load_for_lite_interpreter(sys.argv[1])
with torch.no_grad():
    for _ in range(3):
        model(x)
print(before, status("VmHWM:"))
"""


def _inference_memory(path: str, shape: Sequence[int], threads: int, engine: str | None) -> dict[str, float]:
    """Peak RSS of a fresh process while it loads ``path`` and runs 3 inferences (Linux /proc), and
    how much of it the model added over the process with torch imported."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, path, ",".join(map(str, shape)), str(threads), engine or "-"],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    before, after = (int(v) for v in proc.stdout.split()[-2:])  # KiB
    return {"peak_rss_mb": after / 1024, "load_and_inference_mb": (after - before) / 1024}


@torch.no_grad()
def _latency(run, example: torch.Tensor, warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        run(example)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(example)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * times[min(len(times) - 1, int(0.9 * len(times)))],
            "min_ms": 1e3 * times[0], "repeats": repeats, "warmup": warmup}


def _batches(data: Iterable | None, limit: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    out = []
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


class _Engine:
    """Context manager: select a quantized engine for the duration of a block."""

    def __init__(self, engine: str):
        self.engine, self.previous = engine, None

    def __enter__(self):
        self.previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.engine

    def __exit__(self, *exc):
        torch.backends.quantized.engine = self.previous


# ---------------------------------------------------------------------------------------------- entry point
def export_mobile(
    model: nn.Module,
    example_input: torch.Tensor,
    config: MobileExportConfig | None = None,
    *,
    validation_data: Iterable | None = None,
    calibration_data: Iterable | None = None,
    input_normalization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantize, script and export ``model`` to Lite Interpreter files; verify and time each one.

    ``validation_data`` / ``calibration_data`` yield tensors or ``(x, y)`` pairs (a DataLoader).
    Verification uses ``validation_data`` (``example_input`` when None); ``int8-static`` needs
    ``calibration_data`` (or ``validation_data``). Returns the manifest (also in
    ``output_dir/manifest.json``).

    Example::

        manifest = export_mobile(model, torch.randn(1, 1, 32, 32),
                                 MobileExportConfig(precisions=["fp32", "int8-dynamic"], output_dir="out"),
                                 validation_data=dm.val_dataloader())
    """
    config = config or MobileExportConfig()
    config.validate()
    engines = list(config.engines or [host_default_engine()])
    calibration = _batches(calibration_data if calibration_data is not None else validation_data,
                           config.calibration_batches)
    if "int8-static" in config.precisions and not calibration:
        raise ValueError("precision 'int8-static' needs calibration_data (or validation_data) to calibrate on")
    out = _prepare_dir(config)
    example = example_input.detach().float().cpu()
    verify = _batches(validation_data, config.verify_batches) or [(example, None)]
    reference = copy.deepcopy(model).eval().float().cpu()

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    manifest: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "pqv_lightning": __version__},
        "host": {"machine": platform.machine(), "threads": config.threads,
                 "default_engine": host_default_engine(), "xnnpack": bool(torch._C._is_xnnpack_enabled())},
        "input": {"shape": list(example.shape), "dtype": str(example.dtype), "normalization": input_normalization},
        "artifacts": [],
    }
    manifest_path = out / "manifest.json"
    try:
        with torch.no_grad():
            baseline = _latency(reference, example, config.warmup, config.repeats)
        manifest["baseline_fp32_eager"] = {"latency": baseline}
        for precision in config.precisions:
            for engine in engines if precision in _ENGINE_DEPENDENT else [engines[0]]:
                entry = _export_one(reference, precision, engine, example, calibration, verify, config, out, baseline)
                manifest["artifacts"].append(entry)
                _atomic_write(manifest_path, lambda p: Path(p).write_text(json.dumps(manifest, indent=1)))
                if entry["status"] == "failed" and config.on_failure == "raise":
                    raise RuntimeError(f"{entry['file']}: {entry['reason']}")
    finally:
        torch.set_num_threads(previous_threads)
    _atomic_write(manifest_path, lambda p: Path(p).write_text(json.dumps(manifest, indent=1)))
    return manifest


def _export_one(reference, precision, engine, example, calibration, verify, config, out, baseline) -> dict[str, Any]:
    from torch.jit.mobile import _load_for_lite_interpreter

    name = f"model_{precision}" + (f"_{engine}" if precision in _ENGINE_DEPENDENT else "") + ".ptl"
    path = out / name
    entry: dict[str, Any] = {"file": name, "precision": precision,
                             "engine": engine if precision in _ENGINE_DEPENDENT else None, "format": "ptl"}
    stage = "quantize"
    try:
        with _Engine(engine):
            quantized = _quantize(reference, precision, engine, example, [x for x, _ in calibration])
            stage = "script"
            scripted, applied, skipped = _script(quantized, example)
            # verify and time the staged file; it gets its final name only when all of that succeeded
            stage = "save, reload and verify"
            with _staged(path) as tmp:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    scripted._save_for_lite_interpreter(tmp)
                lite = _load_for_lite_interpreter(tmp)
                checks = _verify(lite, reference, verify)
                latency = _latency(lite, example, config.warmup, config.repeats)
                memory = (_inference_memory(tmp, example.shape, config.threads, entry["engine"])
                          if config.measure_memory else None)
                digest, size = _sha256(Path(tmp)), Path(tmp).stat().st_size
    except Exception as exc:  # an untraceable model, an unsupported op...: skip this variant and say why
        entry.update(status="skipped", reason=f"{stage} failed: {type(exc).__name__}: {exc}")
        warnings.warn(f"MobileExport: {name} skipped: {entry['reason']}", stacklevel=3)
        return entry
    latency["speedup_vs_fp32_eager"] = baseline["median_ms"] / latency["median_ms"]
    ok = checks["top1_agreement"] >= config.min_top1_agreement
    entry.update(
        status="ok" if ok else "failed",
        reason=None if ok else (f"top-1 agreement {checks['top1_agreement']:.4f} < min_top1_agreement "
                                f"{config.min_top1_agreement}"),
        sha256=digest, size_bytes=size, optimizations_applied=applied,
        optimizations_skipped=skipped, verification=checks, latency=latency, memory=memory,
    )
    if not ok:
        warnings.warn(f"MobileExport: {name} failed verification: {entry['reason']}", stacklevel=3)
    return entry
