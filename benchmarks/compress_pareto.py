"""Accuracy vs measured latency after compression: issue 31's Pareto report, every point from one host.

Each point is a pruning structure of the bundled Fashion-MNIST ViT:

* ``uniform``: the channel ratios ``--ratios`` (every group keeps the same share);
* ``MAC budget``: ``--macs`` (fractions of the unpruned MACs; ``ratio_for_budget``, uniform);
* ``latency budget``: ``--budgets`` (fractions of the unpruned file's latency on ``--format`` at
  ``--precision`` on this host), met with uniform allocation (``ratio_for_latency``) and with global
  allocation (``widths_for_latency``: a width per group from the runtime's per-layer latency table; a
  unit's cost is its label-free Fisher saliency on the first draw's calibration images; ``--max-ratio``
  bounds how much of a group may go);
* ``fine-tuned``: ``benchmarks/qat.py``'s fp32 networks (the default recipe: 256 steps, 4 events with
  reconstruction, distillation, ``round_to=32``); their accuracy comes from ``qat.json``, and their
  structure (which is all the latency depends on) is rebuilt here.

Post-training points are pruned the way ``pqv compress`` does it (L2, one event, least-squares refit of
every Linear on ``--calibration-images`` training images drawn with each of ``--seeds``) and evaluated in
fp32 on all 10,000 test images. Latency: every point's file is timed against the unpruned model's file,
round-robin, each measurement in a fresh process (``LatencyProbe``, the code the latency budgets use),
``--rounds`` rounds; the whole pass is repeated ``--repeats`` times: the median of the repeats and their
range. The searches' own measurements are kept too.

The report marks the Pareto frontier (no other point is at least as fast and more accurate) and names,
for accuracy floors ``--floors`` points below the unpruned model, the fastest point that keeps the floor
(what ``pqv compress --max-accuracy-drop`` aims at, among these points).

Rows are cached in ``benchmarks/results/compress_pareto.json`` (accuracy rows for any host; searches and
latency under the host's label), so the run resumes; the report goes to ``compress_pareto.md`` and the
plot to ``compress_pareto.png``.

    python benchmarks/compress_pareto.py
    python benchmarks/compress_pareto.py --format openvino --precision int8-dynamic
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from pqv_lightning.apps.compress import fmnist_images
from pqv_lightning.apps.recipes import evaluate
from pqv_lightning.errors import ConfigError
from pqv_lightning.export.host import host_description, host_label
from pqv_lightning.fileio import JsonCache, atomic_write_text
from pqv_lightning.latency_budget import LatencyBudget, LatencyProbe, ratio_for_latency, widths_for_latency
from pqv_lightning.pruning import PruningConfig, count_macs, count_params, prune_once, ratio_for_budget
from pqv_lightning.settings import torch_threads

from latency_allocation import bundled  # benchmarks/ is the script's directory: on sys.path

OUT = Path(__file__).parent / "results"
TEST_IMAGES = 10_000
EXAMPLE = torch.zeros(1, 1, 32, 32)


@dataclasses.dataclass
class Point:
    """One structure on the plot: its name, how it is pruned, where its accuracy comes from."""

    name: str
    kind: str  # uniform, MAC budget, latency budget (uniform), latency budget (global), fine-tuned
    structure: PruningConfig
    acc_key: str | None = None  # post-training accuracy rows: f"acc/{acc_key}/{seed}"
    search: dict | None = None  # the latency search's own result
    tuned: list[dict] = dataclasses.field(default_factory=list)  # qat.py rows (fine-tuned points)


def _ratio_point(kind: str, name: str, ratio: float, search: dict | None = None) -> Point:
    return Point(name, kind, PruningConfig(importance="l2", pruning_ratio=ratio), f"{ratio:g}", search)


def _points(cache: JsonCache, model, args, host: str, calibration) -> list[Point]:
    """Every structure, its search (a latency or MAC budget) run once and cached."""
    points = [_ratio_point("uniform", f"{100 * r:g} %", r) for r in args.ratios]
    for target in args.macs:
        key = f"macs/{target:g}"
        if cache.get(key) is None:
            ratio = ratio_for_budget(model, PruningConfig(target_macs=target), example_inputs=EXAMPLE)
            cache.put(key, {"target": target, "ratio": ratio})
        points.append(_ratio_point("MAC budget", f"{target:g} of the MACs", cache.get(key)["ratio"]))
    base = dict(format=args.format, precision=args.precision, threads=args.threads)
    for target in args.budgets:
        key = f"search/{host}/{args.format}/{args.precision}/uniform/{target:g}"
        if cache.get(key) is None:
            ratio, info = ratio_for_latency(model, LatencyBudget(target, **base), example_inputs=EXAMPLE)
            cache.put(key, {"ratio": ratio, "measured_fraction": info["predicted_fraction"], "trials": info["trials"]})
        found = cache.get(key)
        points.append(_ratio_point("latency budget, uniform", f"{target:g} of the latency", found["ratio"], found))
    for target in args.budgets:
        key = f"search/{host}/{args.format}/{args.precision}/global/{target:g}/{args.max_ratio:g}/fisher"
        if cache.get(key) is None:
            budget = LatencyBudget(target, allocation="global", max_ratio=args.max_ratio, **base)
            try:
                _, info = widths_for_latency(model, budget, example_inputs=EXAMPLE, calibration=calibration)
            except ConfigError as exc:  # not met on this host (reported, not cached: a rerun tries again)
                args.not_met.append(f"latency budget, global: {target:g} of the latency — {exc}")
                print(args.not_met[-1], flush=True)
                continue
            info.pop("trials")
            cache.put(key, info)
        found = cache.get(key)
        structure = PruningConfig(importance="l2", group_widths=found["group_widths"])
        points.append(Point(f"{target:g} of the latency", "latency budget, global", structure, key, found))
    tuned = _finetuned()
    for ratio in sorted({r["pruning_ratio"] for r in tuned}):
        structure = PruningConfig(importance="l2", pruning_ratio=ratio, round_to=32)
        rows = [r for r in tuned if r["pruning_ratio"] == ratio]
        points.append(Point(f"{100 * ratio:g} %", "fine-tuned", structure, tuned=rows))
    return points


def _finetuned() -> list[dict]:
    """The default recipe's fine-tuned networks (benchmarks/qat.py's ptq rows: fp32 accuracy)."""
    path = OUT / "qat.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text()).get("rows", {})
    return [r for k, r in rows.items() if k.endswith("/ptq")]


def _accuracy(cache: JsonCache, model, dm, points: list[Point], args) -> None:
    for seed in args.seeds:
        calibration = None
        for point in points:
            key = f"acc/{point.acc_key}/{seed}"
            if point.acc_key is None or cache.get(key) is not None:
                continue
            if calibration is None:
                x, _ = fmnist_images(dm.data_dir, "train", args.calibration_images, seed)
                calibration = list(x.split(64))
            pruned = copy.deepcopy(model)
            t0 = time.perf_counter()
            with torch_threads(args.threads):
                prune_once(pruned, dataclasses.replace(point.structure, reconstruct=True), calibration=calibration)
                seconds = time.perf_counter() - t0
                accuracy = evaluate(pruned, dm)
            row = {"accuracy": accuracy, "prune_seconds": seconds, "params": count_params(pruned), "seed": seed}
            cache.put(key, {**row, "macs": count_macs(pruned, EXAMPLE)})
            print(f"{key}: {100 * accuracy:.2f} % ({seconds:.0f} s)", flush=True)


def _latency_key(args, host: str, repeat: int) -> str:
    return f"latency/{host}/{args.format}/{args.precision}/{args.rounds}/{repeat}"


def _latency(cache: JsonCache, model, points: list[Point], args, host: str) -> None:
    """Every point's file against the unpruned file, one pass per repeat (cached per repeat and point)."""
    budget = LatencyBudget(0.5, format=args.format, precision=args.precision, threads=args.threads, rounds=args.rounds)
    for repeat in range(args.repeats):
        key = _latency_key(args, host, repeat)
        done = dict(cache.get(key) or {})
        todo = [p for p in points if _label(p) not in done]
        if not todo:
            continue
        with LatencyProbe(model, budget, example_inputs=EXAMPLE) as probe:
            for point in todo:
                row = probe.measure_structure(_label(point), point.structure, {})
                keys = ("ms", "unpruned_ms", "fraction", "fraction_of_medians", "contention_max")
                done[_label(point)] = {k: row[k] for k in keys}
                cache.put(key, done)
                print(
                    f"latency {repeat} {_label(point)}: {row['fraction']:.3f} paired, {row['fraction_of_medians']:.3f} "
                    f"({row['ms']:.2f} ms vs {row['unpruned_ms']:.2f} ms)",
                    flush=True,
                )


