#!/usr/bin/env bash
# Run the README's first command exactly as a new user would: in a fresh clone of this repository in
# an empty temporary folder (no ../shared beside it), timed. Prints the demo's output and the wall time,
# and fails unless the demo used the bundled checkpoint and ended at >= 85 % test accuracy in <= 10 min
# (the setup's own time is reported apart).
#   bash scripts/fresh_clone_demo.sh [extra pqv demo arguments]
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$src" "$work/pqv-lightning"
cd "$work/pqv-lightning"
[ ! -e ../shared ] || { echo "fresh_clone_demo: $work/shared exists" >&2; exit 1; }
unset PQV_FMNIST_CHECKPOINT
t0=$(date +%s)
bash scripts/setup.sh
t1=$(date +%s)
.venv/bin/pqv demo "$@" | tee demo.log
t2=$(date +%s)
echo "setup: $((t1 - t0)) s; pqv demo: $((t2 - t1)) s ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs)"
grep -q "checkpoint: $work/pqv-lightning/src/pqv_lightning/assets/vit_tiny_fmnist.pt" demo.log
.venv/bin/python - "$((t2 - t1))" <<'PY'
import json, sys
rows = json.load(open("runs/demo_plots/demo_results.json"))["finetune"]
acc, seconds = rows[-1]["test_acc"], int(sys.argv[1])
print(f"pretrained {100 * rows[0]['test_acc']:.2f} % -> pruned {100 * acc:.2f} % in {seconds} s")
assert acc >= 0.85 and seconds <= 600, (acc, seconds)
PY
