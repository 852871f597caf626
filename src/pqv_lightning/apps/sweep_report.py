"""Plots and the Markdown report of a ``pqv sweep`` run (see :mod:`pqv_lightning.apps.sweep`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plots import save_figure, subplots

__all__ = ["host_line", "markdown_report", "splice_between_markers", "summary_markdown", "sweep_plots"]


def _by(rows, key):
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return groups


def _fig_latency(rows, out: Path, name: str, title: str) -> Path:
    fig, axes = subplots(1, 2, figsize=(10, 3.8))
    for (model, precision), rs in sorted(_by([{**r, "mp": (r["model"], _label(r))} for r in rows], "mp").items()):
        rs = sorted(rs, key=lambda r: r["ratio"])
        label = f"{model} {precision}" if len({r["model"] for r in rows}) > 1 else precision
        axes[0].plot([100 * r["ratio"] for r in rs], [r["median_ms"] for r in rs], "o-", label=label)
        mem = [(100 * r["ratio"], r["peak_rss_mb"]) for r in rs if r.get("peak_rss_mb")]
        if mem:
            axes[1].plot(*zip(*mem), "o-", label=label)
    axes[0].set_ylabel("batch-1 latency, median (ms)")
    axes[1].set_ylabel("peak RSS while loading + running (MB)")
    for ax in axes:
        ax.set_xlabel("channels pruned (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, out / name)


def _fig_accuracy(rows, out: Path) -> Path:
    fig, ax = subplots(figsize=(6, 3.8))
    for precision, rs in _by(rows, "precision").items():
        rs = sorted(rs, key=lambda r: r["ratio"])
        key = "test_acc" if precision == "fp32 eager" else "val_acc"
        pts = [(100 * r["ratio"], 100 * r[key]) for r in rs if r.get(key) is not None]
        if pts:
            ax.plot(
                *zip(*pts),
                "o-",
                label=("fp32 eager (test set)" if precision == "fp32 eager" else f"{precision} (validation images)"),
            )
    ax.set_xlabel("channels pruned (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle("Fashion-MNIST ViT: accuracy vs pruning x precision")
    return save_figure(fig, out / "fig4_accuracy.png")


def _fig_bars(labels, values, xlabel, title, out: Path, name: str) -> Path:
    fig, ax = subplots(figsize=(6, 0.45 * len(labels) + 1.5))
    ax.barh(range(len(labels)), values, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, out / name)


def _fig_importance(imp, out: Path) -> Path:
    """Mean ± std over seeds per criterion, each seed's accuracy as a dot; the axis spans the data (bars
    from 0 hide differences of a tenth of a point), with the test set's standard error as a scale bar."""
    import math

    fig, ax = subplots(figsize=(6, 0.5 * len(imp) + 1.6))
    for i, r in enumerate(imp):
        std = 0.0 if math.isnan(r["std"]) else r["std"]
        ax.errorbar(
            [r["mean"]],
            [i],
            xerr=[std],
            fmt="o",
            color="tab:blue",
            capsize=4,
            label="mean ± std over seeds" if i == 0 else None,
        )
        ax.plot(r["accs"], [i] * len(r["accs"]), "x", color="tab:gray", label="one seed" if i == 0 else None)
    se = imp[0]["se"]
    lo = min(min(r["accs"]) for r in imp)
    ax.errorbar(
        [lo],
        [len(imp) - 0.4],
        xerr=[[0], [se]],
        fmt="none",
        color="tab:red",
        capsize=3,
        label=f"standard error of one accuracy ({se:.2f} pt)",
    )
    ax.set_yticks(range(len(imp)), [f"{r['importance']} (n={len(r['accs'])})" for r in imp], fontsize=8)
    ax.set_ylim(len(imp) - 0.1, -0.6)
    ax.set_xlabel("test accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"importance criteria at {100 * imp[0]['ratio']:g} % pruning")
    return save_figure(fig, out / "fig5_importance.png")


def _fastest_int8_per_format(rows) -> list[dict[str, Any]]:
    """The fp32 eager rows and, per (model, ratio, format), the fastest int8 file as precision ``int8``."""
    out = [r for r in rows if r["format"] == "eager"]
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["format"] != "eager" and str(r["precision"]).startswith("int8"):
            k = (r["model"], r["ratio"], r["format"])
            if k not in best or r["median_ms"] < best[k]["median_ms"]:
                best[k] = r
    return out + [{**r, "precision": "int8"} for r in best.values()]


def sweep_plots(results: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    paths = []
    lat = results["latency"]
    if lat:
        first = lat[0]["model"]
        paths.append(
            _fig_latency(
                [r for r in lat if r["model"] == first],
                out,
                "fig2_latency_memory.png",
                f"{first}: latency and memory vs pruning x precision",
            )
        )
        if len({r["model"] for r in lat}) > 1:
            paths.append(
                _fig_latency(
                    _fastest_int8_per_format(lat),
                    out,
                    "fig6_models.png",
                    "models at equal pruning: fp32 eager and the fastest int8 file per format",
                )
            )
    if results["accuracy"]:
        paths.append(_fig_accuracy(results["accuracy"], out))
    imp = importance_summary(results["importance"])
    if imp:
        paths.append(_fig_importance(imp, out))
    eng = results["engines"]
    if eng:
        models = list(dict.fromkeys(r["model"] for r in eng))
        labels = [(f"{r['model']}: " if len(models) > 1 else "") + (r["engine"] or "fp32 eager") for r in eng]
        paths.append(
            _fig_bars(
                labels,
                [r["median_ms"] for r in eng],
                "batch-1 latency, median (ms)",
                f"{', '.join(models)} {100 * eng[0]['ratio']:g} % pruned: .ptl int8 per engine",
                out,
                "fig7_engines.png",
            )
        )
    return paths


def _table(rows, cols) -> list[str]:
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r) for _, fmt in cols) + " |")
    return lines


