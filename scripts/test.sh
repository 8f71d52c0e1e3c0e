#!/usr/bin/env bash
# Set up a CPU development environment in .venv (if needed), lint, and run the test suite.
#   bash scripts/test.sh            # install + all tests
#   bash scripts/test.sh -k grpo    # extra arguments go to pytest
set -euo pipefail
source "$(dirname "$0")/setup.sh"

"$VENV/bin/ruff" check motg_fast tests bench scripts examples
"$PY" -m pytest -q "$@"
