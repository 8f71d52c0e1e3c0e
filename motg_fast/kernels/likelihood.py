"""Log-likelihood of a stored mixture action under the current policy.

Inputs per position (N positions, k slots): the current policy's log-probs `log p'` at the
stored ids `[N,k]` (full-vocabulary normalised, e.g. from `mixture_logprobs`), the slot
validity `mask [N,k]`, `token_slot [N]` (the slot of the representative token y), the
stored weight logits `ω [N,k]` (the weights are `w = softmax(ω)` over the valid slots;
`mixture_step` draws and keeps them in log space) and, for `sample` with k ≥ 2, the
current policy's log-mass outside the ids `rest [N] = log Σ_{v ∉ ids} p'_v`
(`mixture_logprobs(..., return_rest=True)`). `p̃'` is `p'` renormalised over the valid
slots; `log w = log_softmax(ω)` over them.

- `token`    ℓ = log p'(y)
- `weighted` ℓ = Σ_j p̃'_j log p'_{S_j}   (valid slots)
- `exact`    ℓ = log q(S) + log q(w | S) + log w(y), the log-density of the procedure:
    log q(S):   0 for `topk`; Plackett–Luce for `sample`,
                Σ_j [log p'_{S_j} − log(Σ_{l≥j} p'_{S_l} + rest)] over the drawn slots:
                the mass not yet drawn before draw j is the drawn slots from j on plus the
                vocabulary outside the ids, a sum of positive terms, so no `1 − Σ p`
                cancellation on confident steps (slots whose log-prob is −inf were never
                drawn and are skipped; the top_p/min_p filters act after the draw, so
                filtered slots still count);
                Σ_j log p'_{S_j} for `iid` (independent draws, a repeated token counted
                each time); log p'_{S_0} for `sample_topk` (the rest is the top k−1 given
                S_0, no draw);
    log q(w|S): 0 for the deterministic weightings (`prob`, `uniform`, `blend`);
                Dirichlet(c·p̃') log-density of w for `dirichlet`
                (lgamma(c) − Σ lgamma(c p̃'_j) + Σ (c p̃'_j − 1) log w_j); the Concrete
                (Gumbel-softmax) log-density of w with logits log p̃' and temperature λ for
                `gumbel`; both over the m valid slots (0 when m = 1);
    log w(y):   for `representative="sample"` (y ~ Cat(w), its drawn slot stored):
                log p̃'_y for `prob` (w is p̃' itself), log w_y for the random weightings
                and `uniform` (1/m, independent of the policy);
                0 for `argmax` and `first` (y is then fixed given S and w).
  A spec whose S, w and y are all fixed by the logits (e.g. `topk` + `prob` + argmax y)
  has no exact likelihood, nor has clamped Gumbel noise (no density): an error. Gaussian
  soft tokens (`noise_std > 0`) add the Gaussian density of the input (`gaussian.py`),
  which needs the embeddings.
- `clamped_gumbel` (SofT-GRPO's proxy, for reproduction; `weighting="gumbel"`): with
  `ℓ'_j = log(p̃'_j + 1e−6)` and the stored perturbed logits `z_j = λ ω_j`, the noise
  implied by the current policy `g'_j = clamp(z_j − ℓ'_j)` (the spec's clamp), and
  ℓ = mean of the Gumbel log-density `−g'_j − exp(−g'_j)` over the valid slots with
  `ℓ'_j > −3`. Not the density of the action: a surrogate the method trains with.

Every density is computed in float64 from the float32 inputs (no stored weight is ever
rounded to zero, no term clamped). Inputs that are NaN or +inf, weight logits that are not
finite at valid slots, and a missing or non-finite `rest` where it is needed are errors.

All returns are `[N]` in the log-probs' dtype, differentiable with respect to `logprobs`
and `rest_logprob`.
"""

from __future__ import annotations

import math

import torch

from .mixture_math import log_weights_from_logits, renormalised_logprobs
from .spec import MixtureSpec, spec_from_keywords

# SofT-GRPO's proxy: the epsilon inside its log and the log-prob floor of the slots it
# averages over (its `torch_functional.py`).
PROXY_EPSILON = 1e-6
PROXY_MIN_LOGPROB = -3.0


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum(-1)


def plackett_luce_logprob(logprobs: torch.Tensor, rest_logprob: torch.Tensor) -> torch.Tensor:
    """log-probability `[N]` that Gumbel-top-k draws the ids in stored order.

    `logprobs [N,k]` are full-vocabulary log-probs (slots at −inf are skipped) and
    `rest_logprob [N]` the log-mass outside the ids. The mass left before draw j is
    `Σ_{l≥j} p_l + rest`, summed as a reverse log-cumsum-exp in float64.
    """
    drawn = torch.isfinite(logprobs)
    lp = logprobs.to(torch.float64).masked_fill(~drawn, float("-inf"))
    tail = torch.logcumsumexp(lp.flip(-1), dim=-1).flip(-1)  # log Σ_{l≥j} p_l
    left = torch.logaddexp(tail, rest_logprob.to(torch.float64).unsqueeze(-1))
    return _masked_sum(lp - left, drawn).to(logprobs.dtype)