def _num(key, spec, scale=1.0):
    return lambda r: "" if r.get(key) is None else format(scale * r[key], spec)


def markdown_report(results: dict[str, list[dict[str, Any]]], config, plots: list[Path]) -> str:
    names = lambda formats: ", ".join(f"`{f}`" for f in formats)  # noqa: E731
    lines = [
        f"Host: {host_line(results, config)}; export formats {names(config.formats)}"
        + (f" (latency cells: {names(config.latency_formats)})" if config.latency_formats else "")
        + "; batch 1."
    ]
    if results["gemm"]:
        g = results["gemm"][0]
        bf16 = f"bf16 `{g['bf16_source']}` {g['bf16_gops']:.0f} GOP/s, " if "bf16_gops" in g else ""
        lines += [
            "",
            f"Measured GEMM throughput of this host ({g['size']}^3, {g['threads']} threads): fp32 "
            f"`{g['fp32_source']}` {g['fp32_gops']:.0f} GOP/s, {bf16}int8 `{g['int8_source']}` "
            f"{g['int8_gops']:.0f} GOP/s (the best of "
            + ", ".join(f"{k[10:-1]} {v:.0f}" for k, v in g.items() if k.startswith("int8_gops["))
            + ").",
        ]
    lines += [
        "",
        "Latency: median / p90 over all timed calls, every candidate in a fresh process, round-robin "
        f"({config.rounds} rounds x {config.repeats} calls); peak RSS of that process.",
    ]
    for _name, rows, title in (
        ("latency", results["latency"], "Latency and memory vs pruning x precision"),
        ("engines", results["engines"], "Quantized engines (.ptl int8)"),
    ):
        if not rows:
            continue
        lines += ["", f"**{title}**", ""]
        lines += _table(
            rows,
            [
                ("model", lambda r: r["model"]),
                ("pruned", _num("ratio", ".4g", 100)),
                ("params", _num("params", ".1f", 1e-6)),
                ("variant", lambda r: r["variant"]),
                ("median ms", _num("median_ms", ".2f")),
                ("p90 ms", _num("p90_ms", ".2f")),
                ("size MB", _num("size_mb", ".1f")),
                ("peak RSS MB", _num("peak_rss_mb", ".0f")),
                ("cosine", _num("cosine", ".4f")),
                ("GOP/s", _num("achieved_gops", ".0f")),
                ("of host GEMM", _num("fraction_of_host_gemm", ".0%")),
            ],
        )
    for _name, rows, title in (
        ("accuracy", results["accuracy"], "Accuracy vs pruning x precision (Fashion-MNIST)"),
        ("importance", results["importance"], "Importance criteria at equal pruning"),
    ):
        if not rows:
            continue
        lines += ["", f"**{title}**", ""]
        lines += _table(
            rows,
            [
                ("importance", lambda r: r["importance"]),
                ("pruned", _num("ratio", ".4g", 100)),
                ("params", _num("params", ".2f", 1e-6)),
                ("MACs", _num("macs", ".1f", 1e-6)),
                ("steps", lambda r: str(r["steps"])),
                ("precision", lambda r: r["precision"]),
                ("test acc", _num("test_acc", ".2f", 100)),
                ("val acc of the file", _num("val_acc", ".2f", 100)),
            ],
        )
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`{Path(p).name}`" for p in plots)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- summary
def host_line(results: dict[str, list[dict[str, Any]]], config) -> str:
    """The measuring host (recorded with the GEMM cell; the current host for older caches)."""
    from ..export.host import cpu_count_text, host_description, host_label

    gemm = results["gemm"][0] if results["gemm"] else {}
    h = gemm.get("host") or host_description()
    isa = ", ".join(h["isa"]) or "no AVX2/AVX-512/NEON flags"
    return (
        f"{host_label(h)} ({h['machine']}, {cpu_count_text(h)}; {isa}), {config.threads} threads, "
        f"{h['system']}, Python {h['python']}, torch {h['torch']}"
    )


