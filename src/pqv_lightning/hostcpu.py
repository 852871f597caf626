"""What this CPU can do: its ``/proc/cpuinfo`` entries and instruction-set features, read once.

The library asks these questions where the answer changes what is fast (a bf16 teacher is 1.1x the
fp32 cost on a CPU with bf16 instructions and 3-4x on one without; ONNX Runtime's int8 kernels need
VNNI or AMX to keep full precision), and every benchmark writes them next to its numbers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "BF16_FEATURES",
    "INT8_DOT_FEATURES",
    "cpu_features",
    "cpu_info",
    "cpu_mhz",
    "cpu_times",
    "has_any_feature",
    "steal_fraction",
    "threads_per_core",
    "usable_cpus",
]

#: CPU features with native bf16 arithmetic (x86 AVX-512 BF16 / AMX, Arm's BF16 extension).
BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")
#: CPU features with int8 dot-product instructions (x86 VNNI / AMX, Arm's dot product).
INT8_DOT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")


@functools.cache
def cpu_info(path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's entries of ``path`` (Linux's ``/proc/cpuinfo``; an empty dict where there
    is no such file). Read once per path: the answer does not change while the process runs."""
    info: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip(), value.strip())
    return info


def cpu_features(info: dict[str, str] | None = None) -> frozenset[str]:
    """The instruction-set features of ``info`` (default: this CPU's): x86 ``flags`` or Arm ``Features``."""
    info = cpu_info() if info is None else info
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def has_any_feature(wanted: Iterable[str], info: dict[str, str] | None = None) -> bool:
    """Whether the CPU of ``info`` (default: this one) has any of the ``wanted`` features."""
    return not cpu_features(info).isdisjoint(wanted)


def threads_per_core(info: dict[str, str] | None = None) -> int | None:
    """How many logical CPUs share one core in ``info`` (default: this CPU's ``/proc/cpuinfo``):
    ``siblings`` / ``cpu cores``. A VM with 2 logical CPUs that are the two hyperthreads of one core
    runs a 2-thread GEMM at about the speed of one thread; None where the entries are missing."""
    info = cpu_info() if info is None else info
    try:
        siblings, cores = int(info["siblings"]), int(info["cpu cores"])
    except (KeyError, ValueError):
        return None
    return siblings // cores if cores > 0 and siblings >= cores else None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, a container's cpuset), not the
    machine's count. A runtime told to use more threads than this time-slices them on fewer CPUs:
    DeiT-base's ONNX Runtime int8 files ran 3.5x slower with 2 threads on 1 CPU than on 2, XNNPACK's
    2.1x, the fp32 eager model 1.9x (``benchmarks/host_conditions.py``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


#: the fields of ``/proc/stat``'s ``cpu`` line, in order (Linux ``proc(5)``)
_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")


def cpu_times(path: str | Path = "/proc/stat") -> dict[str, int] | None:
    """The host's CPU time so far, in clock ticks, by kind (``user`` ... ``steal``) from the ``cpu`` line
    of ``path``; None where there is no such file (not Linux)."""
    try:
        with open(path) as fh:
            line = fh.readline()
    except OSError:
        return None
    parts = line.split()
    if not parts or parts[0] != "cpu":
        return None
    return {name: int(v) for name, v in zip(_STAT_FIELDS, parts[1:])}


def steal_fraction(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
    """The share of CPU time the hypervisor gave to other guests between two :func:`cpu_times`
    readings ("steal": a busy cloud host makes every measurement on a VM slower); None when unknown."""
    if before is None or after is None:
        return None
    # guest time is also counted in user / nice: leave it out of the total
    fields = [f for f in _STAT_FIELDS if f not in ("guest", "guest_nice")]
    total = sum(after.get(f, 0) - before.get(f, 0) for f in fields)
    return (after.get("steal", 0) - before.get("steal", 0)) / total if total > 0 else None


def cpu_mhz(path: str | Path = "/proc/cpuinfo") -> float | None:
    """The mean current clock of the CPUs in ``path`` (its ``cpu MHz`` lines, read now: it changes with
    load and turbo); None where they are missing."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    values = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "cpu MHz":
            try:
                values.append(float(value))
            except ValueError:
                continue
    return sum(values) / len(values) if values else None
