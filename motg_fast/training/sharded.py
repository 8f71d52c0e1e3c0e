"""Sharded checkpoints under FSDP2: every process writes and reads its own shards of the
policy and of the optimizer state with `torch.distributed.checkpoint` (DCP).

A checkpoint of an FSDP2 run holds, beside what every checkpoint holds (the consolidated
Hugging Face model in `model/`, which `--model RUN_DIR`, `evaluate` and plain transformers
load, and the trainer state), a `sharded/` folder: DCP's files of the model and optimizer
state dicts (`torch.distributed.checkpoint.state_dict`). All processes write into the
checkpoint's temporary folder before the main process commits it by one rename, so a
checkpoint is atomic as in one process: a write killed on any process leaves no checkpoint
behind, and the previous one stays the newest.

A resume needs the run's process count: the global batch is `prompts_per_step` per
process, so another count would change the experiment; it is refused in one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

SHARDED_DIR = "sharded"
METADATA = ".metadata"  # DCP's index of the shards, written last by the coordinator


def is_sharded(accelerator) -> bool:
    """Whether the run's policy is sharded by FSDP2."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def staging_dir(run_dir: Path, step: int) -> Path:
    """The temporary folder every process writes a sharded checkpoint `step` into (the
    same path on every process; committed by `save_checkpoint`)."""
    return Path(run_dir) / "checkpoints" / f".step-{step:06d}.sharded"


def inner_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper (itself when not wrapped)."""
    return getattr(optimizer, "optimizer", optimizer)


def free_optimizer_state(optimizer) -> None:
    """Free the gradients and the optimizer's state (AdamW: 2x the weights), e.g. after
    the last step, before the final evaluation (the last checkpoint holds them)."""
    optimizer.zero_grad(set_to_none=True)
    inner_optimizer(optimizer).state.clear()


def _state(scorer: torch.nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(scorer, inner_optimizer(optimizer))
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(accelerator, scorer: torch.nn.Module, optimizer, run_dir: Path, step: int):
    """Every process writes its shards of `scorer` and `optimizer` into the staging folder
    of `step` (a collective); returns that folder (None without FSDP2)."""
    if not is_sharded(accelerator):
        return None
    import torch.distributed.checkpoint as dcp

    staging = staging_dir(run_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / SHARDED_DIR).mkdir(parents=True)
    accelerator.wait_for_everyone()
    dcp.save(_state(scorer, optimizer), checkpoint_id=str(staging / SHARDED_DIR))
    accelerator.wait_for_everyone()
    return staging


def load_sharded(scorer: torch.nn.Module, optimizer, checkpoint: Path) -> None:
    """Load the policy's and the optimizer's shards of `checkpoint` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(scorer, optimizer)
    dcp.load(state, checkpoint_id=str(Path(checkpoint) / SHARDED_DIR))
    set_state_dict(
        scorer,
        inner_optimizer(optimizer),
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )


def check_resumable(state: dict, world_size: int, sharded: bool) -> None:
    """One-line errors for a resume whose process count or sharding differs from the run's."""
    saved = state.get("world_size")  # absent in checkpoints written before it was kept
    if saved is not None and int(saved) != world_size:
        raise ValueError(
            f"cannot resume a run of {saved} process(es) with {world_size}: the global batch "
            f"is prompts_per_step per process; launch {saved} process(es)"
        )
    saved_sharded = "optimizer" not in state
    if saved_sharded != sharded:
        kind = "sharded (FSDP2)" if saved_sharded else "unsharded"
        raise ValueError(
            f"cannot resume: the checkpoint's optimizer state is {kind}; resume "
            + ("under FSDP2 (--use_fsdp --fsdp_version 2)" if saved_sharded else "without FSDP2")
        )


def check_sharded_files(path: Path) -> str | None:
    """What is wrong with a checkpoint's `sharded/` folder (None: complete or absent)."""
    folder = Path(path) / SHARDED_DIR
    if folder.exists() and not (folder / METADATA).is_file():
        return f"{folder} has no {METADATA} (an incomplete sharded write)"
    return None
