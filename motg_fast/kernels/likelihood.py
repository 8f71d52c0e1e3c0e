"""Log-likelihood of a stored mixture action under the current policy.

Inputs per position (N positions, k slots): the current policy's log-probs `log p'` at the
stored ids `[N,k]` (full-vocabulary normalised, e.g. from `mixture_logprobs`), the stored
weights `w [N,k]` and validity `mask [N,k]`, and `token_slot [N]`, the slot of the
representative token y. `p̃'` is `p'` renormalised over the valid slots.

- `token`    ℓ = log p'(y)
- `weighted` ℓ = Σ_j p̃'_j log p'_{S_j}   (valid slots)
- `exact`    ℓ = log q(S) + log q(w | S) + log w(y), the log-density of the procedure:
    log q(S):   0 for `topk`; Plackett–Luce for `sample`,
                Σ_j [log p'_{S_j} − log(1 − Σ_{l<j} p'_{S_l})] over the drawn slots
                (slots whose log-prob is −inf were never drawn and are skipped; the
                top_p/min_p filters act after the draw, so filtered slots still count);
                Σ_j log p'_{S_j} for `iid` (independent draws, a repeated token counted
                each time); log p'_{S_0} for `sample_topk` (the rest is the top k−1 given
                S_0, no draw);
    log q(w|S): 0 for the deterministic weightings (`prob`, `uniform`, `blend`);
                Dirichlet(c·p̃') log-density of w for `dirichlet`
                (lgamma(c) − Σ lgamma(c p̃'_j) + Σ (c p̃'_j − 1) log w_j); the Concrete
                (Gumbel-softmax) log-density of w with logits log p̃' and temperature λ for
                `gumbel`; both over the m valid slots (0 when m = 1);
    log w(y):   for `representative="sample"` (y ~ Cat(w), its drawn slot stored):
                log p̃'_y for `prob` (w is p̃' itself), log of the stored w_y for the
                random weightings and `uniform` (1/m, independent of the policy);
                0 for `argmax` and `first` (y is then fixed given S and w).
  A spec whose S, w and y are all fixed by the logits (e.g. `topk` + `prob` + argmax y)
  has no exact likelihood: an error. Gaussian soft tokens (`noise_std > 0`) add the
  Gaussian density of the input (`gaussian.py`), which needs the embeddings.
Zero stored weights are read as the smallest normal float32 inside logarithms.

All returns are `[N]` in the log-probs' dtype, differentiable with respect to `logprobs`.
"""

from __future__ import annotations

import math

import torch

from .mixture_math import renormalised_logprobs
from .spec import MixtureSpec, spec_from_keywords

_TINY = torch.finfo(torch.float32).tiny


def _safe_log(weights: torch.Tensor) -> torch.Tensor:
    return weights.clamp(min=_TINY).log()


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum(-1)


def plackett_luce_logprob(logprobs: torch.Tensor) -> torch.Tensor:
    """log-probability `[N]` that Gumbel-top-k draws the ids in stored order.

    `logprobs [N,k]` are full-vocabulary log-probs; slots at −inf are skipped. Computed in
    float64 so that `1 − Σ_{l<j} p_l` keeps its digits when the drawn mass nears 1.
    """
    drawn = torch.isfinite(logprobs)
    lp = logprobs.to(torch.float64).masked_fill(~drawn, float("-inf"))
    mass_before = lp.exp().cumsum(-1) - lp.exp()
    remaining = (1.0 - mass_before).clamp(min=torch.finfo(torch.float64).tiny)
    terms = lp - remaining.log()
    return _masked_sum(terms, drawn).to(logprobs.dtype)


def dirichlet_log_density(
    log_p_tilde: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, concentration: float
) -> torch.Tensor:
    """Log-density `[N]` of `w` under `Dir(c · p̃')` over the valid slots."""
    alpha = concentration * log_p_tilde.exp()
    alpha_safe = torch.where(mask, alpha, torch.ones_like(alpha))
    per_slot = (alpha_safe - 1.0) * _safe_log(weights.to(alpha.dtype)) - torch.lgamma(alpha_safe)
    return math.lgamma(concentration) + _masked_sum(per_slot, mask)


