"""Issue 33: how the headline ratio moves on a host that is not what it says: fewer cores than logical
CPUs, or int8 kernels without AMX.

An outside run on a 2-vCPU Xeon with AMX measured the unpruned fp32 eager baseline 2.2x slower and the
fastest int8 file 4x slower than ``pqv headline``'s runs on a host of the same name (5.4x instead of
9.76x). Two host facts could do that: two vCPUs that are the hyperthreads of one core, and an int8
runtime that does not get AMX. This script reproduces both on the host it runs on, so one run
measures how each moves the baseline, every int8 file and their ratio: the unpruned fp32 eager timm
model and every int8 file of a ``pqv headline`` folder, round-robin (every call in a fresh process,
``export.benchmark.round_robin``), under these conditions, alternating repeat by repeat:

* ``2 threads on 2 CPUs``: what ``pqv headline`` measures (the reference);
* ``1 thread on 1 CPU``: one core's worth, about what two hyperthreads of one core give a
  compute-bound GEMM;
* ``2 threads on 1 CPU``: both threads time-sliced on one CPU (``os.sched_setaffinity`` of the timing
  processes), the worst case: a runtime's thread pool waits for a thread that is not running
  (``round_robin`` warns about exactly this: more threads than usable CPUs);
* ``2 threads on 2 CPUs, oneDNN ISA <= X`` (on a host with AMX by default, X = ``AVX512_CORE_BF16``:
  no AMX; ``--isa-cap`` picks X anywhere): ``ONEDNN_MAX_CPU_ISA`` for the timing processes. OpenVINO's
  CPU plugin and torch's oneDNN kernels honour it; ONNX Runtime (MLAS) and XNNPACK do not, so their
  files are a control. The OpenVINO GEMM kernels each condition ran on are recorded.

Per condition the report gives each file's median, its slowdown against the reference, and its
ratio to the baseline of the same condition and repeat (the paired ratio of their round medians):
whether the int8 files lose more than the fp32 baseline, i.e. whether such a host lowers the
headline ratio, not only the absolute times.

    python benchmarks/host_conditions.py --headline runs/headline/25pct      # ~20 min on 2 cores
    python benchmarks/host_conditions.py --headline runs/headline/25pct --isa-cap AVX512_CORE_VNNI
    python benchmarks/host_conditions.py --report-only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from outside_method import headline_files, saved_unpruned  # benchmarks/ is the script's directory: on sys.path

from pqv_lightning.export.benchmark import Candidate, paired_ratio, round_robin
from pqv_lightning.export.host import cpu_count_text, host_description, host_label
from pqv_lightning.fileio import JsonCache, atomic_write_text
from pqv_lightning.hostcpu import cpu_times, steal_fraction

OUT = Path(__file__).parent / "results"
BASELINE = "unpruned | fp32 eager"
REFERENCE = "2 threads on 2 CPUs"
NO_AMX = "AVX512_CORE_BF16"  # oneDNN's ISA level just below AVX512_CORE_AMX


@dataclass(frozen=True)
class Condition:
    threads: int  # each runtime is told to use this many
    cpus: int  # the timing processes may run on the first this many CPUs
    env: dict[str, str] = field(default_factory=dict)


def conditions(isa_cap: str | None) -> dict[str, Condition]:
    out = {REFERENCE: Condition(2, 2), "1 thread on 1 CPU": Condition(1, 1), "2 threads on 1 CPU": Condition(2, 1)}
    if isa_cap:
        out[f"{REFERENCE}, oneDNN ISA <= {isa_cap}"] = Condition(2, 2, {"ONEDNN_MAX_CPU_ISA": isa_cap})
    return out


@contextlib.contextmanager
def _applied(condition: Condition):
    """The timing processes (children inherit both) run on the first ``condition.cpus`` CPUs this one
    may use, with ``condition.env`` added to the environment."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < condition.cpus:
        raise SystemExit(f"this process may run on {len(allowed)} CPU(s) {allowed}; a condition needs {condition.cpus}")
    saved = {k: os.environ.get(k) for k in condition.env}
    os.sched_setaffinity(0, allowed[: condition.cpus])
    os.environ.update(condition.env)
    try:
        yield allowed[: condition.cpus]
    finally:
        os.sched_setaffinity(0, allowed)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kernels(folder: Path, condition: Condition) -> dict | str:
    """OpenVINO's GEMM kernels per IR of ``folder`` under ``condition``, read in a fresh process (oneDNN
    reads ``ONEDNN_MAX_CPU_ISA`` once); the error's last line where the plugin cannot compile there."""
    code = (
        "import json, sys\nfrom pqv_lightning.export.openvino_target import ir_gemm_kernels\n"
        "print(json.dumps(ir_gemm_kernels(sys.argv[1], json.loads(sys.argv[2]), [1, 3, 224, 224], int(sys.argv[3]))))"
    )
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.xml"))  # one process for all
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder), json.dumps(files), str(condition.threads)],
        capture_output=True,
        text=True,
        env={**os.environ, **condition.env},
    )
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]
    return json.loads(proc.stdout)


def _candidates(args) -> list[Candidate]:
    return [Candidate(BASELINE, str(saved_unpruned(args.work, args.model))), *headline_files(args.headline)]


