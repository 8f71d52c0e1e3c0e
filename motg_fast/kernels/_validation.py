"""Argument checks shared by the ops: every bad input fails with a message naming it."""

from __future__ import annotations

import torch


def check_float_matrix(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(present.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in present.items())
        raise ValueError(f"tensors must share one device: {listing}")


def check_logits_rows(logits: torch.Tensor) -> None:
    """Reject NaN, +inf and rows with no finite entry (−inf entries are a masked vocabulary).

    One host sync when the logits are clean; the failing rows are only looked up on error.
    """
    nan, posinf, empty = torch.isnan(logits), torch.isposinf(logits), torch.isneginf(logits)
    bad_rows = torch.stack([nan.any(-1), posinf.any(-1), empty.all(-1)])  # [3,B]
    if not bool(bad_rows.any()):
        return
    problems = (
        "logits hold NaN in rows {}",
        "logits hold +inf in rows {}",
        "logits rows {} have no finite entry",
    )
    for rows, problem in zip(bad_rows, problems):
        if bool(rows.any()):
            raise ValueError(problem.format(rows.nonzero().flatten().tolist()[:8]))


def check_ids(name: str, ids: torch.Tensor, vocab_size: int, *, check_range: bool = True) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {got}")
    if not check_range or not ids.numel():
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()  # one host sync
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} must lie in [0, {vocab_size}), got range [{low}, {high}]")
