#!/usr/bin/env bash
# Set up the CPU environment in .venv (if needed) and run the default training job.
#   bash scripts/train.sh                      # the default job
#   bash scripts/train.sh --method multiplex   # extra arguments go to python -m motg_fast.train
set -euo pipefail
source "$(dirname "$0")/setup.sh"

"$PY" -m motg_fast.train "$@"