def _label(point: Point) -> str:
    return f"{point.kind}: {point.name}"


def _summary(cache: JsonCache, points: list[Point], args, host: str) -> list[dict]:
    """Per point: accuracy (mean, std, n), params, MACs, latency fraction (median, range) and ms."""
    out = []
    for p in points:
        if p.kind == "fine-tuned":
            accs = [100 * r["accuracy"]["fp32"] for r in p.tuned]
            params, macs = p.tuned[0]["params"], p.tuned[0]["macs"]
        else:
            rows = [r for s in args.seeds if (r := cache.get(f"acc/{p.acc_key}/{s}")) is not None]
            accs = [100 * r["accuracy"] for r in rows]
            params, macs = rows[0]["params"], rows[0]["macs"]
        runs = [cache.get(_latency_key(args, host, r)) or {} for r in range(args.repeats)]
        timed = sorted((run[_label(p)] for run in runs if _label(p) in run), key=lambda r: r["fraction"])
        fractions = [r["fraction"] for r in timed]
        out.append(
            {
                "point": p,
                "accuracy": statistics.fmean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else None,
                "n": len(accs),
                "params": params,
                "macs": macs,
                "fraction": statistics.median(fractions),
                "range": (fractions[0], fractions[-1]),
                "ms": statistics.median(r["ms"] for r in timed),
            }
        )
    for row in out:  # the frontier: no other point at least as fast and more accurate
        row["pareto"] = not any(
            o is not row and o["fraction"] <= row["fraction"] and o["accuracy"] > row["accuracy"] for o in out
        )
    return out


