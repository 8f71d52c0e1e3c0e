"""Building blocks of one MoT-G step, in plain PyTorch (rows of a batch are independent).

Shapes: B rows, V vocabulary entries, k candidate slots. Every function here is pure and
works in float32 (float64 where asked) whatever the input dtype. The reference rollout step
(`mixture_step.py`) is these blocks in sequence; the Triton path reuses the parts that run
after the logits pass (the Dirichlet draw, the representative token).

Conventions:
- Ordering: candidates are ranked by a score in float32; equal scores rank the lower token
  id first. `ordering_keys` packs (score, id) into one int64 whose integer order is exactly
  that ranking, so `torch.topk` on it is deterministic.
- Noise: Gumbel(0, 1) noise is `-log(-log(u))`, `u` uniform in (0, 1) from `torch.rand`.
  Each random draw accepts either a `torch.Generator` or an explicit noise tensor.
- Slot mask: a slot is valid when its token has non-zero probability and it survives the
  optional `top_p` / `min_p` filters; slot 0 is always valid.
"""

from __future__ import annotations

import math
import struct

import torch

from .spec import REPRESENTATIVES, WEIGHTINGS, check_choice

_LOW_ID_BITS = 32


def inverse_temperature(temperature: float) -> float:
    """`1/τ` rounded to float32 (from τ rounded to float32): the one scale every path
    multiplies logits by, so the reference and the kernels compute the same `z/τ` bits."""
    tau = struct.unpack("f", struct.pack("f", float(temperature)))[0]
    return struct.unpack("f", struct.pack("f", 1.0 / tau))[0]


def gumbel_noise(
    shape: tuple[int, ...], *, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gumbel(0, 1) noise in float32, `-log(-log(u))` with `u ~ U(0, 1)` clamped away from 0."""
    u = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    u = u.clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


def ordering_keys(scores: torch.Tensor) -> torch.Tensor:
    """Pack float32 `scores [B,V]` and their column ids into int64 keys `[B,V]`.

    Integer order of the keys = descending score, ties broken by the lower id. The high 32
    bits hold the float's bits mapped to a signed integer of the same order (`-0.0` is
    folded onto `+0.0`); the low 32 bits hold `2**32 - 1 - id`.
    """
    if scores.dtype != torch.float32:
        raise TypeError(f"ordering_keys expects float32 scores, got {scores.dtype}")
    bits = (scores + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # sign-magnitude -> two's order
    ids = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
    return (ordered << _LOW_ID_BITS) | ((1 << _LOW_ID_BITS) - 1 - ids)


def select_candidates(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ids `[B,k]` (int64) of the k largest float32 `scores [B,V]`, best first, ties lower id."""
    keys = ordering_keys(scores).topk(k, dim=-1, sorted=True).values
    return (1 << _LOW_ID_BITS) - 1 - (keys & ((1 << _LOW_ID_BITS) - 1))


