#!/usr/bin/env bash
# Lint, format check and type check: what .ci/run runs before the tests (about 30 s).
# Configured in pyproject.toml ([tool.ruff], [tool.mypy]); `ruff format .` fixes the format.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
