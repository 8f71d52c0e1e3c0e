"""Mixture log-probs fused with the LM head: log p' at the k stored ids of every position.

Math: logits `z = h Wᵀ` for hidden `h [N,H]` and LM-head weight `W [V,H]`,
`lse_n = logsumexp_v(z_nv/τ)`, `logprobs_nj = z_n,ids_nj/τ − lse_n`.
Backward (upstream grads `g [N,k]` on logprobs, `g_lse [N]` on lse):
`∂/∂z_nv = (1/τ)(Σ_j g_nj [v = ids_nj] − (Σ_j g_nj − g_lse_n) · softmax(z_n/τ)_v)`, then
`dh = dz W`, `dW = dzᵀ h`.

The reference materialises `[N,V]` logits (the eager baseline); the fused path streams the
vocabulary in chunks and never holds `[N,V]`.

Shapes: hidden `[..., H]`, ids `[..., k]` → logprobs `[..., k]`, logsumexp `[...]`, both
float32 (float64 for float64 inputs). The logits are computed in the inputs' dtype, as an
eager LM head would, and normalised in float32.
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._validation import check_float_matrix, check_ids, check_positive, check_same_device
from .mixture_embed import accumulation_dtype

HAS_TRITON_PATH = False


def mixture_logprobs_ref(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager log-probs at ids: hidden `[N,H]`, weight `[V,H]`, ids `[N,k]` → `([N,k], [N])`."""
    acc = accumulation_dtype(hidden, lm_head_weight)
    logits = torch.nn.functional.linear(hidden, lm_head_weight).to(acc) / temperature  # [N,V]
    lse = logits.logsumexp(-1)
    return logits.gather(-1, ids.long()) - lse.unsqueeze(-1), lse


def check_logprobs_args(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor, temperature: float
) -> None:
    """Raise a clear error for bad `mixture_logprobs` arguments."""
    check_float_matrix("lm_head_weight", lm_head_weight)
    if not hidden.is_floating_point() or hidden.dim() < 1:
        raise TypeError(f"hidden must be a floating-point tensor [..., H], got {hidden.dtype}")
    if hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden size {hidden.shape[-1]} does not match lm_head_weight "
            f"{tuple(lm_head_weight.shape)}"
        )
    check_ids("ids", ids, lm_head_weight.shape[0])
    if ids.dim() != hidden.dim() or ids.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"ids {tuple(ids.shape)} must be [..., k] with the leading shape of hidden "
            f"{tuple(hidden.shape)}"
        )
    check_positive("temperature", temperature)
    check_same_device(hidden=hidden, lm_head_weight=lm_head_weight, ids=ids)


def mixture_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable `log softmax(h Wᵀ/τ)` at `ids`, with the logsumexp.

    Args:
        hidden: `[..., H]` final hidden states (gradient flows into them).
        lm_head_weight: `[V,H]` LM-head weight, tied to the embedding or not (gradient too).
        ids: `[..., k]` token ids whose log-probs are wanted.
        temperature: τ > 0.
        backend: None (auto), `"reference"` or `"triton"`; env `MOTG_BACKEND` as fallback.

    Returns:
        `(logprobs [..., k], logsumexp [...])`.
    """
    check_logprobs_args(hidden, lm_head_weight, ids, temperature)
    resolve_backend("mixture_logprobs", backend, hidden.device, HAS_TRITON_PATH)
    lead = hidden.shape[:-1]
    logprobs, lse = mixture_logprobs_ref(
        hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, ids.reshape(-1, ids.shape[-1]),
        temperature,
    )
    return logprobs.reshape(*lead, ids.shape[-1]), lse.reshape(lead)
