"""GRPO objective as pure functions: group advantages, clipped surrogate, k3 KL, aggregation.

Shapes: B sequences (B = groups × G, members of a group contiguous), T completion positions.
Per-position log-likelihoods `logp [B,T]` are those of the current policy (any likelihood of
`motg_fast.kernels.action_logprob`), `old_logp [B,T]` those of the policy that produced the
rollout, `ref_logp [B,T]` those of a frozen reference; `mask [B,T]` marks real positions.

    A   = (r − mean_G r) / (std + ε)     std: of the group, of the whole batch, or none (1)
    ρ   = exp(logp − old_logp)
    obj = min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A)
    kl  = exp(ref − logp) − (ref − logp) − 1            (k3 estimator, ≥ 0)
    per-position loss = −obj + β kl
With per-slot clipping (Multiplex Thinking's loss, for likelihoods that are a sum of slot
terms `logp = Σ_s logp_s`), `obj = Σ_s min(ρ_s A, clip(ρ_s) A)` over the valid slots, each
slot with its own ratio `ρ_s = exp(logp_s − old_logp_s)`; the KL stays on the joint `logp`.
    `grpo`    mean over each sequence's positions, then over sequences
    `dapo`    mean over all positions of the batch
    `dr_grpo` sum over all positions / (B · max_len)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..kernels.spec import check_choice

ADVANTAGE_SCALINGS = ("group", "batch", "none")
AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scaling: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Advantages `[B]` from rewards `[B]` in contiguous groups of `group_size`.

    `scaling`: `"group"` divides by each group's standard deviation, `"batch"` by the
    standard deviation of all rewards in the batch, `"none"` leaves the centred rewards.
    Standard deviations are population ones (divide by n), so G = 1 is well defined; a
    group whose rewards are all equal gets exactly zero advantages (never NaN, even with
    `eps = 0`).
    """
    check_choice("advantage scaling", scaling, ADVANTAGE_SCALINGS)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of group_size={group_size}"
        )
    grouped = rewards.float().view(-1, group_size)
    spread = grouped.std(-1, correction=0, keepdim=True)
    centred = torch.where(spread > 0, grouped - grouped.mean(-1, keepdim=True), 0.0)
    if scaling == "group":
        centred = torch.where(spread > 0, centred / (spread + eps), 0.0)
    elif scaling == "batch":
        batch_spread = rewards.float().std(correction=0)
        centred = centred / (batch_spread + eps) if batch_spread > 0 else centred
    return centred.view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-position k3 estimate of KL(π‖π_ref): `exp(ref − logp) − (ref − logp) − 1`."""
    delta = ref_logp - logp
    return delta.exp() - delta - 1.0


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(objective [B,T], ratio [B,T], clipped [B,T] bool)` of the PPO-style surrogate.

    `advantages` is `[B]` (broadcast over positions) or `[B,T]`. `clipped` marks positions
    where the clipped branch is active (zero gradient): ρ > 1 + ε_high with A > 0, or
    ρ < 1 − ε_low with A < 0.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    ratio = (logp - old_logp).exp()
    unclipped = ratio * adv
    clipped_obj = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    objective = torch.minimum(unclipped, clipped_obj)
    clipped = ((ratio > 1.0 + eps_high) & (adv > 0)) | ((ratio < 1.0 - eps_low) & (adv < 0))
    return objective, ratio, clipped


class SlotTerms(NamedTuple):
    """Per-slot log-likelihood terms for per-slot clipping: `logp`, `old_logp` `[B,T,S]`
    (current and rollout policy) and `mask [B,T,S]` (the slots that carry a term)."""

    logp: torch.Tensor
    old_logp: torch.Tensor
    mask: torch.Tensor


def slot_surrogate(
    slots: SlotTerms, advantages: torch.Tensor, *, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(objective [B,T], ratio [B,T,S], clipped [B,T,S])`: the clipped surrogate of each
    slot's own ratio, summed over the valid slots of a position."""
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    objective, ratio, clipped = clipped_surrogate(
        slots.logp, slots.old_logp, adv.unsqueeze(-1), eps_low=eps_low, eps_high=eps_high
    )
    objective = torch.where(slots.mask, objective, torch.zeros_like(objective)).sum(-1)
    return objective, ratio, clipped