def dirichlet_log_density(
    log_p_tilde: torch.Tensor, log_weights: torch.Tensor, mask: torch.Tensor, concentration: float
) -> torch.Tensor:
    """Log-density `[N]` of `w` (given as `log w`) under `Dir(c · p̃')` over the valid slots."""
    alpha = concentration * log_p_tilde.exp()
    alpha_safe = torch.where(mask, alpha, torch.ones_like(alpha))
    log_w = torch.where(mask, log_weights.to(alpha.dtype), torch.zeros_like(alpha))
    per_slot = (alpha_safe - 1.0) * log_w - torch.lgamma(alpha_safe)
    return math.lgamma(concentration) + _masked_sum(per_slot, mask)


def concrete_log_density(
    log_p_tilde: torch.Tensor, log_weights: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Log-density `[N]` of `w` (given as `log w`) under the Concrete distribution (logits
    log p̃', temperature λ) over the valid slots."""
    m = mask.sum(-1).to(log_p_tilde.dtype)
    log_w = torch.where(mask, log_weights.to(log_p_tilde.dtype), torch.zeros_like(log_p_tilde))
    log_p_safe = torch.where(mask, log_p_tilde, torch.zeros_like(log_p_tilde))
    score = (log_p_safe - temperature * log_w).masked_fill(~mask, float("-inf"))
    slot_terms = _masked_sum(log_p_safe - (temperature + 1.0) * log_w, mask)
    return (
        torch.lgamma(m) + (m - 1.0) * math.log(temperature) + slot_terms - m * score.logsumexp(-1)
    )


def clamped_gumbel_proxy(
    log_p_tilde: torch.Tensor, weight_logits: torch.Tensor, mask: torch.Tensor, spec: MixtureSpec
) -> torch.Tensor:
    """SofT-GRPO's training log-likelihood `[N]` (see the module docstring)."""
    reference = (log_p_tilde.exp() + PROXY_EPSILON).log()
    noise = spec.gumbel_temperature * weight_logits.to(reference.dtype) - reference
    if spec.gumbel_clamp is not None:
        noise = noise.clamp(*spec.gumbel_clamp)
    density = -noise - (-noise).exp()
    counted = mask & (reference > PROXY_MIN_LOGPROB)
    total = _masked_sum(density, counted)
    return total / counted.sum(-1).clamp(min=1).to(total.dtype)


def selection_logprob(
    logprobs: torch.Tensor, selection: str, rest_logprob: torch.Tensor | None = None
) -> torch.Tensor:
    """`log q(S) [...]` of the stored candidate ids under the current log-probs `[..., k]`
    (`rest_logprob [...]`, the log-mass outside the ids, for `sample`)."""
    if selection == "sample":
        if logprobs.shape[-1] == 1:
            return logprobs[..., 0].clone()
        if rest_logprob is None:
            raise ValueError(
                "the exact likelihood of selection='sample' with k >= 2 needs rest_logprob, "
                "the log-mass outside the ids: mixture_logprobs(..., return_rest=True)"
            )
        return plackett_luce_logprob(logprobs, rest_logprob)
    if selection == "iid":
        return _masked_sum(logprobs, torch.isfinite(logprobs))
    if selection == "sample_topk":
        return logprobs[..., 0].clone()
    return torch.zeros_like(logprobs[..., 0])


def check_action_args(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    token_slot: torch.Tensor,
    weight_logits: torch.Tensor | None = None,
    rest_logprob: torch.Tensor | None = None,
) -> None:
    """Raise a clear one-line error for inconsistent or non-finite action tensors (one host
    sync)."""
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be floating point, got {logprobs.dtype}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be bool, got {mask.dtype} (the weights are passed as weight_logits=)"
        )
    if mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} must share one "
            "shape [..., k]"
        )
    if weight_logits is not None and weight_logits.shape != logprobs.shape:
        raise ValueError(
            f"weight_logits {tuple(weight_logits.shape)} must have the shape of logprobs "
            f"{tuple(logprobs.shape)}"
        )
    if token_slot.shape != logprobs.shape[:-1]:
        raise ValueError(
            f"token_slot {tuple(token_slot.shape)} must have the leading shape of logprobs "
            f"{tuple(logprobs.shape)}"
        )
    if rest_logprob is not None and rest_logprob.shape != logprobs.shape[:-1]:
        raise ValueError(
            f"rest_logprob {tuple(rest_logprob.shape)} must have the leading shape of "
            f"logprobs {tuple(logprobs.shape)}"
        )
    given = [t for t in (logprobs, mask, token_slot, weight_logits, rest_logprob) if t is not None]
    devices = {t.device for t in given}
    if len(devices) > 1:
        raise ValueError(f"action tensors must share one device, got {sorted(map(str, devices))}")
    if not token_slot.numel():
        return
    _check_values(logprobs, mask, token_slot, weight_logits, rest_logprob)


