"""Argument checks shared by the ops: every bad input fails with a message naming it."""

from __future__ import annotations

import math

import torch

SELECTIONS = ("topk", "sample")
WEIGHTINGS = ("prob", "dirichlet", "gumbel")
REPRESENTATIVES = ("sample", "argmax")
LIKELIHOODS = ("token", "weighted", "exact")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_probability(name: str, value: float | None, *, allow_zero: bool) -> None:
    if value is None:
        return
    low_ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and low_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


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


def check_k(k: int, vocab_size: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > vocab_size:
        raise ValueError(f"k={k} exceeds the vocabulary size {vocab_size}")


def check_logits_rows(logits: torch.Tensor) -> None:
    """Reject NaN, +inf and rows with no finite entry (−inf entries are a masked vocabulary)."""
    if torch.isnan(logits).any():
        rows = torch.isnan(logits).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"logits hold NaN in rows {rows[:8]}")
    if torch.isposinf(logits).any():
        rows = torch.isposinf(logits).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"logits hold +inf in rows {rows[:8]}")
    empty = torch.isneginf(logits).all(-1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"logits rows {rows[:8]} have no finite entry")


def check_ids(name: str, ids: torch.Tensor, vocab_size: int, *, check_range: bool = True) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {got}")
    if not check_range or not ids.numel():
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()  # one host sync
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} must lie in [0, {vocab_size}), got range [{low}, {high}]")
