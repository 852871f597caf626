"""The headline ratios (this is ``pqv headline`` with the results in ``benchmarks/results``; the code is
``pqv_lightning.apps.headline``), measured again and again: how far the fastest int8 file of pruned DeiT-base is
from the unpruned fp32 eager timm model, as a spread over independent runs instead of one number.

One round-robin (``pqv_lightning.export.benchmark.round_robin``: every candidate in a fresh process,
visited in turn) gives one ratio, and this VM's speed drifts by 10-30 % between runs. So this script
exports once, with ``export_mobile``'s defaults (what ``MobileExport`` gives a user: widths padded for
OpenVINO where that is cheap), and then repeats a short, independent round-robin ``--repeats`` times:
the unpruned fp32 eager baseline and every int8 file of every pruning ratio, in the same run each
time. Each repeat's ratios come from its own run; the report gives every repeat, the median and the
range over repeats, how many repeats met each target of issue 13, and the host's load seen by the
round-robin's contention guard (measurements taken while other work kept more than 0.2 CPUs busy are
retaken). Repeats are cached one by one in ``benchmarks/results/<name>.json``: an interrupted run
continues where it stopped.

``--heads-ratios``: pruning ratios also exported with whole attention heads removed (every kept head
stays 64 wide) instead of dimensions inside every head (``PruningConfig``'s default), timed in the
same round-robins, so that the two width rules meet the same baseline. Whole heads are OpenVINO's
width rule: what ``StructuredPruning(widths_for="openvino")`` prunes by default.

Targets (issue 13, same run): 25 %-pruned + int8 >= 9x, 9.375 % (the paper's configuration) + int8
>= 7.18x, and the fastest file <= 0.85x the latency of the fastest ONNX Runtime int8 file.

    python benchmarks/headline.py                    # export (~15 min on 2 cores), then 8 repeats (~15 min)
    python benchmarks/headline.py --repeats 12       # more repeats, reusing the cached ones
    python benchmarks/headline.py --heads-ratios 0.25  # also 25 % with whole heads pruned, in the same runs
    python benchmarks/headline.py --heads-ratios 0.09375 0.25 --repeats 8 --name headline_openvino_rule
    python benchmarks/headline.py --report-only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pqv_lightning.apps.headline import add_headline_arguments, run_headline

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_headline_arguments(ap)
    ap.set_defaults(results=str(OUT))
    sys.exit(run_headline(ap.parse_args()))


if __name__ == "__main__":
    main()