def _check_values(logprobs, mask, token_slot, weight_logits, rest_logprob) -> None:
    k = logprobs.shape[-1]
    slot = token_slot.long()
    at_slot = mask.gather(-1, slot.clamp(0, k - 1).unsqueeze(-1))
    bad_lp = torch.isnan(logprobs) | (logprobs == float("inf"))
    checks = [((slot < 0) | (slot >= k)).any(), ~at_slot.all(), bad_lp.any()]
    if weight_logits is not None:
        checks.append((mask & ~torch.isfinite(weight_logits)).any())
    if rest_logprob is not None:
        checks.append((torch.isnan(rest_logprob) | (rest_logprob == float("inf"))).any())
    flags = torch.stack(checks).tolist()  # one host sync
    messages = (
        f"token_slot must lie in [0, {k})",
        "token_slot points at a masked slot: the token must be a valid slot",
        "logprobs hold NaN or +inf",
        "weight_logits are not finite at a valid slot",
        "rest_logprob holds NaN or +inf",
    )
    for flag, message in zip(flags, messages):
        if flag:
            raise ValueError(f"action_logprob: {message}")


def _needs_weight_logits(spec: MixtureSpec, likelihood: str) -> bool:
    if likelihood == "clamped_gumbel":
        return True
    if likelihood != "exact":
        return False
    sampled_from_w = spec.representative == "sample" and spec.weighting != "prob"
    return spec.weighting in ("dirichlet", "gumbel") or sampled_from_w


def action_logprob(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    token_slot: torch.Tensor,
    spec: MixtureSpec | None = None,
    *,
    likelihood: str,
    weight_logits: torch.Tensor | None = None,
    rest_logprob: torch.Tensor | None = None,
    **legacy,
) -> torch.Tensor:
    """Log-likelihood `[...]` of stored mixture actions (see the module docstring).

    Args:
        logprobs: `[..., k]` current-policy log-probs at the stored ids.
        mask: `[..., k]` bool slot validity of the stored action.
        token_slot: `[...]` int index of the representative token within the slots.
        spec: the `MixtureSpec` that produced the actions (selection, weighting, c, λ, the
            clamp and the representative matter for `"exact"`).
        likelihood: one of `spec.likelihoods` (`"token"`, `"weighted"`, `"exact"`,
            `"clamped_gumbel"`).
        weight_logits: `[..., k]` the stored ω (`MixtureStep.weight_logits`); needed by the
            densities of random weights and by a token sampled from them.
        rest_logprob: `[...]` current-policy `log Σ_{v ∉ ids} p'_v`; needed by `exact` for
            `sample` with k ≥ 2 (`mixture_logprobs(..., return_rest=True)`).
        **legacy: the deprecated keyword form (`selection=`, `weighting=`, …) instead of
            `spec`.
    """
    spec = spec_from_keywords("action_logprob", spec, legacy)
    spec.check_likelihood(likelihood)
    check_action_args(logprobs, mask, token_slot, weight_logits, rest_logprob)
    if weight_logits is None and _needs_weight_logits(spec, likelihood):
        raise ValueError(
            f"likelihood={likelihood!r} of weighting={spec.weighting!r} needs the stored "
            "weight_logits (MixtureStep.weight_logits)"
        )
    slot = token_slot.long().unsqueeze(-1)
    if likelihood == "token":
        return logprobs.gather(-1, slot).squeeze(-1)
    wide = logprobs.to(torch.float64)
    log_p_tilde = renormalised_logprobs(wide, mask)
    if likelihood == "weighted":
        total = _masked_sum(log_p_tilde.exp() * wide.masked_fill(~mask, 0.0), mask)
        return total.to(logprobs.dtype)
    if likelihood == "clamped_gumbel":
        return clamped_gumbel_proxy(log_p_tilde, weight_logits, mask, spec).to(logprobs.dtype)
    return exact_logprob(wide, log_p_tilde, mask, slot, spec, weight_logits, rest_logprob).to(
        logprobs.dtype
    )


def exact_logprob(logprobs, log_p_tilde, mask, slot, spec, weight_logits, rest_logprob):
    """`log q(S) + log q(w | S) + log w(y)` `[N]` in float64 (the module docstring) from
    float64 `logprobs` and `log_p_tilde` `[N,k]` and the slot `[N,1]` of y."""
    rest = None if rest_logprob is None else rest_logprob.to(torch.float64)
    total = selection_logprob(logprobs, spec.selection, rest)
    log_w = None
    if weight_logits is not None:
        log_w = log_weights_from_logits(weight_logits.to(torch.float64), mask)
    if spec.weighting == "dirichlet":
        total = total + dirichlet_log_density(log_p_tilde, log_w, mask, spec.concentration)
    elif spec.weighting == "gumbel":
        total = total + concrete_log_density(log_p_tilde, log_w, mask, spec.gumbel_temperature)
    if spec.representative == "sample":
        chosen = log_p_tilde if spec.weighting == "prob" else log_w
        total = total + chosen.gather(-1, slot).squeeze(-1)
    return total