def concrete_log_density(
    log_p_tilde: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Log-density `[N]` of `w` under the Concrete distribution (logits log p̃', temp. λ)."""
    m = mask.sum(-1).to(log_p_tilde.dtype)
    log_w = _safe_log(weights.to(log_p_tilde.dtype))
    log_p_safe = torch.where(mask, log_p_tilde, torch.zeros_like(log_p_tilde))
    score = (log_p_safe - temperature * log_w).masked_fill(~mask, float("-inf"))
    slot_terms = _masked_sum(log_p_safe - (temperature + 1.0) * log_w, mask)
    return (
        torch.lgamma(m) + (m - 1.0) * math.log(temperature) + slot_terms - m * score.logsumexp(-1)
    )


def selection_logprob(logprobs: torch.Tensor, selection: str) -> torch.Tensor:
    """`log q(S) [...]` of the stored candidate ids under the current log-probs `[..., k]`."""
    if selection == "sample":
        return plackett_luce_logprob(logprobs)
    if selection == "iid":
        return _masked_sum(logprobs, torch.isfinite(logprobs))
    if selection == "sample_topk":
        return logprobs[..., 0].clone()
    return torch.zeros_like(logprobs[..., 0])


def check_action_args(
    logprobs: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, token_slot: torch.Tensor
) -> None:
    """Raise a clear error for inconsistent action tensors."""
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be floating point, got {logprobs.dtype}")
    if weights.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, weights {tuple(weights.shape)} and mask "
            f"{tuple(mask.shape)} must share one shape [..., k]"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    if token_slot.shape != logprobs.shape[:-1]:
        raise ValueError(
            f"token_slot {tuple(token_slot.shape)} must have the leading shape of logprobs "
            f"{tuple(logprobs.shape)}"
        )
    devices = {logprobs.device, weights.device, mask.device, token_slot.device}
    if len(devices) > 1:
        raise ValueError(f"action tensors must share one device, got {sorted(map(str, devices))}")
    k = logprobs.shape[-1]
    if token_slot.numel():
        slot = token_slot.long()
        at_slot = mask.gather(-1, slot.clamp(0, k - 1).unsqueeze(-1))
        checks = torch.stack([((slot < 0) | (slot >= k)).any(), ~at_slot.all()])
        out_of_range, masked = checks.tolist()  # one host sync
        if out_of_range:
            raise ValueError(f"token_slot must lie in [0, {k})")
        if masked:
            raise ValueError("token_slot points at a masked slot: the token must be a valid slot")


def action_logprob(
    logprobs: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    token_slot: torch.Tensor,
    spec: MixtureSpec | None = None,
    *,
    likelihood: str,
    **legacy,
) -> torch.Tensor:
    """Log-likelihood `[...]` of stored mixture actions (see the module docstring).

    Args:
        logprobs: `[..., k]` current-policy log-probs at the stored ids.
        weights, mask: `[..., k]` the stored action.
        token_slot: `[...]` int index of the representative token within the slots.
        spec: the `MixtureSpec` that produced the actions (selection, weighting, c, λ and
            the representative matter for `"exact"`).
        likelihood: `"token"`, `"weighted"` or `"exact"` (one of `spec.likelihoods`).
        **legacy: the deprecated keyword form (`selection=`, `weighting=`, …) instead of
            `spec`.
    """
    spec = spec_from_keywords("action_logprob", spec, legacy)
    spec.check_likelihood(likelihood)
    check_action_args(logprobs, weights, mask, token_slot)
    slot = token_slot.long().unsqueeze(-1)
    if likelihood == "token":
        return logprobs.gather(-1, slot).squeeze(-1)
    log_p_tilde = renormalised_logprobs(logprobs, mask)
    if likelihood == "weighted":
        return _masked_sum(log_p_tilde.exp() * logprobs.masked_fill(~mask, 0.0), mask)
    total = selection_logprob(logprobs, spec.selection)
    if spec.weighting == "dirichlet":
        total = total + dirichlet_log_density(log_p_tilde, weights, mask, spec.concentration)
    elif spec.weighting == "gumbel":
        total = total + concrete_log_density(log_p_tilde, weights, mask, spec.gumbel_temperature)
    if spec.representative == "sample":
        log_w = log_p_tilde if spec.weighting == "prob" else _safe_log(weights.to(logprobs.dtype))
        total = total + log_w.gather(-1, slot).squeeze(-1)
    return total
