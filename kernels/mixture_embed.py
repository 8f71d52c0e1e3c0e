"""Mixture embedding: the input a MoT-G position feeds back to the model.

Math: `e_n = Σ_j w_nj E[ids_nj]` for embedding `E [V,H]`, ids `[N,k]`, weights `[N,k]`.
Backward: `dE[v] += Σ_{n,j: ids_nj = v} w_nj · de_n` (a scatter-add; a discrete token is
the case `w = [1, 0, …]`, exactly an embedding lookup) and `dw_nj = <de_n, E[ids_nj]>`.

Shapes: leading dimensions are free: ids and weights `[..., k]` give `[..., H]`, in the
embedding's dtype; accumulation in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._validation import check_float_matrix, check_ids, check_same_device

HAS_TRITON_PATH = False


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def mixture_embed_ref(
    embedding: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Eager `Σ_j w_j E[ids_j]`: embedding `[V,H]`, ids/weights `[..., k]` → `[..., H]`."""
    acc = accumulation_dtype(embedding, weights)
    rows = torch.nn.functional.embedding(ids, embedding).to(acc)  # [..., k, H]
    mixed = (weights.to(acc).unsqueeze(-1) * rows).sum(-2)
    return mixed.to(embedding.dtype)


def check_embed_args(embedding: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
    """Raise a clear error for bad `mixture_embed` arguments."""
    check_float_matrix("embedding", embedding)
    check_ids("ids", ids, embedding.shape[0])
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    if ids.shape != weights.shape or ids.dim() < 1:
        raise ValueError(
            f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must share one shape "
            "[..., k]"
        )
    check_same_device(embedding=embedding, ids=ids, weights=weights)


def mixture_embed(
    embedding: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Differentiable mixture embedding `Σ_j w_j E[ids_j]`.

    Args:
        embedding: `[V,H]` input-embedding matrix (gradient flows into it).
        ids: `[..., k]` int64/int32 token ids.
        weights: `[..., k]` mixture weights (gradient flows into them).
        backend: None (auto), `"reference"` or `"triton"`; env `MOTG_BACKEND` as fallback.

    Returns:
        `[..., H]` in the embedding's dtype.
    """
    check_embed_args(embedding, ids, weights)
    resolve_backend("mixture_embed", backend, embedding.device, HAS_TRITON_PATH)
    return mixture_embed_ref(embedding, ids, weights)