def _measure(args, cache: JsonCache, todo: dict[str, Condition]) -> None:
    candidates = _candidates(args)
    names = list(todo)
    for name, condition in todo.items():
        if cache.get(f"kernels/{name}") is None:
            cache.put(f"kernels/{name}", _kernels(args.headline, condition))
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]  # each condition goes first once
        for name in order:
            key = f"{repeat}/{name}"
            if cache.get(key) is not None:
                continue
            before = cpu_times()
            with _applied(todo[name]) as pinned:
                stats = round_robin(
                    candidates,
                    [1, 3, 224, 224],
                    threads=todo[name].threads,
                    rounds=args.rounds,
                    warmup=args.warmup,
                    calls=args.calls,
                    baseline=BASELINE,
                    progress=lambda r, label, name=name: print(f"  {name}, round {r + 1}: {label}", flush=True),
                )
            steal = steal_fraction(before, cpu_times())
            cache.put(key, {"stats": stats, "cpus": pinned, "threads": todo[name].threads, "steal": steal})
            print(f"repeat {repeat + 1}/{args.repeats}, {name}: baseline {stats[BASELINE]['median_ms']:.1f} ms")
    cache.put("host", host_description())
    settings = {"rounds": args.rounds, "calls": args.calls, "warmup": args.warmup, "headline": str(args.headline)}
    cache.put("settings", {**settings, "isa_cap": args.isa_cap})


def _rows(cache: JsonCache) -> dict[str, dict[str, dict[str, list[float]]]]:
    """condition -> file -> {"ms": each repeat's median, "x": each repeat's paired ratio to the baseline}."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for key, run in cache.data.items():
        head, _, name = key.partition("/")
        if not head.isdigit():
            continue
        base = run["stats"][BASELINE]["round_medians_ms"]
        for label, s in run["stats"].items():
            row = out.setdefault(name, {}).setdefault(label, {"ms": [], "x": []})
            row["ms"].append(s["median_ms"])
            row["x"].append(paired_ratio(base, s["round_medians_ms"]))
    return out


def _spread(values: list[float], fmt: str) -> str:
    mid = statistics.median(values)
    if len(values) == 1:
        return format(mid, fmt)
    return f"{format(mid, fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def _report(cache: JsonCache) -> str:
    host, settings = cache.get("host"), cache.get("settings")
    if host is None:
        return "nothing measured yet"
    rows = _rows(cache)
    ref = rows[REFERENCE]
    steals = [
        run["steal"] for key, run in cache.data.items() if key.partition("/")[0].isdigit() and run["steal"] is not None
    ]
    lines = [
        f"`python benchmarks/host_conditions.py --headline {settings['headline']}"
        + ("" if settings.get("isa_cap", "auto") == "auto" else f" --isa-cap {settings['isa_cap']}")
        + f"` — {host_label(host)}, "
        f"{cpu_count_text(host)}, torch ISA {host.get('torch_isa')}, clock {host.get('mhz', '-')} MHz, steal "
        + (f"{100 * max(steals):.1f} % at most" if steals else "-")
        + f"; each condition a round-robin of {settings['rounds']} rounds x {settings['calls']} calls per repeat "
        "(every candidate in a fresh process), batch 1, 224². Values: median over repeats (range).",
        "",
        "| file | condition | repeats | ms | slowdown vs 2 threads on 2 CPUs | x unpruned fp32 eager (same condition) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    order = sorted(ref, key=lambda label: (label != BASELINE, statistics.median(ref[label]["ms"])))
    for label in order:
        for name, per_file in rows.items():
            row = per_file.get(label)
            if row is None:
                continue
            slow = [a / b for a, b in zip(row["ms"], ref[label]["ms"], strict=False)]
            x = "1.00x" if label == BASELINE else _spread(row["x"], ".2f") + "x"
            cell = label.replace("|", "\\|")  # a label's own "|" would end the table cell
            lines.append(
                f"| {cell} | {name} | {len(row['ms'])} | {_spread(row['ms'], '.1f')} | {_spread(slow, '.2f')}x | {x} |"
            )
    lines += ["", "The fastest int8 file per condition (by median ms) and its ratio to the baseline:", ""]
    for name, per_file in rows.items():
        files = {k: v for k, v in per_file.items() if k != BASELINE}
        best = min(files, key=lambda k: statistics.median(files[k]["ms"]))
        kernels = cache.get(f"kernels/{name}")
        if isinstance(kernels, dict):
            ran = "; ".join(f"{f}: " + ", ".join(f"{k} x{n}" for k, n in per.items()) for f, per in kernels.items())
        else:
            ran = f"not compiled: {kernels}" if kernels else "not recorded"
        lines.append(f"- {name}: {best}, {_spread(files[best]['x'], '.2f')}x. OpenVINO's GEMM kernels: {ran}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--headline", type=Path, help="a pqv headline pruned folder, e.g. runs/headline/25pct")
    ap.add_argument("--model", default="deit_base_patch16_224", help="the unpruned baseline (random weights)")
    ap.add_argument(
        "--isa-cap",
        default="auto",
        help=f"ONEDNN_MAX_CPU_ISA of the capped condition; 'auto': {NO_AMX} (no AMX) where the CPU has AMX, "
        "else no such condition; 'none': never",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--work", default="runs/host_conditions", help="where the baseline's saved module is kept")
    ap.add_argument("--name", default="host_conditions")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    cache = JsonCache(OUT / f"{args.name}.json")
    if not args.report_only:
        if args.headline is None:
            ap.error("--headline DIR is needed to measure (a pqv headline pruned folder, e.g. runs/headline/25pct)")
        cap = args.isa_cap
        if cap == "auto":
            cap = NO_AMX if "amx_int8" in host_description()["isa"] else None
        _measure(args, cache, conditions(None if cap == "none" else cap))
    report = _report(cache)
    atomic_write_text(OUT / f"{args.name}.md", report)
    print(report)


if __name__ == "__main__":
    main()