def _report(cache: JsonCache, rows: list[dict], args, host: str) -> str:
    unpruned = cache.get("unpruned")
    base = 100 * unpruned["accuracy"]
    se = 100 * (unpruned["accuracy"] * (1 - unpruned["accuracy"]) / TEST_IMAGES) ** 0.5
    runs = [cache.get(_latency_key(args, host, r)) or {} for r in range(args.repeats)]
    unpruned_ms = statistics.median(v["unpruned_ms"] for run in runs for v in run.values())
    lines = [
        f"`python benchmarks/compress_pareto.py` — {host}, {args.threads} threads. Accuracy: fp32 on all "
        f"{TEST_IMAGES:,} test images (standard error of one accuracy near 90 %: {se:.2f} pt; of a difference: "
        f"{se * 2**0.5:.2f} pt), mean ± std over {len(args.seeds)} calibration draws of {args.calibration_images} "
        f"training images (post-training: L2, one event, least-squares refit) or over the fine-tuning seeds run "
        f"so far. Latency: the {args.format} {args.precision} file of each point against the unpruned model's "
        f"file, round-robin, a fresh process per measurement, {args.rounds} rounds: the median of the per-round "
        f"ratios (a round times both files one right after the other); the pass repeated {args.repeats} times: "
        f"median of the repeats (their range). Unpruned: {base:.2f} %, {unpruned_ms:.2f} ms "
        f"(median). Global allocation: Fisher costs, max_ratio {args.max_ratio:g}. ★ = on the Pareto frontier.",
        "",
        "| point | | accuracy | n | params | MACs | latency vs unpruned file | ms | search measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        p = row["point"]
        std = f" ± {row['std']:.2f}" if row["std"] is not None else ""
        search = f"{p.search['measured_fraction']:.3f}" if p.search else ""
        if p.search and p.search.get("met") is False:  # kept the fastest allocation measured, over the budget
            search += " (budget not met)"
        lo, hi = row["range"]
        lines.append(
            f"| {p.kind}: {p.name} | {'★' if row['pareto'] else ''} | {row['accuracy']:.2f}{std} % | {row['n']} | "
            f"{row['params'] / 1e6:.2f} M | {row['macs'] / unpruned['macs']:.3f} | {row['fraction']:.3f} "
            f"({lo:.3f}–{hi:.3f}) | {row['ms']:.2f} | {search} |"
        )
    lines.append("")
    lines += [f"* Not met on this host: {reason}" for reason in args.not_met]
    for floor in args.floors:
        kept = [r for r in rows if r["accuracy"] >= base - floor]
        best = min(kept, key=lambda r: r["fraction"]) if kept else None
        lines.append(
            f"* Within {floor:g} pt of the unpruned model: "
            + (
                f"**{_label(best['point'])}**, {best['accuracy']:.2f} % at {best['fraction']:.3f} of the unpruned "
                f"latency."
                if best
                else "no point."
            )
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], args, base: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (
        ("uniform", "o"),
        ("MAC budget", "s"),
        ("latency budget, uniform", "^"),
        ("latency budget, global", "v"),
        ("fine-tuned", "*"),
    ):
        mine = [r for r in rows if r["point"].kind == kind]
        if not mine:
            continue
        ax.errorbar(
            [r["fraction"] for r in mine],
            [r["accuracy"] for r in mine],
            xerr=[[r["fraction"] - r["range"][0] for r in mine], [r["range"][1] - r["fraction"] for r in mine]],
            yerr=[r["std"] or 0 for r in mine],
            fmt=marker,
            ms=6,
            capsize=2,
            label=kind,
        )
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["fraction"])
    ax.plot([r["fraction"] for r in front], [r["accuracy"] for r in front], "k--", lw=0.8, label="Pareto frontier")
    ax.axhline(base, color="gray", ls=":", lw=1, label="unpruned")
    ax.set_xlabel(f"latency / unpruned ({args.format} {args.precision}, this host)")
    ax.set_ylabel("fp32 test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "compress_pareto.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.125, 0.25, 0.375, 0.5, 0.625, 0.75])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--format", default="onnx")
    ap.add_argument("--precision", default="int8-dynamic")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.35], help="latency fractions")
    ap.add_argument("--max-ratio", type=float, default=0.9, help="global allocation: the most a group may lose")
    ap.add_argument("--macs", type=float, nargs="+", default=[0.5], help="MAC fractions")
    ap.add_argument("--floors", type=float, nargs="+", default=[0.5, 1.0], help="accuracy floors (points)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="independent latency passes over every point")
    args = ap.parse_args(argv)
    args.not_met = []  # searches that could not meet their budget on this host, with the reason
    cache = JsonCache(OUT / "compress_pareto.json")
    host = host_label(host_description())
    model, dm, calibration = bundled(cache, args.threads, args.calibration_images, args.seeds[0])
    points = _points(cache, model, args, host, calibration)
    _accuracy(cache, model, dm, points, args)
    _latency(cache, model, points, args, host)
    rows = _summary(cache, points, args, host)
    report = _report(cache, rows, args, host)
    atomic_write_text(OUT / "compress_pareto.md", report)
    _plot(rows, args, 100 * cache.get("unpruned")["accuracy"])
    print(report)


if __name__ == "__main__":
    main()
