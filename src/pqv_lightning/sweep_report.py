"""Plots and the Markdown report of a ``pqv sweep`` run (see :mod:`pqv_lightning.sweep`)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from .plots import _pyplot, save_figure

__all__ = ["markdown_report", "sweep_plots"]


def _by(rows, key):
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return groups


def _fig_latency(rows, out: Path, name: str, title: str) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (model, precision), rs in sorted(_by([{**r, "mp": (r["model"], r["precision"] if r["format"] != "eager"
                                                         else "fp32 eager")} for r in rows], "mp").items()):
        rs = sorted(rs, key=lambda r: r["ratio"])
        label = f"{model} {precision}" if len({r['model'] for r in rows}) > 1 else precision
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
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for precision, rs in _by(rows, "precision").items():
        rs = sorted(rs, key=lambda r: r["ratio"])
        key = "test_acc" if precision == "fp32 eager" else "val_acc"
        pts = [(100 * r["ratio"], 100 * r[key]) for r in rs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", label=("fp32 eager (test set)" if precision == "fp32 eager"
                                             else f"{precision} (validation images)"))
    ax.set_xlabel("channels pruned (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle("Fashion-MNIST ViT: accuracy vs pruning x precision")
    return save_figure(fig, out / "fig4_accuracy.png")


def _fig_bars(labels, values, xlabel, title, out: Path, name: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(labels) + 1.5))
    ax.barh(range(len(labels)), values, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, out / name)


def sweep_plots(results: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    paths = []
    lat = results["latency"]
    if lat:
        first = lat[0]["model"]
        paths.append(_fig_latency([r for r in lat if r["model"] == first], out, "fig2_latency_memory.png",
                                  f"{first}: latency and memory vs pruning x precision"))
        if len({r["model"] for r in lat}) > 1:
            paths.append(_fig_latency([r for r in lat if r["precision"] != "fp16"], out, "fig6_models.png",
                                      "models at equal pruning"))
    if results["accuracy"]:
        paths.append(_fig_accuracy(results["accuracy"], out))
    imp = [r for r in results["importance"] if r["precision"] == "fp32 eager"]
    if imp:
        paths.append(_fig_bars([r["importance"] for r in imp], [100 * r["test_acc"] for r in imp], "test accuracy (%)",
                               f"importance criteria at {100 * imp[0]['ratio']:g} % pruning", out,
                               "fig5_importance.png"))
    eng = results["engines"]
    if eng:
        paths.append(_fig_bars([r["engine"] or "fp32 eager" for r in eng], [r["median_ms"] for r in eng],
                               "batch-1 latency, median (ms)",
                               f"{eng[0]['model']} {100 * eng[0]['ratio']:g} % pruned: .ptl int8 per engine", out,
                               "fig7_engines.png"))
    return paths


def _table(rows, cols) -> list[str]:
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r) for _, fmt in cols) + " |")
    return lines


def _num(key, spec, scale=1.0):
    return lambda r: "" if r.get(key) is None else format(scale * r[key], spec)


def markdown_report(results: dict[str, list[dict[str, Any]]], config, plots: list[Path]) -> str:
    lines = [f"Host: {platform.machine()}, {config.threads} threads, torch {torch.__version__}; "
             f"export format `{config.format}`; batch 1."]
    if results["gemm"]:
        g = results["gemm"][0]
        lines += ["", f"Measured GEMM throughput of this host ({g['size']}^3, {g['threads']} threads): fp32 "
                      f"`{g['fp32_source']}` {g['fp32_gops']:.0f} GOP/s, int8 `{g['int8_source']}` "
                      f"{g['int8_gops']:.0f} GOP/s (the best of " +
                      ", ".join(f"{k[10:-1]} {v:.0f}" for k, v in g.items() if k.startswith("int8_gops[")) + ")."]
    lines += ["", "Latency: median / p90 over all timed calls, every candidate in a fresh process, round-robin "
                  f"({config.rounds} rounds x {config.repeats} calls); peak RSS of that process."]
    for name, rows, title in (("latency", results["latency"], "Latency and memory vs pruning x precision"),
                              ("engines", results["engines"], "Quantized engines (.ptl int8)")):
        if not rows:
            continue
        lines += ["", f"**{title}**", ""]
        lines += _table(rows, [
            ("model", lambda r: r["model"]), ("pruned", _num("ratio", ".4g", 100)),
            ("params", _num("params", ".1f", 1e-6)), ("variant", lambda r: r["variant"]),
            ("median ms", _num("median_ms", ".2f")), ("p90 ms", _num("p90_ms", ".2f")),
            ("size MB", _num("size_mb", ".1f")), ("peak RSS MB", _num("peak_rss_mb", ".0f")),
            ("cosine", _num("cosine", ".4f")), ("GOP/s", _num("achieved_gops", ".0f")),
            ("of host GEMM", _num("fraction_of_host_gemm", ".0%"))])
    for name, rows, title in (("accuracy", results["accuracy"], "Accuracy vs pruning x precision (Fashion-MNIST)"),
                              ("importance", results["importance"], "Importance criteria at equal pruning")):
        if not rows:
            continue
        lines += ["", f"**{title}**", ""]
        lines += _table(rows, [
            ("importance", lambda r: r["importance"]), ("pruned", _num("ratio", ".4g", 100)),
            ("params", _num("params", ".2f", 1e-6)), ("MACs", _num("macs", ".1f", 1e-6)),
            ("steps", lambda r: str(r["steps"])), ("precision", lambda r: r["precision"]),
            ("test acc", _num("test_acc", ".2f", 100)), ("val acc of the file", _num("val_acc", ".2f", 100))])
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`{Path(p).name}`" for p in plots)]
    return "\n".join(lines) + "\n"
