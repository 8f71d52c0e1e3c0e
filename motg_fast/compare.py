"""Compare methods, seeded and compute-matched, with bootstrap confidence intervals.

examples:
  python -m motg_fast.compare                                  # the default arms, 3 seeds
  python -m motg_fast.compare --arms discrete,multiplex,my_arm.yaml --seeds 5 --out runs/cmp
  python -m motg_fast.compare --steps 20 --half_group ""        # training flags are shared

Every arm × seed is a normal training run under --out/runs/<arm>/seed<i>; re-running skips
finished runs and resumes interrupted ones. The arms share the first arm's generated-token
budget (--budget tokens); each --half_group arm also runs with G/2. Writes results.md,
results.json and curves.png in --out (details: motg_fast.evaluation.comparison).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli import parse_config, run_cli
from .evaluation.comparison import (
    CompareOptions,
    analyse,
    plan_runs,
    run_all,
    run_config,
    write_outputs,
)
from .training.checkpoint import CheckpointError

# Every part but the run part, which the comparison sets for each run.
PARTS = ("model", "task", "decoding", "evaluation", "training")
EXTRAS = (CompareOptions,)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse, run every arm × seed (skipping finished runs), analyse and write the results."""
    args = list(sys.argv[1:] if argv is None else argv)
    base, options = parse_config(
        args,
        parts=PARTS,
        extras=EXTRAS,
        prog="python -m motg_fast.compare",
        description=__doc__,
    )
    runs = plan_runs(base, options)
    for run in runs:  # every arm's config is checked before anything runs
        run_config(base, options, run, None)
    Path(options.out).mkdir(parents=True, exist_ok=True)
    summaries = run_all(base, options, runs)
    result = analyse(runs, summaries, base.eval_samples)
    command = "python -m motg_fast.compare " + " ".join(args)
    path = write_outputs(base, options, runs, result, command)
    print(path.read_text())
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, expected=(ValueError, CheckpointError, FileNotFoundError)))
