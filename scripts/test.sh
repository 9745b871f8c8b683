#!/usr/bin/env bash
# Set up (idempotent), then lint, type-check and run every test, the real-model ones included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests
mypy
pytest -m "slow or not slow" "$@"
