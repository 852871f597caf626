"""Latency of exported artifacts and eager models, each timed in a fresh process, round-robin.

Runtimes that live in one process disturb each other: torch's OpenMP workers, ExecuTorch's
pthreadpool and ONNX Runtime's intra-op pool all keep or spin threads between calls, so whatever
is timed next shares the cores with them. Here every measurement is a fresh process that loads one
candidate, pins its threads, warms up and times ``calls`` calls; the candidates are visited in
turn for ``rounds`` rounds, so a slow phase of a shared machine hits all of them alike. Median,
p90 and min are over all timed calls of a candidate; ratios are against a baseline from the same
rounds. With ``fresh_processes=False`` each candidate gets one process for all rounds instead
(started and loaded together, timed only once all have loaded, a short pause before each
measurement for the previous one's threads to go to sleep): one start-up and load per candidate
instead of one per round (``MobileExport``'s ranking; ``pqv bench`` keeps fresh processes).

Candidates are files: ``.pte`` (ExecuTorch), ``.onnx`` (ONNX Runtime), ``.xml`` (OpenVINO IR,
its ``.bin`` beside it), ``.ptl`` (Lite Interpreter; give the quantized engine it was built for) or ``.pt`` (a whole ``nn.Module`` saved
with ``torch.save``, timed eagerly). Since each has its process to itself, ONNX Runtime runs with
its default idle spinning here (about 20 % faster at batch 1 than with spinning off, which is what
the exporter uses while it shares a process with other runtimes).

A busy host shows up as slow calls of whatever ran at the time. Each worker therefore also
measures, from Linux's ``/proc/stat`` and its own CPU time, how many CPUs other processes (and the
hypervisor's steal time) kept busy from its first warm-up call to its last timed call (padded
with untimed calls to at least :data:`MIN_LOAD_WINDOW_S`, which the kernel's 10 ms ticks can
resolve), beyond those its ``threads`` leave free: its ``contention`` in CPUs. A measurement whose contention exceeds
``max_contention`` (default 0.2 of a CPU) is thrown away and taken again, up to ``retries`` times;
the stats record the worst contention kept and how many measurements were retaken, and a warning
names a candidate still measured on a busy host. Elsewhere than Linux the contention is unknown
(``None``) and nothing is retaken. What the guest cannot see — other tenants' memory traffic on a
shared host — it cannot catch either.

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
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, InputNotFoundError
from ..hostcpu import usable_cpus
from ..settings import set_executorch_threads
from ..workers import LineWorker, WorkerFailed

__all__ = [
    "Candidate",
    "HostLoad",
    "known_suffixes",
    "load_runner",
    "round_robin",
    "summarize",
    "target_modules",
    "time_calls",
]


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
            raise ConfigError(
                f"{self.path!r}: unsupported file type {Path(self.path).suffix!r}; allowed: {list(suffixes)}"
            )
        if not Path(self.path).is_file():
            raise InputNotFoundError(f"{self.path!r}: no such file")


def load_runner(
    path: str, shape: Sequence[int], threads: int, engine: str | None = None, *, ort_spinning: bool = False
):
    """A callable ``x -> logits`` for the file at ``path``.

    ``threads`` sizes ONNX Runtime's session; torch's thread count, its quantized engine (``engine``,
    for ``.ptl`` int8) and ExecuTorch's thread pool are process-wide: set them around the calls
    (:mod:`pqv_lightning.settings`), as the benchmark worker does for its own process.
    """

    suffix = Path(path).suffix
    if suffix == ".pt":
        model = torch.load(path, weights_only=False, map_location="cpu")
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"{path!r} holds a {type(model).__name__}, not a whole nn.Module saved with torch.save")
        return model.eval()
    target = _target_for(path)
    if suffix == ".onnx" and target is not None and target.missing() is None:
        from .onnx_target import ort_session

        session = ort_session(path, threads, spinning=ort_spinning)
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.float().contiguous().numpy()})[0])
    if target is None:
        raise ConfigError(f"{path!r}: unsupported file type {suffix!r}; allowed: {list(known_suffixes())}")
    reason = target.missing()
    if reason:
        raise ValueError(reason)
    return target.load(path, torch.zeros(*shape), threads)


@torch.no_grad()
def time_calls(run, x: Any, warmup: int, calls: int) -> list[float]:
    """Milliseconds of each of ``calls`` calls of ``run(x)`` after ``warmup`` untimed ones."""
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
    return {
        "median_ms": statistics.median(ordered),
        "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "min_ms": ordered[0],
        "calls": len(ordered),
    }


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
            raise RuntimeError(
                f"export format {name!r} ({used[0]}) is registered in __main__, which a worker process "
                f"cannot import; define its target in an importable module to time it in fresh processes"
            )


#: seconds a timing worker may stay silent (loading a large file, then its calls) before it is killed
WORKER_TIMEOUT_S = 1800.0


class _Worker:
    """A process that loads one candidate and times it on request (``python -m
    pqv_lightning.export.benchmark``): it answers each line ``calls`` written to its stdin with one
    JSON line of times, memory and contention, until its stdin closes."""

    def __init__(self, candidate: Candidate, shape: Sequence[int], threads: int, warmup: int) -> None:
        self.label = candidate.label
        args = [
            candidate.path,
            ",".join(map(str, shape)),
            str(threads),
            candidate.engine or "-",
            str(warmup),
            ",".join(target_modules()) or "-",
        ]
        self._worker = LineWorker("pqv_lightning.export.benchmark", args, f"timing {self.label}")
        self._ready = False

    def wait_ready(self) -> None:
        """Block until the worker has loaded its file (it answers nothing before)."""
        if not self._ready:
            self._reply(None)
            self._ready = True

    def time(self, calls: int) -> dict[str, Any]:
        """``calls`` timed calls (after the worker's warm-up calls): ``times_ms``, ``peak_rss_mb``,
        ``load_and_inference_mb`` and ``contention``."""
        self.wait_ready()
        return self._reply(calls)

    def _reply(self, calls: int | None) -> dict[str, Any]:
        if calls is not None:
            self._worker.send(str(calls))
        try:
            return self._worker.reply(timeout=WORKER_TIMEOUT_S)
        except WorkerFailed as exc:
            raise RuntimeError(str(exc)) from None

    def close(self) -> None:
        self._worker.close()


def _time_in_subprocess(
    candidate: Candidate, shape: Sequence[int], threads: int, warmup: int, calls: int
) -> dict[str, Any]:
    """One measurement in a fresh process that exits afterwards."""
    worker = _Worker(candidate, shape, threads, warmup)
    try:
        return worker.time(calls)
    finally:
        worker.close()


#: seconds the parent waits before each measurement of kept workers: the threads of the worker timed
#: just before (OpenMP, ONNX Runtime) spin a little while after their last call before they sleep
SETTLE_SECONDS = 0.25


def round_robin(
    candidates: Sequence[Candidate],
    shape: Sequence[int],
    *,
    threads: int = 2,
    rounds: int = 5,
    warmup: int = 5,
    calls: int = 10,
    baseline: str | None = None,
    progress=None,
    max_contention: float | None = 0.2,
    retries: int = 2,
    fresh_processes: bool = True,
) -> dict[str, dict]:
    """Time every candidate in a fresh process per round (``fresh_processes=False``: in one process per
    candidate, started once, loaded once and kept for all rounds: one start-up and load per candidate
    instead of one per round, still never two candidates in one process); returns ``{label: stats}``: median, p90,
    min over all calls, peak resident memory of the process and how much loading + running the
    candidate added to it (the largest over the rounds, Linux ``/proc``), ``speedup_vs_baseline``
    when ``baseline`` (a label) is given, and the host's load while it ran: ``contention_max`` (the
    worst of its kept measurements, in CPUs other work took from this one; ``None`` where unknown)
    and ``retaken`` (measurements thrown away for ``contention > max_contention`` and taken again,
    at most ``retries`` per round; ``max_contention=None`` keeps every measurement)."""
    labels = [c.label for c in candidates]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"candidate labels must be unique: {labels}")
    if baseline is not None and baseline not in labels:
        raise ConfigError(f"baseline={baseline!r} is not one of the candidates {labels}")
    for name, value in (("threads", threads), ("rounds", rounds), ("calls", calls)):
        if value < 1:
            raise ConfigError(f"{name}={value!r} must be >= 1")
    if retries < 0:
        raise ConfigError(f"retries={retries!r} must be >= 0")
    if max_contention is not None and not max_contention >= 0:
        raise ConfigError(
            f"max_contention={max_contention!r}: allowed are None (keep every measurement) or a number of CPUs >= 0"
        )
    if threads > (usable := usable_cpus()):
        warnings.warn(
            f"threads={threads}, but this process may run on {usable} CPU(s) (its affinity mask: taskset, a "
            f"container's cpuset): each runtime's threads will share them, which slows some far more than "
            f"others (ONNX Runtime's int8 DeiT-base 3.5x, the fp32 eager model 1.9x); pass threads<={usable} "
            "to time what this host can run",
            stacklevel=2,
        )
    _check_importable(candidates)
    times: dict[str, list[float]] = {c.label: [] for c in candidates}
    memory: dict[str, dict[str, float]] = {
        c.label: {"peak_rss_mb": 0.0, "load_and_inference_mb": 0.0} for c in candidates
    }
    load: dict[str, dict[str, Any]] = {c.label: {"contention_max": None, "retaken": 0} for c in candidates}
    per_round: dict[str, list[float]] = {c.label: [] for c in candidates}  # each round's median
    kept: dict[str, _Worker] = {}

    def measure(c: Candidate) -> dict[str, Any]:
        if not fresh_processes:
            time.sleep(SETTLE_SECONDS)
            return kept[c.label].time(calls)
        return _time_in_subprocess(c, shape, threads, warmup, calls)

    try:
        if not fresh_processes:  # all start and load at once; the timing starts when every one has loaded
            for c in candidates:
                kept[c.label] = _Worker(c, shape, threads, warmup)
            for worker in kept.values():
                worker.wait_ready()
        for r in range(rounds):
            for c in candidates:
                result = measure(c)
                for _ in range(retries):
                    if not _too_busy(result.get("contention"), max_contention):
                        break
                    load[c.label]["retaken"] += 1
                    result = measure(c)
                if _too_busy(result.get("contention"), max_contention):
                    warnings.warn(
                        f"{c.label}: timed while other work kept {result['contention']:.2f} CPUs busy "
                        f"(max_contention={max_contention}), after {retries} retries; its latency may be high",
                        stacklevel=2,
                    )
                times[c.label] += result["times_ms"]
                per_round[c.label].append(statistics.median(result["times_ms"]))
                for key in memory[c.label]:  # the worst round
                    memory[c.label][key] = max(memory[c.label][key], result[key])
                if result.get("contention") is not None:
                    worst = load[c.label]["contention_max"]
                    load[c.label]["contention_max"] = max(result["contention"], worst or 0.0)
                if progress is not None:
                    progress(r, c.label)
    finally:
        for worker in kept.values():
            worker.close()
    stats = {
        label: {**summarize(t), **memory[label], **load[label], "round_medians_ms": per_round[label]}
        for label, t in times.items()
    }
    if baseline is not None:
        for label, s in stats.items():
            s["speedup_vs_baseline"] = stats[baseline]["median_ms"] / s["median_ms"]
            s["speedup_vs_baseline_paired"] = paired_ratio(per_round[baseline], per_round[label])
    return stats


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median over rounds of ``numerators[r] / denominators[r]``: two candidates measured one right
    after the other in each round share the host's state of that moment (on a shared VM its speed can
    change by 2x for seconds at a time), so their per-round ratio is steadier than the ratio of their
    overall medians, whose calls may come from different phases."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(
            f"paired_ratio needs as many rounds on each side, got {len(numerators)} and {len(denominators)}"
        )
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def _too_busy(contention: float | None, limit: float | None) -> bool:
    return contention is not None and limit is not None and contention > limit


def busy_seconds(cpu_line: str, ticks_per_second: int) -> float:
    """CPU seconds a ``/proc/stat`` ``cpu`` line counts as busy: user, nice, system, irq, softirq and the
    hypervisor's steal (everything but idle and iowait).

    Raises:
        ValueError: not a ``cpu`` line with at least 8 counters.
    """
    fields = cpu_line.split()
    if not fields or not fields[0].startswith("cpu") or len(fields) < 9:
        raise ValueError(f"not a /proc/stat cpu line: {cpu_line!r}")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / ticks_per_second


@dataclass
class HostLoad:
    """CPU seconds the whole host (``/proc/stat``) and this process (``getrusage``) used since
    :meth:`start`; :meth:`contention` is how many CPUs other work, the hypervisor's steal time
    included, kept busy meanwhile beyond those ``threads`` of this process leave free.

    >>> load = HostLoad().start()
    >>> _ = sum(i * i for i in range(10**6))  # this process's own work is not contention
    >>> c = load.contention(threads=os.cpu_count(), min_window_s=0.0)
    >>> c is None or c >= 0
    True
    """

    host_busy_s: float | None = None
    own_s: float = 0.0
    wall_s: float = 0.0

    @staticmethod
    def _host() -> float | None:
        try:
            with open("/proc/stat") as fh:
                return busy_seconds(fh.readline(), os.sysconf("SC_CLK_TCK"))
        except (OSError, ValueError):
            return None

    @staticmethod
    def _own() -> float:
        try:
            import resource
        except ImportError:  # not Unix: no /proc/stat either, so contention() is None anyway
            return 0.0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self) -> HostLoad:
        self.host_busy_s, self.own_s, self.wall_s = self._host(), self._own(), time.perf_counter()
        return self

    def contention(self, threads: int, min_window_s: float = 0.2) -> float | None:
        """``None`` where ``/proc/stat`` is missing or the window is shorter than ``min_window_s``: the
        kernel counts CPU time in ticks (10 ms), too coarse for a shorter one."""
        host = self._host()
        wall = time.perf_counter() - self.wall_s
        if host is None or self.host_busy_s is None or wall < min_window_s:
            return None
        others = max(0.0, (host - self.host_busy_s) - (self._own() - self.own_s)) / max(wall, 1e-9)
        # CPUs this process never asked for, or may not run on (its affinity mask)
        spare = max(0, (os.cpu_count() or 1) - min(threads, usable_cpus()))
        return max(0.0, others - spare)


def _target_for(path: str):
    """The registered export target that writes files like ``path`` (by suffix), or None."""
    from .targets import TARGETS

    return next((t for t in TARGETS.values() if t.suffix == Path(path).suffix), None)


def _start_runtime(path: str) -> None:
    """Import and start the runtime that loads ``path`` (nothing for a whole ``.pt`` module)."""
    target = _target_for(path)
    if target is not None and target.missing() is None:
        target.start_runtime()


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))


#: the shortest window a worker measures the host's load over (the kernel counts CPU time in 10 ms
#: ticks): the timed calls of a fast file are padded with untimed ones up to it
MIN_LOAD_WINDOW_S = 0.25


def _main(argv: list[str]) -> None:
    """The worker: load one file, then answer each stdin line ``calls`` with one JSON line."""
    path, shape_arg, threads, engine, warmup, modules = argv
    for module in modules.split(",") if modules != "-" else []:
        importlib.import_module(module)  # registers the user's export targets in this process
    shape = [int(d) for d in shape_arg.split(",")]
    x = torch.randn(*shape)
    # this process exists to time one file: its settings are set for good
    torch.set_num_threads(int(threads))
    if path.endswith(".pte"):
        set_executorch_threads(int(threads))
    if engine != "-":
        torch.backends.quantized.engine = engine
    _start_runtime(path)
    # the memory from here on is the file's own (loading + inference), as a build's memory probe measures it
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
        fh.write("5")
    before = _status_kib("VmRSS:")
    run = load_runner(path, shape, int(threads), None if engine == "-" else engine, ort_spinning=True)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        host = HostLoad().start()  # the window: warm-up, timed calls and padding of this request
        times = time_calls(run, x, int(warmup), int(line))
        while time.perf_counter() - host.wall_s < MIN_LOAD_WINDOW_S:
            run(x)
        contention = host.contention(int(threads))
        peak = _status_kib("VmHWM:")
        reply = {
            "times_ms": times,
            "peak_rss_mb": peak / 1024,
            "load_and_inference_mb": (peak - before) / 1024,
            "contention": contention,
        }
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
