"""Pruning to a latency the target runtime measures, not to MACs.

MACs are a poor proxy for latency (in Torch-Pruning's own ViT-B example, 3.8x fewer MACs gave 1.3x
lower latency), and how latency falls with width depends on the runtime's kernels. A
:class:`LatencyBudget` names a latency (ms, or a fraction of the unpruned model) on one export format
at one precision on this host; :func:`ratio_for_latency` finds the smallest channel ratio whose
exported file meets it: every trial prunes a copy of the model (structure only: with uniform
allocation the widths depend on the ratio alone), writes it with
:func:`~pqv_lightning.export.export_mobile`, and times it against the unpruned model's file
round-robin, each in a process of its own, with the contention guard (:func:`~pqv_lightning.export.
benchmark.round_robin`). The budget is compared with the median of the per-round ratios of the two
files (each round times them one right after the other), so a host that is slower or faster on the day,
or for a few seconds, shifts both. Trials are placed by interpolation
(:func:`~pqv_lightning.pruning.budget.search_ratio`): a few exports and timings.

The smallest model the search may reach (``max_ratio`` of the channels removed) is measured first: a
budget below it is refused, saying what it reaches. That trial anchors the search (the unpruned latency
an absolute budget is divided by, and the global allocation's latency model). Every measurement is
taken again while it looks like a change of the host's speed rather than of the file
(:data:`RETAKE_SPREAD`, :data:`SURPRISE`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checks import check_bool, check_choice, check_int, check_number
from .errors import ConfigError
from .export import MobileExportConfig, export_mobile
from .export.benchmark import Candidate, HostLoad, load_runner, paired_ratio, round_robin, time_calls
from .export.core import runtime_versions
from .export.host import host_description, host_label
from .export.precisions import PRECISIONS
from .export.targets import TARGETS, formats_writing
from .fileio import atomic_write_text
from .pruning import PruningConfig, StructuredPruner, prune_once
from .pruning.allocation import (
    CostTables,
    LinearSite,
    WidthCostModel,
    allocate_widths,
    fisher_diagonal,
    group_levels,
    linear_sites,
    removal_costs,
)
from .pruning.budget import ratio_resolution, search_ratio
from .settings import set_executorch_threads

__all__ = [
    "ALLOCATIONS",
    "LatencyBudget",
    "LatencyProbe",
    "check_global_heads",
    "layer_cost_tables",
    "ratio_for_latency",
    "widths_for_latency",
]

#: ``LatencyBudget.allocation``: how the widths that meet a latency budget are chosen
ALLOCATIONS = {
    "uniform": "every layer keeps the same share of its channels (the smallest ratio that meets the budget)",
    "global": "a width per group, from a per-layer latency table of the target runtime",
}


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
        allocation: ``"uniform"``: every layer keeps the same share of its channels
            (:func:`ratio_for_latency`); ``"global"``: a width per group from a per-layer latency table of
            the target runtime (:func:`widths_for_latency`).
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
    allocation: str = "uniform"

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
                f"{formats_writing(PRECISIONS[self.precision])}"
            )
        for name in ("threads", "rounds", "calls", "max_passes"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("warmup", self.warmup, minimum=0)
        check_number("max_ratio", self.max_ratio, minimum=0, maximum=1, min_open=True, max_open=True)
        if self.max_contention is not None:
            check_number("max_contention", self.max_contention, minimum=0)
        check_bool("strict", self.strict)
        check_choice("allocation", self.allocation, list(ALLOCATIONS))

    def describe(self) -> str:
        amount = f"{self.target:g} ms" if self.target >= 1 else f"{self.target:g} of the unpruned model's latency"
        return f"{amount} on {self.format} {self.precision}, {self.threads} threads"


def _write(model: nn.Module, example: torch.Tensor, budget: LatencyBudget, folder: Path) -> Path:
    """The model's file at the budget's format and precision (verified on the example only: its
    latency is what matters here)."""
    config = MobileExportConfig.files_only(
        folder,
        formats=[budget.format],
        precisions=[budget.precision],
        on_failure="raise",
        threads=budget.threads,
        verify_batches=1,
        calibration_batches=1,
        jobs=1,
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
        """``{"ratio", "ms", "unpruned_ms", "fraction", "fraction_of_medians", "takes", "contention_max"}`` of
        the copy pruned at ``ratio``: ``ms`` / ``unpruned_ms`` are medians of the per-round medians,
        ``fraction`` the median of the per-round ratios (what the latency budgets compare)."""
        return self.measure_structure(f"{ratio:.6f}", self.config.structure_trial(ratio), {"ratio": ratio})

    def measure_structure(
        self, key: str, structure: PruningConfig, row: dict[str, Any], *, expected: float | None = None
    ) -> dict[str, Any]:
        """Like :meth:`measure`, for a copy pruned with ``structure`` (one event, e.g. ``group_widths``),
        kept as ``known[key]``; ``row`` is copied into the result.

        The round-robin is taken :data:`RETAKES` more times, and the rounds of all takes pooled (so one
        take in a slow phase of the host is outvoted), when it looks like a change of the host's speed
        rather than of the file: its per-round ratios, or the unpruned file's per-round medians, differ by
        more than :data:`RETAKE_SPREAD`, or its fraction is more than :data:`SURPRISE` times off
        ``expected`` (a prediction) either way."""
        if key in self.known:
            return self.known[key]
        if self._tmp is None:
            raise RuntimeError("LatencyProbe.measure needs the probe open: use it in a with block")
        folder = Path(self._tmp.name)
        if self._unpruned is None:
            self._unpruned = _write(self.model, self.example, self.budget, folder / "unpruned")
        pruned = copy.deepcopy(self.model)
        prune_once(pruned, structure, example_inputs=self.example)
        path = _write(pruned, self.example, self.budget, folder / f"trial{len(self.known)}")
        takes = [self._time(path)]
        if _unsteady(takes[0], expected):  # two more: the median of the pooled rounds then outvotes one bad take
            takes += [self._time(path) for _ in range(RETAKES)]
        pruned_rounds = [t for take in takes for t in take["pruned"]["round_medians_ms"]]
        unpruned_rounds = [t for take in takes for t in take["unpruned"]["round_medians_ms"]]
        ms, unpruned_ms = statistics.median(pruned_rounds), statistics.median(unpruned_rounds)
        row = {
            "key": key,
            **row,
            "ms": ms,
            "unpruned_ms": unpruned_ms,
            # what the searches compare with the budget: the median of the per-round ratios (each round times
            # both files one right after the other, export.benchmark.paired_ratio). On a 2-core VM whose speed
            # changed 2x for seconds at a time, the ratio of the two overall medians read 1.35 and 1.79 for
            # files whose paired ratio was 0.68 and 0.91 (benchmarks/compress_pareto.py, 2026-12-05)
            "fraction": paired_ratio(pruned_rounds, unpruned_rounds),
            "fraction_of_medians": ms / unpruned_ms,
            "round_ms": pruned_rounds,
            "unpruned_round_ms": unpruned_rounds,
            "takes": len(takes),
            "contention_max": max(
                (s["contention_max"] for take in takes for s in take.values() if s["contention_max"] is not None),
                default=-1.0,
            ),
        }
        self.known[key] = row
        if self.on_trial is not None:
            self.on_trial(row)
        return row

    def _time(self, path: Path) -> dict[str, dict[str, Any]]:
        """One round-robin of the unpruned file and ``path``."""
        budget = self.budget
        return round_robin(
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


#: a probe's round-robin whose per-round ratios, or whose unpruned file's per-round medians, differ by more
#: than this factor (max / min) is taken again: on a 2-core VM whose speed changes 2x for seconds at a time,
#: the reference of one search read 6.06 ms against 3.0-3.3 ms in every other trial of the same run
RETAKE_SPREAD = 1.25
#: a probe's round-robin whose fraction is this many times off the prediction it was given, either way, is
#: taken again: one global allocation predicted at 0.70 of the unpruned latency measured 1.73 in its search,
#: 0.81-0.85 in three later passes (benchmarks/compress_pareto.py, 2026-12-05)
SURPRISE = 1.5
#: retakes of an unsteady probe measurement (each a round-robin of the two files)
RETAKES = 2


def _spread(values: Sequence[float]) -> float:
    return max(values) / min(values) if values and min(values) > 0 else 1.0


def _unsteady(take: dict[str, dict[str, Any]], expected: float | None) -> bool:
    pruned, unpruned = take["pruned"]["round_medians_ms"], take["unpruned"]["round_medians_ms"]
    ratios = [p / u for p, u in zip(pruned, unpruned, strict=True)]
    if _spread(ratios) > RETAKE_SPREAD or _spread(unpruned) > RETAKE_SPREAD:
        return True
    return expected is not None and _spread([statistics.median(ratios), expected]) > SURPRISE  # the paired ratio


def check_global_heads(prune_num_heads: bool, by: str = "the pruning config") -> None:
    """Global allocation sets a width per group (head dims): whole-head pruning (asked for ``by``) is refused."""
    if prune_num_heads:
        raise ConfigError(
            "global allocation sets a width per group (head dims, not head counts), but "
            f"{by} asked for prune_num_heads=True; allowed: prune_num_heads=False, prune_head_dims=True"
        )


#: how far under its budget (a share of the unpruned latency) a global allocation's measured file may land
#: without another pass: one that lands further under was cut narrower than the budget needs, which costs
#: accuracy (on a 2-core VM one search, misled by a slow phase of the host, landed at 0.34 for 0.5)
GLOBAL_UNDERSHOOT = 0.05


def _reference(probe: LatencyProbe, budget: LatencyBudget) -> dict[str, Any]:
    """The trial every search is anchored on: the uniform ``max_ratio`` file against the unpruned one
    (retaken while unsteady, :meth:`LatencyProbe.measure_structure`). Returns ``{"ms", "fraction",
    "unpruned_ms", "budget_fraction", "takes"}``: the unpruned latency is the median of its per-round
    medians, the smallest model's fraction the median of the per-round ratios, and ``ms`` their product
    (so a slow phase of the host shifts both files, not their ratio).

    Raises:
        ConfigError: a budget not below the unpruned model.
    """
    trial = probe.measure(budget.max_ratio)
    unpruned_ms, fraction = float(trial["unpruned_ms"]), float(trial["fraction"])
    budget_fraction = budget.target if budget.target < 1 else budget.target / unpruned_ms
    if budget_fraction >= 1:
        raise ConfigError(
            f"target_latency {budget.describe()} is not below the unpruned model, which measures "
            f"{unpruned_ms:.2f} ms on this host"
        )
    return {
        "ms": fraction * unpruned_ms,
        "fraction": fraction,
        "unpruned_ms": unpruned_ms,
        "budget_fraction": budget_fraction,
        "takes": int(trial.get("takes", 1)),
    }


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
        smallest = _reference(probe, budget)
        unpruned_ms, fraction = smallest["unpruned_ms"], smallest["budget_fraction"]
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
        "reference": smallest,
        "ratio": ratio,
        "predicted_ms": chosen["fraction"] * unpruned_ms,
        "predicted_fraction": chosen["fraction"],
        "trials": known,
    }


# ------------------------------------------------------------------------------ global allocation
#: kept fractions of a layer's prunable widths at which its latency is measured
TABLE_FRACTIONS = (0.1, 0.4, 0.7, 1.0)


def _default_cache() -> Path:
    return Path(os.environ.get("PQV_CACHE_DIR") or Path.home() / ".cache" / "pqv_lightning") / "latency_tables"


def _axis(sites: list[LinearSite], side: str) -> list[float]:
    pruned = any(getattr(s, f"{side}_group") is not None for s in sites)
    return list(TABLE_FRACTIONS) if pruned else [1.0]


def layer_cost_tables(
    sites: list[LinearSite],
    budget: LatencyBudget,
    *,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[CostTables, dict[str, Any]]:
    """The latency (ms) of every Linear layer shape of ``sites`` on the budget's format and precision,
    on a grid of kept input / output fractions (:data:`TABLE_FRACTIONS`; a width no group prunes is
    measured at 1 only), and where it is cached.

    Each grid point is one ``nn.Linear`` written with the budget's exporter; all of them are timed
    one after another in a fresh process per round (``budget.rounds`` rounds, each a median of
    ``budget.calls`` calls after ``budget.warmup``), every timing retaken up to twice while other work
    kept more than ``budget.max_contention`` CPUs busy; a point's latency is the median of its rounds.
    The table is cached per host (CPUID, cache size), format, precision, threads, runtime versions and
    shapes in ``cache_dir`` (default ``$PQV_CACHE_DIR/latency_tables`` or ``~/.cache/pqv_lightning/...``).
    """
    by_shape: dict[tuple[int, int, int], list[LinearSite]] = {}
    for site in sites:
        by_shape.setdefault(site.shape, []).append(site)
    grid = {shape: (_axis(group, "in"), _axis(group, "out")) for shape, group in sorted(by_shape.items())}
    host = host_description()
    identity = {
        "host": host_label(host),
        "format": budget.format,
        "precision": budget.precision,
        "threads": budget.threads,
        "versions": runtime_versions(),
        "grid": {str(k): v for k, v in grid.items()},
        "timing": [budget.rounds, budget.warmup, budget.calls],
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) if cache_dir is not None else _default_cache()
    path = path / f"{budget.format}-{budget.precision}-{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        tables: CostTables = {}
        for k, v in cached["tables"].items():
            tokens, w_in, w_out = json.loads(k)
            tables[tokens, w_in, w_out] = (v[0], v[1], v[2])
        return tables, {"cache": str(path), "cached": True, "seconds": cached.get("seconds")}
    t0 = time.perf_counter()
    points = [(shape, fi, fo) for shape, (ins, outs) in grid.items() for fi in ins for fo in outs]
    with tempfile.TemporaryDirectory(prefix="pqv-latency-table-") as tmp:
        files = []
        for n, (shape, fi, fo) in enumerate(points):
            tokens, w_in, w_out = shape
            width_in, width_out = max(1, round(w_in * fi)), max(1, round(w_out * fo))
            layer = nn.Linear(width_in, width_out)
            example = torch.randn(1, tokens, width_in) if tokens > 1 else torch.randn(1, width_in)
            files.append([str(_write(layer, example, budget, Path(tmp) / f"p{n}")), list(example.shape)])
            if progress is not None:
                progress(n + 1, 2 * len(points), f"latency table: wrote {n + 1}/{len(points)} layers")
        rounds: list[list[float]] = []
        for r in range(budget.rounds):
            order = files[r % len(files) :] + files[: r % len(files)]  # a slow phase hits other points each round
            times = _time_sequentially(order, budget)
            rounds.append(times[len(files) - r % len(files) :] + times[: len(files) - r % len(files)])
            if progress is not None:
                progress(len(points) * (r + 1) // budget.rounds + len(points), 2 * len(points), "latency table: timed")
    medians = [statistics.median(col) for col in zip(*rounds, strict=True)]
    tables = {}
    it = iter(medians)
    for shape, (ins, outs) in grid.items():
        tables[shape] = (ins, outs, [[next(it) for _ in outs] for _ in ins])
    seconds = time.perf_counter() - t0
    payload = {
        "identity": identity,
        "seconds": seconds,
        "tables": {json.dumps(list(k)): list(v) for k, v in tables.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=1))
    return tables, {"cache": str(path), "cached": False, "seconds": seconds}


def _time_sequentially(files: list[list[Any]], budget: LatencyBudget) -> list[float]:
    """Median ms of each file, timed one after another in one fresh process (:func:`_table_worker`)."""
    spec = {
        "files": files,
        "threads": budget.threads,
        "warmup": budget.warmup,
        "calls": budget.calls,
        "max_contention": budget.max_contention,
    }
    done = subprocess.run(
        [sys.executable, "-m", "pqv_lightning.latency_budget"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"latency table worker failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return [float(t) for t in json.loads(done.stdout.strip().splitlines()[-1])]


def _table_worker(spec: dict[str, Any]) -> list[float]:
    """Time each file in turn, one loaded at a time (a runtime never idles beside the one timed)."""
    threads = int(spec["threads"])
    torch.set_num_threads(threads)  # this process exists to time these files: its settings are set for good
    if any(str(path).endswith(".pte") for path, _ in spec["files"]):
        set_executorch_threads(threads)
    out = []
    for path, shape in spec["files"]:
        run = load_runner(path, shape, threads, ort_spinning=True)
        x = torch.randn(*shape)
        for _ in range(3):  # retaken while other work kept the host busy
            host = HostLoad().start()
            times = time_calls(run, x, int(spec["warmup"]), int(spec["calls"]))
            contention = host.contention(threads)
            limit = spec["max_contention"]
            if contention is None or limit is None or contention <= limit:
                break
        out.append(statistics.median(times))
        del run
    return out


def widths_for_latency(
    model: nn.Module,
    budget: LatencyBudget,
    config: PruningConfig | None = None,
    *,
    example_inputs: torch.Tensor,
    trials: dict[str, dict[str, Any]] | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    calibration: Sequence[torch.Tensor] | None = None,
) -> tuple[dict[str, int], dict[str, Any]]:
    """A width per coupled group (``PruningConfig.group_widths``) that meets ``budget`` with the least
    loss of importance (:func:`~pqv_lightning.pruning.allocation.allocate_widths`), and what was measured.

    The latency model: every Linear layer's cost from :func:`layer_cost_tables` (measured on the target
    runtime, cached per host), plus the rest of the network, calibrated on whole-network measurements
    (the unpruned file and the uniform ``max_ratio`` one, :class:`LatencyProbe`). The allocation's file
    is then measured; while it misses the budget (at most ``max_passes`` times), that measurement
    recalibrates the model and the widths are allocated again. The result holds the prediction next to
    the measurement of the final allocation. What a unit's removal costs: its OBD saliency under the
    label-free Fisher of the model on ``calibration`` batches of inputs when given
    (:func:`~pqv_lightning.pruning.allocation.fisher_diagonal`), else its relative weight magnitude
    (:func:`~pqv_lightning.pruning.allocation.removal_costs`). ``model`` is not changed; ``trials`` resume an interrupted
    search (``on_trial`` is told of each new one).

    Raises:
        ConfigError: a budget not below the unpruned model, or below what the narrowest widths allowed
            reach (the message says what they measure / are predicted to reach).
    """
    config = config or PruningConfig()
    check_global_heads(bool(config.prune_num_heads))
    probe = LatencyProbe(model, budget, config, example_inputs=example_inputs, known=trials, on_trial=on_trial)
    example = probe.example
    trial_base = config.structure_trial(0.0)
    shadow = StructuredPruner(copy.deepcopy(model), trial_base, example_inputs=example, measure=False)
    groups = shadow.coupled_groups()
    units = {g.name: g.n_units for g in groups}
    sites = linear_sites(shadow.model, groups, example)
    fisher = fisher_diagonal(shadow.model, calibration) if calibration else None
    costs = removal_costs(groups, fisher)
    levels = {g.name: group_levels(g, shadow.round_to, 1.0 - budget.max_ratio) for g in groups}
    tables, table_info = layer_cost_tables(sites, budget, cache_dir=cache_dir, progress=progress)
    model_cost = WidthCostModel(sites, units, {g.name: g.heads for g in groups}, tables)
    with probe:
        smallest = _reference(probe, budget)
        unpruned_ms, fraction = smallest["unpruned_ms"], smallest["budget_fraction"]
        uniform = copy.deepcopy(model)
        prune_once(uniform, config.structure_trial(budget.max_ratio), example_inputs=example)
        uniform_units = {
            g.name: g.n_units
            for g in StructuredPruner(uniform, trial_base, example_inputs=example, measure=False).coupled_groups()
        }
        # anchored on the reference's paired fraction: a slow phase during its take shifts both files alike
        measured: list[tuple[Mapping[str, int], float]] = [(units, unpruned_ms), (uniform_units, smallest["ms"])]
        model_cost.calibrate(measured)
        target_ms = fraction * unpruned_ms
        passes: list[dict[str, Any]] = []
        refit = False
        for _ in range(budget.max_passes):
            try:
                kept = allocate_widths(levels, costs, model_cost.predict, target_ms)
            except ValueError:
                if not passes:
                    narrowest = {g: v[-1] for g, v in levels.items()}
                    raise ConfigError(
                        f"target_latency {budget.describe()} cannot be met: the narrowest widths allowed "
                        f"({budget.max_ratio:g} of each group's units removed) are predicted at "
                        f"{model_cost.predict(narrowest):.2f} ms, the uniform {budget.max_ratio:g} measures "
                        f"{smallest['ms']:.2f} ms, {smallest['fraction']:.2f} of the unpruned {unpruned_ms:.2f} ms "
                        "on this host"
                    ) from None
                if refit:  # still out of reach: keep what was measured
                    break
                # the line through the last measurement puts the budget out of reach (a slow measurement, or
                # a model that bends): fit every whole-network measurement instead, once
                model_cost.calibrate(measured)
                refit = True
                try:
                    kept = allocate_widths(levels, costs, model_cost.predict, target_ms)
                except ValueError:
                    break
            predicted = model_cost.predict(kept)
            widths = {g: k for g, k in kept.items() if k != units[g]}
            key = "global:" + hashlib.sha256(json.dumps(widths, sort_keys=True).encode()).hexdigest()[:12]
            row = probe.measure_structure(
                key,
                dataclasses.replace(trial_base, pruning_ratio=None, group_widths=widths),
                {"allocation": "global", "predicted_ms": predicted, "group_widths": widths},
                expected=predicted / unpruned_ms,
            )
            passes.append(row)
            measured.append((kept, row["fraction"] * unpruned_ms))
            if fraction - GLOBAL_UNDERSHOOT <= row["fraction"] <= fraction:
                break
            # missed, or far under (narrower than needed: accuracy lost for nothing): recalibrate through the
            # unpruned file and what this allocation measured (as a share of the reference's unpruned
            # latency), so the line is exact next to the budget, and allocate again
            model_cost.calibrate([(units, unpruned_ms), (kept, row["fraction"] * unpruned_ms)])
    under = [r for r in passes if r["fraction"] <= fraction]
    met = bool(under)
    # the widest allocation that met the budget; none met: the fastest measured
    best = max(under, key=lambda r: r["fraction"]) if met else min(passes, key=lambda r: r["fraction"])
    if not met and budget.strict:
        raise ConfigError(f"target_latency {budget.describe()}: not met within max_passes={budget.max_passes}")
    return dict(best["group_widths"]), {
        "budget": dataclasses.asdict(budget),
        "allocation": "global",
        "budget_fraction": fraction,
        "unpruned_ms": unpruned_ms,
        "reference": smallest,
        "met": met,
        "group_widths": best["group_widths"],
        "predicted_ms": best["predicted_ms"],
        "measured_ms": best["fraction"] * unpruned_ms,
        "measured_fraction": best["fraction"],
        "passes": len(passes),
        "costs": "fisher" if fisher is not None else "magnitude",
        "table": table_info,
        "trials": probe.known,
    }


if __name__ == "__main__":
    print(json.dumps(_table_worker(json.loads(sys.stdin.read()))))