def select_iid(scaled: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Ids `[B,k]` of k independent draws from `softmax(scaled)` (`scaled [B,V]` float32), by
    Gumbel-max with independent noise `[B,k,V]` per draw; a token may be drawn twice."""
    scores = scaled.unsqueeze(1) + noise.float()  # [B,k,V]
    keys = ordering_keys(scores.flatten(0, 1)).amax(-1).view(scores.shape[:2])
    return (1 << _LOW_ID_BITS) - 1 - (keys & ((1 << _LOW_ID_BITS) - 1))


def select_sample_topk(logits: torch.Tensor, sampled: torch.Tensor, k: int) -> torch.Tensor:
    """Ids `[B,k]`: slot 0 the draw `argmax(sampled)` (`sampled = z/τ + g [B,V]`), slots
    1…k−1 the k−1 largest logits `[B,V]` among the other tokens (ties: lower id)."""
    first = select_candidates(sampled, 1)
    if k == 1:
        return first
    keys = ordering_keys(logits.float()).scatter(-1, first, torch.iinfo(torch.int64).min)
    rest_keys = keys.topk(k - 1, dim=-1, sorted=True).values  # y ranks below every token
    rest = (1 << _LOW_ID_BITS) - 1 - (rest_keys & ((1 << _LOW_ID_BITS) - 1))
    return torch.cat([first, rest], dim=-1)


def slot_mask(
    slot_logprobs: torch.Tensor,
    max_logprob: torch.Tensor,
    *,
    top_p: float | None = None,
    min_p: float | None = None,
    top_p_mass: str = "vocab",
) -> torch.Tensor:
    """Validity `[B,k]` (bool) of the slots from their log-probs `[B,k]` and the row max `[B]`.

    A slot is valid when its probability is non-zero and it passes the filters:
    `top_p` keeps the smallest prefix of slots whose probability mass reaches `top_p`
    (a slot stays while the mass of the slots before it is below `top_p`; the mass under
    the full distribution, or with `top_p_mass="slots"` renormalised over the k slots);
    `min_p` keeps slots with `p_j >= min_p * max p` (max over the whole vocabulary).
    Slot 0 is always valid.
    """
    valid = torch.isfinite(slot_logprobs)
    if top_p is not None:
        probs = slot_logprobs.exp()
        if top_p_mass == "slots":
            probs = probs / probs.sum(-1, keepdim=True)
        mass_before = probs.cumsum(-1) - probs
        valid &= mass_before < top_p
    if min_p is not None and min_p > 0:
        valid &= slot_logprobs >= max_logprob.unsqueeze(-1) + math.log(min_p)
    valid[:, 0] = True
    return valid


def renormalised_logprobs(slot_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`log p̃ [..., k]`: log-probs renormalised over the valid slots, −inf on masked ones."""
    masked = slot_logprobs.masked_fill(~mask, float("-inf"))
    return masked - masked.logsumexp(-1, keepdim=True)


# Dirichlet slots whose concentration c·p̃_j falls below this are masked before the draw (a
# deterministic function of the logits, like the min_p filter): a draw of such a slot has
# log-weight below about −708/α and would overflow float32 storage. Only a slot more than
# about 69 nats below the top of the renormalised slots reaches it (c = 1).
DIRICHLET_MIN_ALPHA = 1e-30


def log_dirichlet_draw(
    alpha: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Log of unnormalised Gamma(alpha) draws `[B,k]` in float64, safe for tiny alpha.

    Uses `X = Y * U**(1/alpha)` with `Y ~ Gamma(alpha + 1)`, `U ~ U(0, 1)`, in log space,
    so a small concentration never underflows to an all-zero weight vector.
    """
    alpha = alpha.to(torch.float64)
    y = torch._standard_gamma(alpha + 1.0, generator=generator)
    u = torch.rand(alpha.shape, dtype=torch.float64, device=alpha.device, generator=generator)
    u = u.clamp_(min=torch.finfo(torch.float64).tiny)
    return y.log() + u.log() / alpha


def dirichlet_slot_mask(
    slot_logprobs: torch.Tensor, mask: torch.Tensor, concentration: float
) -> torch.Tensor:
    """`mask [B,k]` without the slots whose Dirichlet concentration `c·p̃_j` is below
    `DIRICHLET_MIN_ALPHA` (slot 0, the most probable under `topk`, always stays)."""
    log_p = renormalised_logprobs(slot_logprobs.double(), mask)
    keep = log_p >= math.log(DIRICHLET_MIN_ALPHA / concentration)
    keep[..., 0] = True
    return mask & keep


def entropy_blend_logits(
    slot_logprobs: torch.Tensor, mask: torch.Tensor, beta: float, prior_scale: float = 1.0
) -> torch.Tensor:
    """Log-weights `[B,k]` (float64) of Mixture of Inputs' blend, slot 0 the observed token:
    `w = H_n (q + β e_0)/(1 + β) + (1 − H_n) e_0`, `q = softmax(prior_scale · log p)` over
    the valid slots (`prior_scale = τ/τ_prior` turns log-probs at τ into the prior's
    temperature), `H_n = H(q)/log m` its entropy normalised by the m valid slots (0 when
    m = 1). Computed in log space: a valid slot's log-weight is finite however small q."""
    log_q = renormalised_logprobs(slot_logprobs.double() * prior_scale, mask)
    q = log_q.exp().masked_fill(~mask, 0.0)
    m = mask.sum(-1, keepdim=True).double()
    entropy = -torch.where(q > 0, q * log_q, torch.zeros_like(q)).sum(-1, keepdim=True)
    h_n = torch.where(m > 1, entropy / m.clamp(min=2).log(), torch.zeros_like(m)).clamp(0, 1)
    others = h_n.log() + log_q - math.log1p(beta)
    first = (h_n * (q[..., :1] + beta) / (1.0 + beta) + (1.0 - h_n)).log()
    return torch.cat([first, others[..., 1:]], dim=-1)


def mixture_weight_logits(
    slot_logprobs: torch.Tensor,
    mask: torch.Tensor,
    weighting: str,
    *,
    concentration: float = 1.0,
    gumbel_temperature: float = 1.0,
    gumbel_clamp: tuple[float, float] | None = None,
    blend_beta: float = 1.0,
    blend_prior_scale: float = 1.0,
    generator: torch.Generator | None = None,
    weight_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight logits `ω [B,k]` (float32): the weights are `w = softmax(ω)` over the valid
    slots (`weights_from_logits`). ω is the log-weight up to a constant per row, drawn and
    kept in log space, so a weight too small for float32 keeps its exact logarithm (the
    densities of `likelihood.py` read ω, never w). Masked slots hold 0.

    - `prob`: `ω = log p̃`, the log-probabilities renormalised over the valid slots.
    - `dirichlet`: `w ~ Dir(concentration * p̃)` over the valid slots: ω the log Gamma draws
      (float64, with `generator`; explicit noise is not accepted). Pass the mask through
      `dirichlet_slot_mask` first.
    - `gumbel`: `ω = (log p̃ + g) / gumbel_temperature`, `g` Gumbel noise `[B,k]` from
      `weight_noise` or drawn with `generator`, clamped to `gumbel_clamp` when given
      (SofT-GRPO's `[−1.5, 3]`).
    - `uniform`: `ω = 0`: `1/m` on each of the m valid slots.
    - `blend`: Mixture of Inputs' entropy-weighted posterior mean (`entropy_blend_logits`),
      slot 0 the observed token.
    """
    check_choice("weighting", weighting, WEIGHTINGS)
    log_p = renormalised_logprobs(slot_logprobs.float(), mask)
    if weighting == "uniform":
        logits = torch.zeros_like(log_p)
    elif weighting == "blend":
        logits = entropy_blend_logits(slot_logprobs, mask, blend_beta, blend_prior_scale)
    elif weighting == "prob":
        logits = log_p
    elif weighting == "dirichlet":
        if weight_noise is not None:
            raise ValueError("weight noise applies to weighting='gumbel' only")
        alpha = (concentration * log_p.double().exp()).masked_fill(~mask, 1.0)
        logits = log_dirichlet_draw(alpha, generator)
    else:
        if weight_noise is None:
            weight_noise = gumbel_noise(
                tuple(log_p.shape), device=log_p.device, generator=generator
            )
        noise = weight_noise.float()
        if gumbel_clamp is not None:
            noise = noise.clamp(*gumbel_clamp)
        logits = (log_p + noise) / gumbel_temperature
    return logits.to(torch.float32).masked_fill(~mask, 0.0)


def weights_from_logits(weight_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weights `w [..., k]` (float32) = `softmax(ω)` over the valid slots, 0 on masked ones
    (and on rows without a valid slot)."""
    logits = weight_logits.float().masked_fill(~mask, float("-inf"))
    top = logits.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    e = (logits - top).exp()
    return e / e.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def log_weights_from_logits(weight_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`log w [..., k]` = `log_softmax(ω)` over the valid slots (−inf on masked ones), in the
    logits' dtype or wider."""
    logits = weight_logits.masked_fill(~mask, float("-inf"))
    return logits - logits.logsumexp(-1, keepdim=True)


def rest_logprob(scaled: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`log Σ_{v ∉ ids} p_v [B]`: the log-probability mass outside the ids (`scaled = z/τ
    [B,V]`, `lse [B]` its logsumexp, `ids [B,k]`), summed without cancellation (−inf when
    the ids cover every token of non-zero probability)."""
    rest = scaled.float().scatter(-1, ids, float("-inf")).logsumexp(-1)
    return rest - lse


def representative_slot(
    weight_logits: torch.Tensor,
    mask: torch.Tensor,
    representative: str = "sample",
    *,
    generator: torch.Generator | None = None,
    token_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slot index `[B]` (int64) of the representative token, from the weight logits `[B,k]`.

    `sample`: `y ~ Cat(w)` by Gumbel-max on ω (noise `[B,k]` from `token_noise` or
    `generator`); `argmax`: the heaviest slot (lower slot first on ties); `first`: slot 0.
    """
    check_choice("representative", representative, REPRESENTATIVES)
    if representative == "first":
        return torch.zeros(weight_logits.shape[0], dtype=torch.int64, device=mask.device)
    scores = weight_logits.float().masked_fill(~mask, float("-inf"))
    if representative == "sample":
        if token_noise is None:
            token_noise = gumbel_noise(
                tuple(scores.shape), device=scores.device, generator=generator
            )
        scores = scores + token_noise.float()
    return scores.argmax(-1)


def token_slot(ids: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Index `[...]` of `token [...]` within `ids [..., k]` (its first slot); an error when a
    row does not hold its token."""
    hit = ids == token.unsqueeze(-1)
    if not bool(hit.any(-1).all()):
        raise ValueError("token is not among ids in some rows")
    return hit.to(torch.int8).argmax(-1)