def aggregate(
    per_position: torch.Tensor, mask: torch.Tensor, mode: str, *, max_len: int | None = None
) -> torch.Tensor:
    """Scalar from per-position values `[B,T]` over `mask [B,T]` (see module docstring).

    `max_len` is the `dr_grpo` normaliser (the configured maximum completion length);
    it defaults to T. Sequences with no position contribute zero under `grpo`.
    """
    check_choice("aggregation", mode, AGGREGATIONS)
    weights = mask.to(per_position.dtype)
    total = per_position * weights
    if mode == "grpo":
        per_sequence = total.sum(-1) / weights.sum(-1).clamp(min=1.0)
        return per_sequence.mean()
    if mode == "dapo":
        return total.sum() / weights.sum().clamp(min=1.0)
    normaliser = per_position.shape[0] * (
        max_len if max_len is not None else per_position.shape[-1]
    )
    return total.sum() / normaliser


def batch_share(
    mode: str, *, rows: int, tokens: float, rows_total: float, tokens_total: float
) -> float:
    """The share of the global batch's loss that one micro-batch's aggregated loss stands
    for (`rows` trajectories with `tokens` scored positions, of `rows_total` and
    `tokens_total` over every micro-batch and process): summing `share × loss` over the
    micro-batches gives the global batch's loss under `mode` (see the module docstring)."""
    check_choice("aggregation", mode, AGGREGATIONS)
    if mode == "dapo":
        return tokens / max(tokens_total, 1.0)
    return rows / max(rows_total, 1.0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` holds (0 when it holds nowhere)."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def _check_loss_args(logp, old_logp, mask, eps_low, eps_high, beta, ref_logp) -> None:
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
            f"{tuple(mask.shape)} must share one shape [B,T]"
        )
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip epsilons must be >= 0, got {eps_low}, {eps_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp from the reference model")


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    aggregation: str = "grpo",
    max_len: int | None = None,
    slots: SlotTerms | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss (to minimise) and detached metrics.

    Args:
        logp: `[B,T]` per-position log-likelihoods under the current policy.
        old_logp: `[B,T]` the same under the rollout policy.
        advantages: `[B]` or `[B,T]`.
        mask: `[B,T]` bool, real completion positions.
        eps_low: lower clip width ε_low of the range `[1 − ε_low, 1 + ε_high]`.
        eps_high: upper clip width ε_high (`float("inf")` disables a side).
        beta: weight of the k3 KL to `ref_logp` (`[B,T]`, required when beta > 0).
        aggregation: `"grpo"`, `"dapo"` or `"dr_grpo"` (`max_len` its normaliser).
        slots: per-slot terms (`SlotTerms`, `[B,T,S]`) to clip each slot's ratio on its own
            (their sum over valid slots is `logp`); ratio metrics are then per slot.

    Returns:
        `(loss, metrics)`; metrics hold 0-dim detached tensors: `objective`, `ratio_mean`,
        `clip_fraction`, `kl` (when a reference is given).
    """
    _check_loss_args(logp, old_logp, mask, eps_low, eps_high, beta, ref_logp)
    if slots is None:
        objective, ratio, clipped = clipped_surrogate(
            logp, old_logp, advantages, eps_low=eps_low, eps_high=eps_high
        )
        counted = mask
    else:
        objective, ratio, clipped = slot_surrogate(
            slots, advantages, eps_low=eps_low, eps_high=eps_high
        )
        counted = slots.mask & mask.unsqueeze(-1)
    per_position = -objective
    metrics = {
        "objective": masked_mean(objective.detach(), mask),
        "ratio_mean": masked_mean(ratio.detach(), counted),
        "clip_fraction": masked_mean(clipped.to(logp.dtype), counted),
    }
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if beta > 0:
            per_position = per_position + beta * kl
    loss = aggregate(per_position, mask, aggregation, max_len=max_len)
    return loss, metrics
