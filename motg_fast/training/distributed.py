"""Processes: the run's `Accelerator`, and FSDP2 support (full parameters for code that
reads the policy outside its forward).

Under `accelerate launch --use_fsdp --fsdp_version 2`, accelerate shards the prepared
`PolicyScorer` with `torch.distributed.fsdp.fully_shard`: between forwards each process
holds only its shard of every parameter (a `DTensor`), and a unit's full parameters exist
only inside that unit's forward. The training forward goes through the scorer's forward,
so the root unit gathers everything it owns there, the input embedding and LM-head weights
included (`score_trajectories` reads them directly, not through their modules' forward;
they stay in the root unit because the scorer does not expose `get_input_embeddings`).

Everything else reads the policy without the scorer's forward: the rollout engine (it calls
the decoder and reads the embedding and LM-head weights itself), the old log-likelihoods
and their frozen embedding rows, the held-out evaluation, and checkpoint saving.
`full_parameters` all-gathers the sharded parameters around such code, `full_state_dict`
gathers the weights for a checkpoint. Without FSDP2 both do nothing.

Every process must enter them together (all-gathers are collectives). With nested units
(e.g. `--fsdp_transformer_layer_cls_to_wrap`) a unit whose forward runs inside the block
reshards at its end as usual and gathers again on its next forward: correct, not fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate import Accelerator

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch without FSDP2
    FSDPModule = None


def fsdp_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 units in `module` (itself first when it is one); empty without FSDP2."""
    if FSDPModule is None:
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Every parameter under `module` unsharded (plain tensors) inside the block.

    `module` is the prepared module (the FSDP root, e.g. the trainer's `scorer`); code in
    the block may use any of its submodules and weights directly. A no-op without FSDP2.
    """
    units = fsdp_units(module)
    if not units:
        yield
        return
    if len(units) > 1:
        # The first unit to run forward becomes FSDP's root; a decoder layer called
        # directly (by the engine) must not claim it before the real root ran.
        units[0]._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as a plain tensor: a `DTensor` (e.g. FSDP2's gradient norm) gathered whole."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_state_dict(accelerator, scorer: torch.nn.Module) -> dict | None:
    """The policy's full weights for a checkpoint under FSDP2 (keys of the wrapped model),
    None otherwise. A collective: every process calls it; the main process gets the
    tensors (on the CPU)."""
    if not getattr(accelerator, "is_fsdp2", False):
        return None
    state = accelerator.get_state_dict(scorer)
    return {key.removeprefix("model."): value for key, value in state.items()}


def tracker_config(config) -> dict:
    """The config as trackers take it: numbers, strings and booleans (others as text)."""
    scalar = (int, float, str, bool)
    return {k: v if isinstance(v, scalar) else str(v) for k, v in config.to_dict().items()}


def make_accelerator(
    device: str, report_to: str = "none", run_dir: str | None = None
) -> Accelerator:
    """The run's `Accelerator`: `auto` (CUDA with bf16 autocast when present), `cpu` or `cuda`.

    One process per GPU is accelerate's to place (`accelerate launch`); a GPU index is
    chosen with `CUDA_VISIBLE_DEVICES`, not `--device cuda:N`.
    """
    from ..models import resolve_device

    if device not in ("auto", "cpu", "cuda"):
        resolve_device(device)  # an unknown name: its own one-line error
        raise ValueError(
            f"--device {device} is not supported for training: each process uses the GPU "
            "accelerate gives it; pick GPUs with CUDA_VISIBLE_DEVICES (e.g. "
            "CUDA_VISIBLE_DEVICES=1) and --device cuda or auto"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    trackers = [t for t in report_to.split(",") if t and t != "none"] or None
    return Accelerator(
        cpu=not use_cuda,
        mixed_precision="bf16" if use_cuda else "no",
        log_with=trackers,
        project_dir=run_dir,
    )
