"""Atomic training checkpoints: weights, optimizer, scheduler, RNG states and step.

Layout of a run directory:

    run_dir/checkpoints/step-000040/
        model/               `save_pretrained` weights (safetensors) + tokenizer + config
        trainer_state.pt     optimizer, scheduler, RNG states, step
        COMPLETE             written last

A checkpoint is written into a temporary sibling folder (`.step-*`) and renamed into place,
so a crash mid-write never leaves a half-written `step-*` folder; the last good one stays
usable, and the temporary folder of an interrupted write is removed by the next save or
resume (`remove_stale_writes`). Reading checks every file a resume needs (the trainer state,
the model config and the header of every safetensors shard); a newest checkpoint that fails
is skipped, with one line saying so, for the newest one that passes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .sharded import check_sharded_files

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or cannot be read."""


def rng_state() -> dict:
    """Every random state a run uses: Python, NumPy, torch CPU and CUDA."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# What a training run writes into its run directory (`--overwrite` deletes exactly these).
RUN_OUTPUTS = (
    "config.json",
    "metrics.jsonl",
    "plots",
    "checkpoints",
    "eval_before.json",
    "eval_after.json",
    "heldout.json",
    "report.md",
)


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, main: bool = True) -> None:
    """Check `run_dir` before any slow work: one-line `ValueError`s for a path that is a
    file or not writable, and for a new run in a directory that holds a previous one
    (unless `overwrite`, which deletes that run's outputs; the main process does that).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--run_dir {run_dir} is a file, not a directory")
    if resume and not run_dir.exists():
        return  # resuming says the rest (`latest_checkpoint`)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise ValueError(f"--run_dir {run_dir} is not writable ({err.strerror or err})") from None
    previous = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if resume or not previous or not main:
        return
    if not overwrite:
        raise ValueError(
            f"--run_dir {run_dir} already holds a run ({', '.join(previous)}): continue it with "
            "--resume, start over with --overwrite (deletes it), or choose another --run_dir"
        )
    for name in previous:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder `…/step-NNNNNN`."""
    return int(_STEP_DIR.match(Path(path).name).group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=checkpoint_step)


def remove_stale_writes(run_dir: Path) -> list[Path]:
    """Delete the temporary folders of interrupted checkpoint writes; returns what went."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted(root.glob(".step-*")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    trainer_state: dict,
    *,
    keep: int = 2,
    state_dict: dict | None = None,
    staging: Path | None = None,
) -> Path:
    """Write checkpoint `step` atomically; keep only the newest `keep` checkpoints.

    `state_dict`: the model's weights when `model.state_dict()` does not hold them all
    (FSDP2 shards, see `motg_fast.distributed.full_state_dict`). `staging`: a temporary
    folder that already holds part of the checkpoint (every process's shards:
    `motg_fast.training.sharded`), completed and committed here.
    """
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        remove_stale_writes(run_dir)
    tmp = staging or Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model.save_pretrained(tmp / MODEL_DIR, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / MODEL_DIR)
        torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict  # trainer state (optimizer, scheduler, rng, step, ...)

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR


def read_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read one checkpoint, checking every file a resume needs; `CheckpointError` naming the
    first bad file otherwise."""
    state_file = path / STATE_FILE
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem
        raise CheckpointError(f"{state_file} is unreadable ({_first_line(exc)})") from exc
    problem = check_sharded_files(path)
    if problem:
        raise CheckpointError(problem)
    model_dir = path / MODEL_DIR
    if not (model_dir / "config.json").exists():
        raise CheckpointError(f"{model_dir} holds no model")
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{model_dir} holds no safetensors weights")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt
            raise CheckpointError(f"{shard} is unreadable ({_first_line(exc)})") from exc
    return LoadedCheckpoint(path=path, step=int(state["step"]), state=state)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def latest_checkpoint(run_dir: Path) -> LoadedCheckpoint:
    """The newest readable complete checkpoint of `run_dir`; a clear error if there is none.

    A newer checkpoint that cannot be read is skipped with a one-line warning.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume: run directory {run_dir} does not exist")
    remove_stale_writes(run_dir)
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"cannot resume: {run_dir} holds no complete checkpoint")
    problems = []
    for path in reversed(found):
        try:
            loaded = read_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        for problem in problems:
            print(f"warning: skipping a damaged checkpoint: {problem}", file=sys.stderr)
        return loaded
    raise CheckpointError(
        f"cannot resume: {problems[0]}"
        + (
            f" (and {len(problems) - 1} older checkpoint(s) are damaged too)"
            if len(problems) > 1
            else ""
        )
    )
