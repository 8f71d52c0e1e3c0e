"""Train a policy with GRPO in the mixture space (MoT-G) or with discrete tokens.

examples:
  python -m motg_fast.train                         # the default model, an easy task, CPU
  python -m motg_fast.train --method multiplex --steps 50
  python -m motg_fast.train --preset paper --tasks acre --model Qwen/Qwen2.5-1.5B-Instruct
  accelerate launch -m motg_fast.train --preset paper --tasks acre   # one process per GPU
  python -m motg_fast.train --run_dir runs/motg --resume            # continue a run

Every run writes config.json, metrics.jsonl, plots/*.png, the held-out evaluations and
checkpoints under --run_dir.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence

from .cli import parse_config, run_cli
from .config import PARTS as ALL_PARTS
from .training.checkpoint import CheckpointError

PARTS = tuple(ALL_PARTS)  # every part: a run needs them all
EXTRAS: tuple[type, ...] = ()


def _interrupt(signum, frame) -> None:
    """SIGTERM ends a run as Ctrl-C does: a checkpoint write in progress is cleaned up."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Parse the command line, train, and print where the results are."""
    from .training.trainer import Trainer

    config = parse_config(argv, parts=PARTS, prog="python -m motg_fast.train", description=__doc__)
    start = time.monotonic()
    trainer = Trainer(config)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        records = trainer.train()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"continue from the last checkpoint with --run_dir {config.run_dir} --resume"
        ) from None
    finally:  # a second SIGTERM while exiting ends the process plainly
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if trainer.accelerator.is_main_process and records:
        last = records[-1]
        print(
            f"step {last['step']}: reward {last['reward']:.3f}, accuracy {last['correct']:.3f}; "
            f"run written to {config.run_dir} ({(time.monotonic() - start) / 60:.1f} min)",
            file=sys.stderr,
        )
    return records


if __name__ == "__main__":
    sys.exit(run_cli(main, expected=(ValueError, CheckpointError, FileNotFoundError)))
