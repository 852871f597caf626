#!/usr/bin/env bash
# The CUDA checks (tests marked `cuda`, tests/test_cuda.py): StructuredPruning on a GPU under 16-mixed
# (GradScaler) and bf16-mixed with an event mid-fit, statistics and MAC counting on the device, resume,
# and MobileExport of a CUDA-trained module. A few minutes on one GPU.
#   bash scripts/gpu_checks.sh            # uses .venv/bin/python if present, else $PYTHON or python3
# Writes the log to ${GPU_CHECKS_LOG:-runs/gpu_checks.log}; exits non-zero if a check fails or no GPU is seen
# (without a GPU the tests would all be skipped, which proves nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"; [ -x .venv/bin/python ] && PY=.venv/bin/python
LOG="${GPU_CHECKS_LOG:-runs/gpu_checks.log}"
mkdir -p "$(dirname "$LOG")"
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__); assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name(0))"
  PYTHONPATH=src WANDB_MODE=disabled "$PY" -m pytest -m cuda -v -rs -p no:cacheprovider tests/test_cuda.py
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
