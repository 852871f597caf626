"""Publish a finished ``pqv sweep`` run: copy its report, CSV, JSON, plots and finished cells into the
repository and regenerate the sweep section of docs/results.md (between ``<!-- sweep:begin -->`` and
``<!-- sweep:end -->``) from its ``summary.md``.

    .venv/bin/pqv sweep                       # hours; resumable, rerun it to continue
    .venv/bin/python scripts/sweep_to_readme.py --sweep runs/sweep

The published ``cells.jsonl`` lets a later run start from these cells instead of recomputing them
(``mkdir -p runs/sweep && cp benchmarks/results/sweep/cells.jsonl runs/sweep/``): a cell's key holds
every setting that changes its numbers, so only cells of the same settings are reused.

Nothing is measured here: every number comes from the sweep's own files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from pqv_lightning.apps.sweep_report import splice_between_markers
from pqv_lightning.fileio import atomic_write  # temp file + rename: never a half-written file

PUBLISHED = ("results.md", "summary.md", "results.json", "sweep.csv", "cells.jsonl")


def publish(sweep: Path, readme: Path, dest: Path) -> list[Path]:
    missing = [n for n in PUBLISHED if not (sweep / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{sweep}: no {', '.join(missing)} (run `pqv sweep --out {sweep}` to the end first)")
    figures = sorted(sweep.glob("fig*.png"))
    rel = os.path.relpath(dest, readme.parent)
    pictures = "\n".join(f"![{f.stem}]({rel}/{f.name})" for f in figures)
    block = (
        f"{(sweep / 'summary.md').read_text().strip()}\n\n{pictures}\n\nEvery row, with p90, size, cosine and "
        f"GOP/s: [{rel}/results.md]({rel}/results.md) (CSV: [{rel}/sweep.csv]({rel}/sweep.csv))."
    )
    spliced = splice_between_markers(readme.read_text(), block)  # bad markers fail before anything is copied
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for src in [sweep / n for n in PUBLISHED] + figures:
        atomic_write(dest / src.name, lambda tmp, src=src: shutil.copyfile(src, tmp))
        copied.append(dest / src.name)
    atomic_write(readme, lambda tmp: Path(tmp).write_text(spliced))
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", default="runs/sweep", type=Path, help="the pqv sweep output folder")
    parser.add_argument("--readme", default="docs/results.md", type=Path, help="the page with the sweep markers")
    parser.add_argument("--dest", default="benchmarks/results/sweep", type=Path, help="where the files are copied")
    args = parser.parse_args(argv)
    try:
        copied = publish(args.sweep, args.readme, args.dest)
    except (FileNotFoundError, ValueError) as exc:
        print(f"sweep_to_readme: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.readme}: sweep section regenerated; copied {len(copied)} files to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