def _label(r) -> str:
    return "fp32 eager" if r["format"] == "eager" else f"{r['precision']} .{r['format']}"


def _pivot(rows, row_key, lead_cols, col_key, cell) -> list[str]:
    """A table with one line per ``row_key`` value, the ``lead_cols`` of its first row, then one column per
    ``col_key`` value (in first-seen order) holding ``cell(row)``."""
    columns = list(dict.fromkeys(col_key(r) for r in rows))
    lines: dict[Any, dict[Any, Any]] = {}
    for r in rows:
        lines.setdefault(row_key(r), {})[col_key(r)] = r
    header = [c for c, _ in lead_cols] + columns
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells in lines.values():
        first = next(iter(cells.values()))
        out.append(
            "| "
            + " | ".join([fmt(first) for _, fmt in lead_cols] + [cell(cells[c]) if c in cells else "" for c in columns])
            + " |"
        )
    return out


def _speedups(rows) -> None:
    """``x_vs_unpruned_eager``: each latency row against the unpruned fp32 eager model timed in its own cell
    (same run, round-robin). Rows of older caches without it are divided by the ratio-0 cell of their model."""
    base = {r["model"]: r["median_ms"] for r in rows if r["format"] == "eager" and r["ratio"] == 0}
    for r in rows:
        if "x_vs_unpruned_eager" not in r and r["model"] in base:
            r["x_vs_unpruned_eager"] = base[r["model"]] / r["median_ms"]
            r["unpruned_eager_ms"] = base[r["model"]]


def _headline(rows, ratio: float) -> list[str]:
    def find(model, r, int8):
        hits = [
            x
            for x in rows
            if x["model"] == model
            and x["ratio"] == r
            and (str(x["precision"]).startswith("int8") if int8 else x["format"] == "eager")
        ]
        return min(hits, key=lambda x: x["median_ms"]) if hits else None

    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        pruned, q, both = find(model, ratio, False), find(model, 0.0, True), find(model, ratio, True)
        if None in (pruned, q, both) or "x_vs_unpruned_eager" not in both:
            continue
        out.append(
            f"| {model} | {both['unpruned_eager_ms']:.1f} ms | {pruned['x_vs_unpruned_eager']:.2f}x | "
            f"{q['x_vs_unpruned_eager']:.2f}x | {both['median_ms']:.1f} ms ({_label(both)}) | "
            f"**{both['x_vs_unpruned_eager']:.2f}x** |"
        )
    if not out:
        return []
    return (
        [
            f"**The paper's headline configuration** ({100 * ratio:g} % pruning + int8; the paper reports 7.18x "
            "lower latency than fp32), against the unpruned fp32 eager model timed in the same cell "
            "(same run, round-robin):",
            "",
            "| model | fp32 eager, unpruned | pruning alone | int8 alone | pruned + int8 | both |",
            "|---|---|---|---|---|---|",
        ]
        + out
        + [""]
    )


