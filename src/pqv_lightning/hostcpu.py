"""What this CPU can do: its ``/proc/cpuinfo`` entries and instruction-set features, read once.

The library asks these questions where the answer changes what is fast (a bf16 teacher is 1.1x the
fp32 cost on a CPU with bf16 instructions and 3-4x on one without; ONNX Runtime's int8 kernels need
VNNI or AMX to keep full precision), and every benchmark writes them next to its numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

__all__ = ["BF16_FEATURES", "INT8_DOT_FEATURES", "cpu_features", "cpu_info", "has_any_feature"]

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
