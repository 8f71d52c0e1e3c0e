"""Rollout step of mixture-of-token generation: one logits row in, one mixture action out.

Math (per row; logits `z [V]`, temperature `τ`, embedding `E [V,H]`):
    log p   = z/τ − logsumexp(z/τ)                       full-vocabulary log-probs
    S       = top-k of z (`topk`) or of z/τ + g, g ~ Gumbel (`sample`, Gumbel-top-k:
              k draws from p without replacement, in draw order); ties: lower id first
    mask    = slots with p > 0 that pass the optional top_p / min_p filters (slot 0 always)
    w       = `prob` p̃ (p renormalised over valid slots) | `dirichlet` Dir(c·p̃) |
              `gumbel` softmax((log p̃ + g)/λ); zero on masked slots, sums to 1
    y       = S[j], j ~ Cat(w) (`representative="sample"`) or argmax w (`"argmax"`)
    e       = Σ_j w_j E[S_j]                             mixture embedding (next input)
    entropy = −Σ_v p_v log p_v
With k = 1, `topk` is greedy decoding and `sample` is multinomial sampling from p.

Shapes: logits `[B,V]` (any float dtype, any row stride), embedding `[V,H]`; outputs
ids `[B,k]` int64, weights `[B,k]` float32, mask `[B,k]` bool, token `[B]` int64,
logprobs `[B,k]` float32 (−inf on slots with p = 0), logsumexp `[B]` float32 (of z/τ),
entropy `[B]` float32, embeds `[B,H]` in the embedding's dtype. No backward: rollouts run
without gradients; training rebuilds inputs with `mixture_embed`.

Logits may hold −inf (a masked vocabulary); NaN, +inf or a row with no finite entry is an
error (checked when `validate=True`, which costs one host sync).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._backend import resolve_backend
from ._validation import (
    REPRESENTATIVES,
    SELECTIONS,
    WEIGHTINGS,
    check_choice,
    check_float_matrix,
    check_k,
    check_logits_rows,
    check_positive,
    check_probability,
    check_same_device,
)
from .mixture_embed import mixture_embed_ref
from .mixture_math import (
    gumbel_noise,
    mixture_weights,
    representative_slot,
    select_candidates,
    slot_mask,
)

HAS_TRITON_PATH = False


class MixtureStep(NamedTuple):
    """Result of one rollout step for a batch of B rows (see the module docstring)."""

    ids: torch.Tensor  # [B,k] int64 candidate token ids, in selection order
    weights: torch.Tensor  # [B,k] float32 mixture weights (0 on masked slots, rows sum to 1)
    mask: torch.Tensor  # [B,k] bool slot validity
    token: torch.Tensor  # [B] int64 representative token
    logprobs: torch.Tensor  # [B,k] float32 log p at ids (full vocabulary, temperature τ)
    logsumexp: torch.Tensor  # [B] float32 logsumexp(z/τ)
    entropy: torch.Tensor  # [B] float32 entropy of p
    embeds: torch.Tensor  # [B,H] mixture embedding, embedding dtype


def full_distribution_stats(
    logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(scaled [B,V], logsumexp [B], entropy [B])` in float32 for logits `[B,V]`."""
    scaled = logits.float() / temperature
    lse = scaled.logsumexp(-1)
    logp = scaled - lse.unsqueeze(-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return scaled, lse, entropy


def mixture_step_ref(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    *,
    k: int,
    temperature: float = 1.0,
    selection: str = "topk",
    weighting: str = "prob",
    top_p: float | None = None,
    min_p: float | None = None,
    concentration: float = 1.0,
    gumbel_temperature: float = 1.0,
    generator: torch.Generator | None = None,
    representative: str = "sample",
    selection_noise: torch.Tensor | None = None,
    weight_noise: torch.Tensor | None = None,
    token_noise: torch.Tensor | None = None,
) -> MixtureStep:
    """Pure-PyTorch rollout step (the oracle of the Triton kernel); arguments as `mixture_step`.

    Random draws, in order, from `generator` unless given explicitly: selection noise
    `[B,V]` (`sample`), weight noise `[B,k]` (`gumbel`) or Gamma draws (`dirichlet`), token
    noise `[B,k]` (`representative="sample"`).
    """
    scaled, lse, entropy = full_distribution_stats(logits, temperature)
    if selection == "topk":
        scores = logits.float()
    else:
        if selection_noise is None:
            selection_noise = gumbel_noise(
                tuple(scaled.shape), device=scaled.device, generator=generator
            )
        scores = scaled + selection_noise.float()
    ids = select_candidates(scores, k)
    logprobs = scaled.gather(-1, ids) - lse.unsqueeze(-1)
    max_logprob = scaled.max(-1).values - lse
    mask = slot_mask(logprobs, max_logprob, top_p=top_p, min_p=min_p)
    weights = mixture_weights(
        logprobs,
        mask,
        weighting,
        concentration=concentration,
        gumbel_temperature=gumbel_temperature,
        generator=generator,
        weight_noise=weight_noise,
    )
    slot = representative_slot(
        weights, mask, representative, generator=generator, token_noise=token_noise
    )
    token = ids.gather(-1, slot.unsqueeze(-1)).squeeze(-1)
    embeds = mixture_embed_ref(embedding, ids, weights)
    return MixtureStep(ids, weights, mask, token, logprobs, lse, entropy, embeds)


def _check_noise(name: str, noise: torch.Tensor | None, shape: tuple[int, int], device) -> None:
    if noise is None:
        return
    if tuple(noise.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(noise.shape)}")
    if noise.device != device or not noise.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor on {device}")


def check_step_args(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    *,
    k: int,
    temperature: float,
    selection: str,
    weighting: str,
    top_p: float | None,
    min_p: float | None,
    concentration: float,
    gumbel_temperature: float,
    representative: str,
    validate: bool,
) -> None:
    """Raise a clear error for any bad argument of `mixture_step` (see its docstring)."""
    check_float_matrix("logits", logits)
    check_float_matrix("embedding", embedding)
    check_same_device(logits=logits, embedding=embedding)
    if embedding.shape[0] != logits.shape[1]:
        raise ValueError(
            f"embedding has {embedding.shape[0]} rows but logits have {logits.shape[1]} "
            "vocabulary entries"
        )
    check_k(k, logits.shape[1])
    check_positive("temperature", temperature)
    check_choice("selection", selection, SELECTIONS)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("representative", representative, REPRESENTATIVES)
    check_probability("top_p", top_p, allow_zero=False)
    check_probability("min_p", min_p, allow_zero=True)
    check_positive("concentration", concentration)
    check_positive("gumbel_temperature", gumbel_temperature)
    if validate:
        check_logits_rows(logits)


def mixture_step(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    *,
    k: int,
    temperature: float = 1.0,
    selection: str = "topk",
    weighting: str = "prob",
    top_p: float | None = None,
    min_p: float | None = None,
    concentration: float = 1.0,
    gumbel_temperature: float = 1.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    representative: str = "sample",
    selection_noise: torch.Tensor | None = None,
    weight_noise: torch.Tensor | None = None,
    token_noise: torch.Tensor | None = None,
    validate: bool = True,
) -> MixtureStep:
    """One MoT-G rollout step for logits `[B,V]` and an input-embedding matrix `[V,H]`.

    Args:
        k: candidate slots, 1 ≤ k ≤ V.
        temperature: τ > 0 of `p = softmax(z/τ)`.
        selection: `"topk"` (deterministic) or `"sample"` (Gumbel-top-k from p).
        weighting: `"prob"`, `"dirichlet"` (concentration c) or `"gumbel"` (temperature λ).
        top_p, min_p: optional slot filters (validity in `mask`).
        generator: `torch.Generator` for every random draw (reproducible steps).
        backend: None (auto), `"reference"` or `"triton"`; env `MOTG_BACKEND` as fallback.
        representative: `"sample"` (y ~ Cat(w)) or `"argmax"` (heaviest slot).
        selection_noise, weight_noise, token_noise: explicit Gumbel noise `[B,V]`, `[B,k]`,
            `[B,k]` replacing the draws from `generator`.
        validate: check logits for NaN, +inf and fully masked rows (one host sync).

    Returns:
        `MixtureStep(ids, weights, mask, token, logprobs, logsumexp, entropy, embeds)`.
    """
    check_step_args(
        logits,
        embedding,
        k=k,
        temperature=temperature,
        selection=selection,
        weighting=weighting,
        top_p=top_p,
        min_p=min_p,
        concentration=concentration,
        gumbel_temperature=gumbel_temperature,
        representative=representative,
        validate=validate,
    )
    batch, vocab = logits.shape
    _check_noise("selection_noise", selection_noise, (batch, vocab), logits.device)
    _check_noise("weight_noise", weight_noise, (batch, k), logits.device)
    _check_noise("token_noise", token_noise, (batch, k), logits.device)
    resolve_backend("mixture_step", backend, logits.device, HAS_TRITON_PATH)
    return mixture_step_ref(
        logits,
        embedding,
        k=k,
        temperature=temperature,
        selection=selection,
        weighting=weighting,
        top_p=top_p,
        min_p=min_p,
        concentration=concentration,
        gumbel_temperature=gumbel_temperature,
        generator=generator,
        representative=representative,
        selection_noise=selection_noise,
        weight_noise=weight_noise,
        token_noise=token_noise,
    )
