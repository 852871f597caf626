"""Wall time and peak memory of ``pqv`` answering without doing work: ``--help`` and argument errors.

Each command runs in a fresh process, ``--repeats`` times after one warm-up run (so the files are in
the page cache), alternating between the commands; the table reports the median and the range of
wall time and the median peak RSS. ``import torch`` alone is measured the same way, as the scale.

    python benchmarks/cli_startup.py                      # -> benchmarks/results/cli_startup.{json,md}
    python benchmarks/cli_startup.py --repeats 5 --name cli_startup_quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pqv_lightning.export.host import cpu_count_text, host_description, host_label
from pqv_lightning.fileio import atomic_write_text

RESULTS = Path(__file__).parent / "results"

COMMANDS = {
    "pqv --help": ["-m", "pqv_lightning", "--help"],
    "pqv demo --ratio abc (argument error)": ["-m", "pqv_lightning", "demo", "--ratio", "abc"],
    "pqv bench --shape abc x.pte (argument error)": ["-m", "pqv_lightning", "bench", "--shape", "abc", "x.pte"],
    "pqv demo --help (imports the registries for the choices)": ["-m", "pqv_lightning", "demo", "--help"],
    "python -c 'import torch' (scale)": ["-c", "import torch"],
}


def run_once(args: list[str]) -> float:
    """Wall seconds of one fresh ``python args`` process."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], capture_output=True, check=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--name", default="cli_startup")
    args = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    peaks: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for cmd in COMMANDS.values():
        run_once(cmd)  # warm-up: files in the page cache
    for _ in range(args.repeats):
        for label, cmd in COMMANDS.items():  # alternating: a slow phase of the host hits every command alike
            times[label].append(run_once(cmd))
    for label, cmd in COMMANDS.items():  # peak RSS: one separate process each (RUSAGE_CHILDREN is a maximum)
        code = (
            f"import resource, subprocess, sys; subprocess.run([sys.executable, *{cmd!r}], capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peaks[label].append(int(out.stdout.strip()) / 1024)
    host = host_description()
    rows = [
        {
            "command": label,
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "peak_rss_mib": peaks[label][0],
            "repeats": len(t),
        }
        for label, t in times.items()
    ]
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{args.name}.json", json.dumps({"host": host, "rows": rows}, indent=1))
    lines = [
        "# pqv start-up: answers that need no work\n",
        f"Host: {host_label(host)}, {cpu_count_text(host)}; torch {host.get('torch')}; "
        f"{args.repeats} fresh processes per command after one warm-up, alternating. "
        f"Command: `python benchmarks/cli_startup.py --repeats {args.repeats} --name {args.name}`.\n",
        "| command | median s | range s | peak RSS MiB |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| `{r['command']}` | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | {r['peak_rss_mib']:.0f} |"
        for r in rows
    ]
    atomic_write_text(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
