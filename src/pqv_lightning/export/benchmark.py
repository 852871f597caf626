"""Latency of exported artifacts and eager models, each timed in a fresh process, round-robin.

Runtimes that live in one process disturb each other: torch's OpenMP workers, ExecuTorch's
pthreadpool and ONNX Runtime's intra-op pool all keep or spin threads between calls, so whatever
is timed next shares the cores with them. Here every measurement is a fresh process that loads one
candidate, pins its threads, warms up and times ``calls`` calls; the candidates are visited in
turn for ``rounds`` rounds, so a slow phase of a shared machine hits all of them alike. Median,
p90 and min are over all timed calls of a candidate; ratios are against a baseline from the same
rounds.

Candidates are files: ``.pte`` (ExecuTorch), ``.onnx`` (ONNX Runtime), ``.xml`` (OpenVINO IR,
its ``.bin`` beside it), ``.ptl`` (Lite Interpreter; give the quantized engine it was built for) or ``.pt`` (a whole ``nn.Module`` saved
with ``torch.save``, timed eagerly). Since each has its process to itself, ONNX Runtime runs with
its default idle spinning here (about 20 % faster at batch 1 than with spinning off, which is what
the exporter uses while it shares a process with other runtimes).

A format registered outside this package (``@register_target`` in your own module) is timed too:
each worker imports the modules that define the registered targets first (with the parent's
``sys.path``). A target defined in ``__main__`` (a script) cannot be imported by a worker; its
files are refused with an error that says so.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, InputNotFoundError
from ..settings import set_executorch_threads

__all__ = ["Candidate", "known_suffixes", "load_runner", "round_robin", "summarize", "target_modules", "time_calls"]



def known_suffixes() -> tuple[str, ...]:
    """File endings a candidate may have: every registered export target's, and ``.pt``."""
    from .targets import TARGETS

    return (*(t.suffix for t in TARGETS.values()), ".pt")


def __getattr__(attr: str):
    if attr == "SUFFIXES":  # the 0.1 tuple, now a live view of the target registry
        return known_suffixes()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


@dataclass
class Candidate:
    label: str
    path: str
    engine: str | None = None  # torch quantized engine, for .ptl int8 files

    def __post_init__(self) -> None:
        suffixes = known_suffixes()
        if Path(self.path).suffix not in suffixes:
            raise ConfigError(f"{self.path!r}: unsupported file type {Path(self.path).suffix!r}; allowed: {list(suffixes)}")
        if not Path(self.path).is_file():
            raise InputNotFoundError(f"{self.path!r}: no such file")


def load_runner(path: str, shape: Sequence[int], threads: int, engine: str | None = None, *,
                ort_spinning: bool = False):
    """A callable ``x -> logits`` for the file at ``path``.

    ``threads`` sizes ONNX Runtime's session; torch's thread count, its quantized engine (``engine``,
    for ``.ptl`` int8) and ExecuTorch's thread pool are process-wide: set them around the calls
    (:mod:`pqv_lightning.settings`), as the benchmark worker does for its own process.
    """
    from .targets import TARGETS

    suffix = Path(path).suffix
    if suffix == ".pt":
        model = torch.load(path, weights_only=False, map_location="cpu")
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"{path!r} holds a {type(model).__name__}, not a whole nn.Module saved with torch.save")
        return model.eval()
    by_suffix = {t.suffix: t for t in TARGETS.values()}
    if suffix == ".onnx" and by_suffix[suffix].missing() is None:
        from .onnx_target import ort_session

        session = ort_session(path, threads, spinning=ort_spinning)
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.float().contiguous().numpy()})[0])
    if suffix not in by_suffix:
        raise ConfigError(f"{path!r}: unsupported file type {suffix!r}; allowed: {list(known_suffixes())}")
    target = by_suffix[suffix]
    reason = target.missing()
    if reason:
        raise ValueError(reason)
    return target.load(path, torch.zeros(*shape), threads)