def fastest_per_cell(rows) -> list[dict[str, Any]]:
    """Per latency cell (model, pruning ratio): the fastest exported file and the fastest int8 ONNX Runtime
    file of the same round-robin, with ``vs_onnx_int8`` = fastest / ORT int8 latency (< 1: faster than ONNX
    Runtime). Empty when the cells hold no int8 ``.onnx`` file (a one-runtime sweep)."""
    out = []
    for model, ratio in dict.fromkeys((r["model"], r["ratio"]) for r in rows):
        files = [r for r in rows if (r["model"], r["ratio"]) == (model, ratio) and r["format"] != "eager"]
        ort = [r for r in files if r["format"] == "onnx" and str(r["precision"]).startswith("int8")]
        if not ort:
            continue
        best, best_ort = min(files, key=lambda r: r["median_ms"]), min(ort, key=lambda r: r["median_ms"])
        out.append(
            {
                "model": model,
                "ratio": ratio,
                "best": best,
                "onnx_int8": best_ort,
                "vs_onnx_int8": best["median_ms"] / best_ort["median_ms"],
            }
        )
    return out


def _fastest_table(rows) -> list[str]:
    race = fastest_per_cell(rows)
    if not race:
        return []
    lines = [
        "",
        "**Fastest file per cell** against the fastest ONNX Runtime int8 file of the same round-robin "
        "(below 1x: faster than ONNX Runtime int8)",
        "",
        "| model | pruned | fastest file | median ms | vs unpruned fp32 eager | ONNX Runtime int8 ms | "
        "fastest / ORT int8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in race:
        b, o = c["best"], c["onnx_int8"]
        lines.append(
            f"| {c['model']} | {100 * c['ratio']:g} % | {_label(b)} | {b['median_ms']:.1f} | "
            f"{b['x_vs_unpruned_eager']:.2f}x | "
            f"{o['median_ms']:.1f} ({o['precision']}) | {c['vs_onnx_int8']:.2f}x |"
        )
    return lines


def summary_markdown(results: dict[str, list[dict[str, Any]]], config) -> str:
    """The compact version of ``results.md`` for a README: the headline ratio, then one pivot table per
    figure (latency, memory, efficiency, engines, accuracy, importance)."""
    lines = [
        f"Host: {host_line(results, config)}. Batch 1; latency is the median over "
        f"{config.rounds} rounds x {config.repeats} calls, every candidate in a fresh process, round-robin.",
        "",
    ]
    lat = [dict(r) for r in results["latency"]]
    if lat:
        _speedups(lat)
        lines += _headline(lat, config.engine_ratio)
        lead = [
            ("model", lambda r: r["model"]),
            ("pruned", lambda r: f"{100 * r['ratio']:g} %"),
            ("params", lambda r: f"{r['params'] / 1e6:.1f} M"),
            ("GMACs", lambda r: f"{r['macs'] / 1e9:.2f}"),
        ]
        key = lambda r: (r["model"], r["ratio"])  # noqa: E731
        lines += [
            "**Latency vs pruning x precision** (paper Fig. 2 and 6): median ms (speedup vs the unpruned "
            "fp32 eager model)",
            "",
        ]
        lines += _pivot(lat, key, lead, _label, lambda r: f"{r['median_ms']:.1f} ({r['x_vs_unpruned_eager']:.2f}x)")
        lines += _fastest_table(lat)
        files = [r for r in lat if r["format"] != "eager"]
        lines += ["", "**Memory**: file size MB / peak RSS MB of a fresh process that loads and runs it", ""]
        lines += _pivot(
            lat,
            key,
            lead[:2],
            _label,
            lambda r: ("-" if r.get("size_mb") is None else f"{r['size_mb']:.0f}") + f" / {r['peak_rss_mb']:.0f}",
        )
        if files and "fraction_of_host_gemm" in files[0]:
            g = results["gemm"][0]
            bf16 = (
                f", bf16 {g['bf16_gops']:.0f} GOP/s: the reference of fp16 files where faster than fp32"
                if "bf16_gops" in g
                else ""
            )
            lines += [
                "",
                f"**Efficiency**: achieved GOP/s (2 x MACs / latency) as a share of this host's measured "
                f"GEMM throughput (fp32 {g['fp32_gops']:.0f} GOP/s, int8 {g['int8_gops']:.0f} GOP/s{bf16})",
                "",
            ]
            lines += _pivot(
                lat,
                key,
                lead[:2],
                _label,
                lambda r: f"{r['achieved_gops']:.0f} ({100 * r['fraction_of_host_gemm']:.0f} %)",
            )
    eng = [dict(r) for r in results["engines"]]
    if eng:
        _speedups(eng)
        lines += [
            "",
            f"**Quantized engines** (paper Fig. 7): {100 * eng[0]['ratio']:g} % pruned, int8-dynamic `.ptl`, "
            "against the unpruned fp32 eager model timed in the same cell",
            "",
            "| model | engine | median ms | p90 ms | vs unpruned fp32 eager | size MB |",
            "|---|---|---|---|---|---|",
        ]
        for r in eng:
            vs = f"{r['x_vs_unpruned_eager']:.2f}x" if "x_vs_unpruned_eager" in r else "-"
            lines.append(
                f"| {r['model']} | {r['engine'] or 'fp32 eager, pruned'} | {r['median_ms']:.1f} | "
                f"{r['p90_ms']:.1f} | {vs} | " + ("-" if r.get("size_mb") is None else f"{r['size_mb']:.0f}") + " |"
            )
    acc = results["accuracy"]
    if acc:
        images = max((r.get("val_images") or 0 for r in acc), default=0)
        lines += [
            "",
            "**Accuracy vs pruning x precision** (paper Fig. 4, Fashion-MNIST): the fine-tuned fp32 model on "
            f"the test set, each exported file on {images} validation images",
            "",
        ]
        files = [r for r in acc if r["precision"] != "fp32 eager"] or acc
        lines += _pivot(
            files,
            lambda r: r["ratio"],
            [
                ("pruned", lambda r: f"{100 * r['ratio']:g} %"),
                ("params", lambda r: f"{r['params'] / 1e6:.2f} M"),
                ("MMACs", lambda r: f"{r['macs'] / 1e6:.0f}"),
                ("test acc", lambda r: f"{100 * r['test_acc']:.2f} %"),
            ],
            lambda r: f"{r['precision']} .{r.get('format', config.formats[0])}",
            lambda r: "" if r.get("val_acc") is None else f"{100 * r['val_acc']:.2f} %",
        )
    imp = importance_summary(results["importance"])
    if imp:
        lines += [
            "",
            f"**Importance criteria** (paper Fig. 5) at {100 * imp[0]['ratio']:g} % pruning, same budget "
            f"({imp[0]['steps']} steps), mean ± std over seeds (standard error of one accuracy on "
            f"{imp[0]['test_images']:,} test images: {imp[0]['se']:.2f} pt)",
            "",
            "| criterion | test acc (mean ± std) | seeds | per seed | params |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['importance']} | {r['mean']:.2f} ± {r['std']:.2f} % | {len(r['accs'])} | "
            f"{', '.join(f'{a:.2f}' for a in r['accs'])} | {r['params'] / 1e6:.2f} M |"
            for r in imp
        ]
    return "\n".join(lines) + "\n"


def importance_summary(rows: list[dict[str, Any]], test_images: int | None = None) -> list[dict[str, Any]]:
    """The importance experiment's fp32 rows grouped by criterion: test accuracy (%) per seed, mean,
    sample std (nan with one seed) and the binomial standard error of one accuracy on the test set.
    A cell's ``fp32 eager`` row (the fine-tuned model) and its ``fp32`` file row carry the same test
    accuracy: each seed counts once, from the eager row where there is one."""
    import math
    import statistics

    per_seed: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r["precision"] in ("fp32 eager", "fp32"):
            key = (r["importance"], r.get("seed", 0))
            if key not in per_seed or r["precision"] == "fp32 eager":
                per_seed[key] = r
    out = []
    for name, rs in _by(per_seed.values(), "importance").items():
        rs = sorted(rs, key=lambda r: r.get("seed", 0))
        accs = [100 * r["test_acc"] for r in rs]
        mean = statistics.mean(accs)
        n = test_images or rs[0].get("test_images") or 10_000
        out.append(
            {
                "importance": name,
                "ratio": rs[0]["ratio"],
                "steps": rs[0]["steps"],
                "params": rs[0]["params"],
                "accs": accs,
                "mean": mean,
                "std": statistics.stdev(accs) if len(accs) > 1 else float("nan"),
                "test_images": n,
                "se": 100 * math.sqrt(mean / 100 * (1 - mean / 100) / n),
            }
        )
    return out


def splice_between_markers(text: str, block: str, name: str = "sweep") -> str:
    """Replace what lies between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in ``text`` with ``block``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(
            f"expected one {begin!r} followed by one {end!r}; found {text.count(begin)} and {text.count(end)}"
        )
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{block.strip()}\n{end}{tail}"
