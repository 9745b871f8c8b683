#!/usr/bin/env bash
# Set up (idempotent), then run the main job on the bundled defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
dmoe demo "$@"