@torch.no_grad()
def time_calls(run, x: torch.Tensor, warmup: int, calls: int) -> list[float]:
    """Milliseconds of each of ``calls`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run(x)
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"median_ms": statistics.median(ordered), "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "min_ms": ordered[0], "calls": len(ordered)}


def target_modules() -> list[str]:
    """Modules outside this package that define registered export targets: what a worker imports
    so that it knows their file types (targets defined in ``__main__`` cannot be imported)."""
    from .targets import TARGETS

    modules = {type(t).__module__ for t in TARGETS.values()}
    return sorted(m for m in modules if m != "__main__" and not m.startswith("pqv_lightning."))


def _check_importable(candidates: Sequence[Candidate]) -> None:
    from .targets import TARGETS

    for name, target in TARGETS.items():
        used = [c.label for c in candidates if Path(c.path).suffix == target.suffix]
        if used and type(target).__module__ == "__main__":
            raise RuntimeError(f"export format {name!r} ({used[0]}) is registered in __main__, which a worker process "
                               f"cannot import; define its target in an importable module to time it in fresh processes")


def _time_in_subprocess(candidate: Candidate, shape: Sequence[int], threads: int, warmup: int,
                        calls: int) -> dict[str, Any]:
    args = [sys.executable, "-m", "pqv_lightning.export.benchmark", candidate.path, ",".join(map(str, shape)), str(threads),
            candidate.engine or "-", str(warmup), str(calls), ",".join(target_modules()) or "-"]
    # the parent's sys.path, so that modules it imported from a script's folder import in the worker too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800, check=False, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise RuntimeError(f"timing {candidate.label} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def round_robin(candidates: Sequence[Candidate], shape: Sequence[int], *, threads: int = 2, rounds: int = 5,
                warmup: int = 5, calls: int = 10, baseline: str | None = None, progress=None) -> dict[str, dict]:
    """Time every candidate in a fresh process per round; returns ``{label: stats}``: median, p90,
    min over all calls, peak resident memory of the process and how much loading + running the
    candidate added to it (the largest over the rounds, Linux ``/proc``), and
    ``speedup_vs_baseline`` when ``baseline`` (a label) is given."""
    labels = [c.label for c in candidates]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"candidate labels must be unique: {labels}")
    if baseline is not None and baseline not in labels:
        raise ConfigError(f"baseline={baseline!r} is not one of the candidates {labels}")
    for name, value in (("threads", threads), ("rounds", rounds), ("calls", calls)):
        if value < 1:
            raise ConfigError(f"{name}={value!r} must be >= 1")
    _check_importable(candidates)
    times: dict[str, list[float]] = {c.label: [] for c in candidates}
    memory: dict[str, dict[str, float]] = {c.label: {"peak_rss_mb": 0.0, "load_and_inference_mb": 0.0} for c in candidates}
    for r in range(rounds):
        for c in candidates:
            result = _time_in_subprocess(c, shape, threads, warmup, calls)
            times[c.label] += result["times_ms"]
            for key in memory[c.label]:  # the worst round
                memory[c.label][key] = max(memory[c.label][key], result[key])
            if progress is not None:
                progress(r, c.label)
    stats = {label: {**summarize(t), **memory[label]} for label, t in times.items()}
    if baseline is not None:
        for s in stats.values():
            s["speedup_vs_baseline"] = stats[baseline]["median_ms"] / s["median_ms"]
    return stats


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))


def _main(argv: list[str]) -> None:
    path, shape, threads, engine, warmup, calls, modules = argv
    for module in modules.split(",") if modules != "-" else []:
        importlib.import_module(module)  # registers the user's export targets in this process
    shape = [int(d) for d in shape.split(",")]
    x = torch.randn(*shape)
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
        fh.write("5")
    before = _status_kib("VmRSS:")
    # this process exists to time one file: its settings are set for good
    torch.set_num_threads(int(threads))
    if path.endswith(".pte"):
        set_executorch_threads(int(threads))
    if engine != "-":
        torch.backends.quantized.engine = engine
    run = load_runner(path, shape, int(threads), None if engine == "-" else engine, ort_spinning=True)
    times = time_calls(run, x, int(warmup), int(calls))
    peak = _status_kib("VmHWM:")
    print(json.dumps({"times_ms": times, "peak_rss_mb": peak / 1024, "load_and_inference_mb": (peak - before) / 1024}))


if __name__ == "__main__":
    _main(sys.argv[1:])
