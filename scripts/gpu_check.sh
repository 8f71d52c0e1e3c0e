#!/usr/bin/env bash
# The GPU gate: tests marked gpu, the bench suites at the real shapes, one GRPO step of a
# Qwen2.5-1.5B-shaped model, compile_check; a markdown report and a JSON of every figure.
#   bash scripts/gpu_check.sh OUT_DIR                 # at most 8 minutes on one H100/H200
#   bash scripts/gpu_check.sh OUT_DIR --skip compile_check,bench_rollout
#   bash scripts/gpu_check.sh OUT_DIR --full          # every bench case (about 30 minutes)
# Without CUDA it runs what a CPU can (compile_check, the GRPO step on a tiny model), prints
# one "skipped: PART (why)" line per other part and exits 0. Details: scripts/gpu_check.py.
set -euo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: bash scripts/gpu_check.sh OUT_DIR [--skip PART,...] [--full] [--budget S]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export GPU_CHECK_COMMAND="bash scripts/gpu_check.sh $OUT${*:+ $*}"
exec "$PY" scripts/gpu_check.py "$OUT" "$@"
