"""Atomic training checkpoints: weights, optimizer, scheduler, RNG states and step.

Layout of a run directory:

    run_dir/checkpoints/step-000040/
        model/               `save_pretrained` weights (safetensors) + tokenizer + config
        trainer_state.pt     optimizer, scheduler, RNG states, step
        COMPLETE             written last

A checkpoint is written into a temporary sibling folder and renamed into place, so a crash
mid-write never leaves a half-written `step-*` folder; the last good one stays usable.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    trainer_state: dict,
    *,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically; keep only the newest `keep` checkpoints."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model.save_pretrained(tmp / MODEL_DIR, safe_serialization=True)
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


def latest_checkpoint(run_dir: Path) -> LoadedCheckpoint:
    """The newest complete checkpoint of `run_dir`, read; a clear error if there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume: run directory {run_dir} does not exist")
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"cannot resume: {run_dir} holds no complete checkpoint")
    path = found[-1]
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem
        raise CheckpointError(f"cannot resume: {path / STATE_FILE} is unreadable ({exc})") from exc
    if not (path / MODEL_DIR / "config.json").exists():
        raise CheckpointError(f"cannot resume: {path / MODEL_DIR} holds no model")
    return LoadedCheckpoint(path=path, step=int(state["step"]), state=state)
