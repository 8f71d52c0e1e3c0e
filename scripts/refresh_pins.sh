#!/usr/bin/env bash
# Move the pins in constraints-cpu.txt to the newest releases, if the test suite passes.
#   bash scripts/refresh_pins.sh              # fresh venv in .venv-latest, newest releases
#   bash scripts/refresh_pins.sh -k golden    # extra arguments go to pytest
# Resolves every dependency anew (only torch stays at the CPU build named in the pins),
# runs lint and the whole suite against it, and rewrites constraints-cpu.txt only when
# both pass; otherwise the pins stay and the failure is printed (finding breakage here is
# the point: the pinned path of setup.sh is unaffected). The candidate freeze is kept in
# .venv-latest/constraints-candidate.txt either way.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-latest
rm -rf "$VENV"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH=$(grep -E '^torch==' constraints-cpu.txt)
printf '%s\n' "$TORCH" > "$VENV/torch-only.txt"
MOTG_VENV=$VENV MOTG_PINS="$VENV/torch-only.txt" bash scripts/setup.sh
CANDIDATE="$VENV/constraints-candidate.txt"
{
    echo "# The CPU install the test suite last passed with (python $("$PY" -c 'import platform; print(platform.python_version())'), $(date -u +%F))."
    echo "# Written by: bash scripts/refresh_pins.sh. Used by scripts/setup.sh as pip constraints."
    "$PY" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+cpu$/\1/'
} > "$CANDIDATE"
if "$VENV/bin/ruff" check motg_fast tests bench scripts examples && "$PY" -m pytest -q "$@"; then
    cp "$CANDIDATE" constraints-cpu.txt
    echo "refresh_pins: suite passed; constraints-cpu.txt now pins the newest releases"
else
    echo "refresh_pins: the newest releases fail the suite; constraints-cpu.txt unchanged" >&2
    exit 1
fi
