"""PNG plots of demo and benchmark results (matplotlib ``Figure`` objects rendered by Agg; pyplot and
the process-wide backend are never touched, so plotting changes nothing in the caller's process).

Every function takes plain results (dicts, as written to JSON) and a folder, writes PNG files
atomically and returns their paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fileio import atomic_write

__all__ = ["demo_plots", "save_figure", "subplots"]


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **kwargs: Any):
    """``plt.subplots`` without pyplot: a standalone ``Figure`` (no backend switch, no global figure list)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` through a temporary file (never a half-written PNG)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"), suffix=".png")


def demo_plots(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Accuracy vs parameters / MACs before and after pruning, and latency + size per exported file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    rows = results["finetune"]
    fig, axes = subplots(1, 2, figsize=(9, 3.6))
    for ax, key, unit in ((axes[0], "params", "parameters (M)"), (axes[1], "macs", "MACs (M)")):
        xs = [r[key] / 1e6 for r in rows]
        ys = [100 * r["test_acc"] for r in rows]
        ax.plot(xs, ys, "o-", color="tab:blue")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(unit)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("Structured pruning: accuracy vs size")
    paths.append(save_figure(fig, out / "demo_accuracy.png"))
    manifest = results.get("manifest") or {}
    ok = [a for a in manifest.get("artifacts", []) if a.get("status") != "skipped"]
    if ok:
        base = manifest["baseline_fp32_eager"]["latency"]["median_ms"]
        labels = ["fp32 eager"] + [a["file"] for a in ok]
        median = [base] + [a["latency"]["median_ms"] for a in ok]
        p90 = [manifest["baseline_fp32_eager"]["latency"]["p90_ms"]] + [a["latency"]["p90_ms"] for a in ok]
        sizes = [None] + [a["size_bytes"] / 2**20 for a in ok]
        fig, axes = subplots(1, 2, figsize=(10, 0.45 * len(labels) + 1.5), sharey=True)
        ys = list(range(len(labels)))
        axes[0].barh(ys, median, color="tab:green", label="median")
        axes[0].errorbar(
            median,
            ys,
            xerr=[[0] * len(ys), [p - m for p, m in zip(p90, median)]],
            fmt="none",
            ecolor="black",
            capsize=3,
            label="to p90",
        )
        axes[0].set_xlabel("batch-1 latency (ms)")
        axes[0].legend(fontsize=8)
        axes[1].barh(
            [y for y, s in zip(ys, sizes) if s is not None], [s for s in sizes if s is not None], color="tab:orange"
        )
        axes[1].set_xlabel("file size (MB)")
        axes[0].set_yticks(ys, labels, fontsize=8)
        axes[0].invert_yaxis()
        for ax in axes:
            ax.grid(axis="x", alpha=0.3)
        fig.suptitle(f"Exported pruned model ({manifest['host']['threads']} threads)")
        paths.append(save_figure(fig, out / "demo_export.png"))
    return paths
