#!/usr/bin/env bash
# Set up pqv-lightning on a fresh Debian/Ubuntu machine: the Fashion-MNIST Debian package and a
# virtual environment in .venv with the package (editable), its test dependencies and the
# executorch, onnx and openvino extras (export targets; about 800 MB of wheels) and the hf extra
# (Hugging Face transformers, for its vision models).
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup.sh: install Fashion-MNIST yourself and set PQV_FMNIST_DIR (apt-get not found)" >&2
  fi
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import pqv_lightning, pytest, pytest_timeout, mypy, ruff, executorch, torchao, onnxruntime, onnxscript, openvino, nncf, transformers" \
     >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.pqv-installed ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev,executorch,onnx,openvino,hf]'
  touch .venv/.pqv-installed
fi
