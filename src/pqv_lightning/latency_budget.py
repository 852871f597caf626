"""Pruning to a latency the target runtime measures, not to MACs.

MACs are a poor proxy for latency (in Torch-Pruning's own ViT-B example, 3.8x fewer MACs gave 1.3x
lower latency), and how latency falls with width depends on the runtime's kernels. A
:class:`LatencyBudget` names a latency (ms, or a fraction of the unpruned model) on one export format
at one precision on this host; :func:`ratio_for_latency` finds the smallest channel ratio whose
exported file meets it: every trial prunes a copy of the model (structure only: with uniform
allocation the widths depend on the ratio alone), writes it with
:func:`~pqv_lightning.export.export_mobile`, and times it against the unpruned model's file
round-robin, each in a process of its own, with the contention guard (:func:`~pqv_lightning.export.
benchmark.round_robin`). The budget is compared with the ratio of the two medians, so a host that is
slower or faster on the day shifts both. Trials are placed by interpolation
(:func:`~pqv_lightning.pruning.budget.search_ratio`): a few exports and timings.

The smallest model the search may reach (``max_ratio`` of the channels removed) is measured first: a
budget below it is refused, saying what it reaches.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checks import check_bool, check_choice, check_int, check_number
from .errors import ConfigError
from .export import MobileExportConfig, export_mobile
from .export.benchmark import Candidate, round_robin
from .export.precisions import PRECISIONS
from .export.targets import TARGETS
from .pruning import PruningConfig, prune_once
from .pruning.budget import ratio_resolution, search_ratio

__all__ = ["LatencyBudget", "LatencyProbe", "ratio_for_latency"]


@dataclass
class LatencyBudget:
    """A latency budget on one export target, measured on this host.

    Args:
        target: milliseconds per batch-1 call, or, below 1, a fraction of the unpruned model's latency
            on the same target (``0.5``: twice as fast). A budget under 1 ms is given as a fraction.
        format: the export format it is measured on (a name in ``TARGETS``: ``onnx``, ``openvino``, ``pte``...).
        precision: the precision of that file (a name in ``PRECISIONS`` the format supports).
        threads: threads of the timed runtime.
        rounds, warmup, calls: the round-robin of every trial (unpruned file vs pruned file).
        max_passes: trials of the search after the smallest model's (each an export and a timing).
        max_ratio: the largest channel ratio the search may use, in ``(0, 1)``.
        max_contention: retake a timing during which other work kept more than this many CPUs busy
            (``None``: keep every timing).
        strict: a budget the search cannot meet within ``max_passes`` is an error (else the closest
            ratio below it is used and the report says so).
    """

    target: float
    format: str = "onnx"
    precision: str = "fp32"
    threads: int = 2
    rounds: int = 3
    warmup: int = 5
    calls: int = 20
    max_passes: int = 6
    max_ratio: float = 0.9
    max_contention: float | None = 0.2
    strict: bool = False

    def validate(self) -> None:
        check_number("target", self.target, minimum=0, min_open=True)
        check_choice("format", self.format, TARGETS.names())
        reason = TARGETS[self.format].missing()
        if reason:
            raise ConfigError(reason)
        check_choice("precision", self.precision, PRECISIONS.names())
        if not TARGETS[self.format].supports(PRECISIONS[self.precision]):
            raise ConfigError(
                f"LatencyBudget: format {self.format!r} cannot write precision {self.precision!r}; formats that can: "
                f"{[f for f in TARGETS.names() if TARGETS[f].supports(PRECISIONS[self.precision])]}"
            )
        for name in ("threads", "rounds", "calls", "max_passes"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("warmup", self.warmup, minimum=0)
        check_number("max_ratio", self.max_ratio, minimum=0, maximum=1, min_open=True, max_open=True)
        if self.max_contention is not None:
            check_number("max_contention", self.max_contention, minimum=0)
        check_bool("strict", self.strict)

    def describe(self) -> str:
        amount = f"{self.target:g} ms" if self.target >= 1 else f"{self.target:g} of the unpruned model's latency"
        return f"{amount} on {self.format} {self.precision}, {self.threads} threads"


def _write(model: nn.Module, example: torch.Tensor, budget: LatencyBudget, folder: Path) -> Path:
    """The model's file at the budget's format and precision (verified on the example only: its
    latency is what matters here)."""
    config = MobileExportConfig(
        formats=[budget.format],
        precisions=[budget.precision],
        output_dir=str(folder),
        overwrite=True,
        on_failure="raise",
        threads=budget.threads,
        warmup=0,
        repeats=1,
        verify_batches=1,
        calibration_batches=1,
        measure_memory=False,
        jobs=1,
        rank="none",
        min_top1_agreement=0.0,
    )
    manifest = export_mobile(model, example, config, calibration_data=[example])
    return folder / manifest["artifacts"][0]["file"]


class LatencyProbe:
    """Measures pruned copies of ``model`` against the unpruned model's own file, as a context manager
    (the files live in a temporary folder until it closes): :meth:`measure` prunes a copy at a channel
    ratio (``config.structure_trial``), writes it at the budget's format and precision, and times both
    files round-robin with the budget's settings, each measurement in a fresh process. Results are kept
    by ratio (``known``)."""

    def __init__(
        self,
        model: nn.Module,
        budget: LatencyBudget,
        config: PruningConfig | None = None,
        *,
        example_inputs: torch.Tensor,
        known: dict[str, dict[str, float]] | None = None,
        on_trial: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        budget.validate()
        self.model, self.budget, self.config = model, budget, config or PruningConfig()
        self.example = example_inputs[:1].detach().float()
        self.known: dict[str, dict[str, float]] = dict(known or {})
        self.on_trial = on_trial
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._unpruned: Path | None = None

    def __enter__(self) -> LatencyProbe:
        self._tmp = tempfile.TemporaryDirectory(prefix="pqv-latency-")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
        self._tmp = self._unpruned = None

    def measure(self, ratio: float) -> dict[str, float]:
        """``{"ratio", "ms", "unpruned_ms", "fraction", "contention_max"}`` of the copy pruned at ``ratio``."""
        key = f"{ratio:.6f}"
        if key in self.known:
            return self.known[key]
        if self._tmp is None:
            raise RuntimeError("LatencyProbe.measure needs the probe open: use it in a with block")
        folder, budget = Path(self._tmp.name), self.budget
        if self._unpruned is None:
            self._unpruned = _write(self.model, self.example, budget, folder / "unpruned")
        pruned = copy.deepcopy(self.model)
        prune_once(pruned, self.config.structure_trial(ratio), example_inputs=self.example)
        path = _write(pruned, self.example, budget, folder / f"trial{len(self.known)}")
        stats = round_robin(
            [Candidate("unpruned", str(self._unpruned)), Candidate("pruned", str(path))],
            list(self.example.shape),
            threads=budget.threads,
            rounds=budget.rounds,
            warmup=budget.warmup,
            calls=budget.calls,
            max_contention=budget.max_contention,
            # a process per measurement, one alive at a time: with both kept alive, the idle runtime's
            # threads took CPU from the timed one on 2 cores (the ratio at 25 % channels read 0.66 and 0.88
            # in two probes; fresh processes: 0.707 and 0.715)
            fresh_processes=True,
        )
        row = {
            "ratio": ratio,
            "ms": stats["pruned"]["median_ms"],
            "unpruned_ms": stats["unpruned"]["median_ms"],
            "fraction": stats["pruned"]["median_ms"] / stats["unpruned"]["median_ms"],
            "contention_max": max(
                (s["contention_max"] for s in stats.values() if s["contention_max"] is not None), default=-1.0
            ),
        }
        self.known[key] = row
        if self.on_trial is not None:
            self.on_trial(row)
        return row


def ratio_for_latency(
    model: nn.Module,
    budget: LatencyBudget,
    config: PruningConfig | None = None,
    *,
    example_inputs: torch.Tensor,
    trials: dict[str, dict[str, float]] | None = None,
    on_trial: Callable[[dict[str, float]], None] | None = None,
) -> tuple[float, dict[str, Any]]:
    """The smallest channel ratio at which ``model`` pruned with ``config`` (its ``round_to``, head
    rule and ignored layers; uniform allocation) meets ``budget``, and what the search measured
    (:class:`LatencyProbe` trials).

    ``model`` is not changed. ``trials`` (ratio -> measurement, from an earlier call's result) are reused
    instead of measured again, so an interrupted search resumes; ``on_trial`` is told of each new one.

    Raises:
        ConfigError: a budget not below the unpruned model, or below what the smallest allowed model
            measures (the message says what it measures).
    """
    probe = LatencyProbe(model, budget, config, example_inputs=example_inputs, known=trials, on_trial=on_trial)
    known = probe.known
    with probe:
        measure = probe.measure
        smallest = measure(budget.max_ratio)
        unpruned_ms = smallest["unpruned_ms"]
        fraction = budget.target if budget.target < 1 else budget.target / unpruned_ms
        if fraction >= 1:
            raise ConfigError(
                f"target_latency {budget.describe()} is not below the unpruned model, which measures "
                f"{unpruned_ms:.2f} ms on this host"
            )
        if smallest["fraction"] > fraction:
            raise ConfigError(
                f"target_latency {budget.describe()} cannot be met: the smallest model allowed ({budget.max_ratio:g} "
                f"of the channels removed) measures {smallest['ms']:.2f} ms, {smallest['fraction']:.2f} of the "
                f"unpruned {unpruned_ms:.2f} ms on this host"
            )
        ratio, _ = search_ratio(
            lambda r: measure(r)["fraction"],
            fraction,
            0.0,
            1.0,
            ratio_resolution(model),
            top=budget.max_ratio,
            max_passes=budget.max_passes,
        )
    met = ratio is not None
    if ratio is None:  # noisy timings: the smallest ratio any trial met the budget at
        passing = [t["ratio"] for t in known.values() if t["fraction"] <= fraction]
        ratio = min(passing)
    if not met and budget.strict:
        raise ConfigError(f"target_latency {budget.describe()}: not met within max_passes={budget.max_passes}")
    chosen = known[f"{ratio:.6f}"]
    return ratio, {
        "budget": dataclasses.asdict(budget),
        "budget_fraction": fraction,
        "unpruned_ms": unpruned_ms,
        "ratio": ratio,
        "predicted_ms": chosen["ms"],
        "predicted_fraction": chosen["fraction"],
        "trials": known,
    }
