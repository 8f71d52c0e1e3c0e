"""Rollout step of mixture-of-token generation: one logits row in, one mixture action out.

Math (per row; logits `z [V]`, temperature `τ`, embedding `E [V,H]`):
    log p   = z/τ − logsumexp(z/τ)                       full-vocabulary log-probs
    S       = top-k of z (`topk`) | of z/τ + g, g ~ Gumbel (`sample`, Gumbel-top-k: k draws
              from p without replacement, in draw order) | k independent draws from p,
              repeats allowed (`iid`) | one draw y ~ p then the k−1 largest other z
              (`sample_topk`); ties: lower id first
    mask    = slots with p > 0 that pass the optional top_p / min_p filters (slot 0 always)
    ω       = weight logits, `w = softmax(ω)` over the valid slots (zero on masked ones):
              `prob` log p̃ (p renormalised over valid slots) | `dirichlet` log Gamma
              draws, w ~ Dir(c·p̃) | `gumbel` (log p̃ + g)/λ, g optionally clamped |
              `uniform` 0 (w = 1/m) | `blend` Mixture of Inputs' log-weights; ω is drawn
              and kept in log space, so a weight below float32's range keeps its exact
              logarithm (the densities of `likelihood.py` read ω)
    y       = S[j], j ~ Cat(w) (`representative="sample"`, Gumbel-max over ω), argmax ω
              (`"argmax"`) or slot 0 (`"first"`); the drawn slot j is returned as `token_slot`
    e       = Σ_j w_j E[S_j]                             mixture embedding (next input)
    entropy = −Σ_v p_v log p_v
    rest    = log Σ_{v ∉ S} p_v, the mass outside the ids, summed without cancellation
              (only for `spec.needs_rest`: the Plackett–Luce likelihood of `sample`)
With k = 1, `topk` is greedy decoding and `sample`, `iid` and `sample_topk` are
multinomial sampling from p. (Gaussian soft tokens add σε to e outside this op:
`gaussian.py`, applied by the engine.)

Shapes: logits `[B,V]` (any float dtype, any row stride), embedding `[V,H]`; outputs
ids `[B,k]` int64, weights and weight logits `[B,k]` float32, mask `[B,k]` bool, token
`[B]` int64, logprobs `[B,k]` float32 (−inf on slots with p = 0), logsumexp `[B]` float32
(of z/τ), entropy `[B]` float32, embeds `[B,H]` in the embedding's dtype, rest `[B]`
float32 or None. No backward: rollouts run
without gradients; training rebuilds inputs with `mixture_embed`.

The sampling settings (k, τ, selection, weighting, filters, c, λ, representative) are one
`MixtureSpec` (`spec.py`), validated when it is made. Logits may hold −inf (a masked
vocabulary); NaN, +inf or a row with no finite entry is an error (checked when
`validate=True`, which costs one host sync).

Triton path (each logits row is read once; kernels below, launchers after them):
- scan: a program streams a column range of one row in `BLOCK_V` tiles. Per tile it folds
  the scaled logits `x = z/τ` into an online softmax state (`_online_softmax.py`: running
  max, `Σ e^{x−m}`, `Σ e^{x−m}(x−m)`, which give logsumexp and entropy), and updates a
  running top-k of int64 keys packing (score, id) (`_topk.py`; score = z for `topk` and
  `sample_topk`, z/τ + g for `sample`): ties rank the lower id first, −inf entries rank
  below every finite one. A tile touches the top-k only when its best score beats the
  current k-th score (later columns carry higher ids, so an equal score never wins); its
  keys then enter best first, each replacing the current minimum, until none beats it.
  Rounds = keys that enter the top-k, about k·(1 + ln(V/k)) per row for random rows.
  `sample_topk` also keeps the best key of z/τ + g (its slot 0, y); `iid` keeps instead
  the best key of z/τ + g_j for each of its k draws, from a `[K_PAD, BLOCK_V]` noise tile
  (`BLOCK_V` is then at most `IID_TILE / K_PAD`).
- one program per row (`step_row_kernel`) when the batch fills the GPU; otherwise
  `split_count` splits each row over programs (`step_split_kernel` writes partial keys
  and `(m, s, t)` per split) and `step_merge_kernel` combines them per row (top-k of the
  keys; max of the sampled keys; `iid`: max per draw).
- select (end of the row / merge kernel): the ids (`topk` / `sample`: the k keys sorted;
  `iid`: the draws in order, repeats allowed; `sample_topk`: y, then the k−1 best keys
  other than y), the k logits reloaded for `log p` at the ids, logsumexp, entropy, the
  slot mask (top_p, min_p) and the `prob` / `gumbel` / `uniform` weight logits and
  weights. `dirichlet` and `blend` then compute theirs in torch
  (`mixture_math.mixture_weight_logits`; Dirichlet draws from `generator`), and `rest` is
  a torch pass over the logits with the ids masked (only for `spec.needs_rest`).
- embed (`_embed_token_kernel`, programs over rows × H blocks): the representative slot
  (Gumbel-max over ω, argmax, or slot 0), stored with its token (the drawn slot: ids
  may repeat), and `e = Σ_j w_j E[S_j]` accumulated in float32 (float64 for a float64
  embedding), stored in the embedding's dtype.
- noise: Gumbel(0, 1) from Philox keyed by one int64 seed per call (`_philox.py`: the
  seed and counter contract; `iid` draw j uses counter word 3 = j, draw 0 being the
  `sample` stream). `philox_step_noise` materialises exactly this noise as a `StepNoise`
  (`draws=k` for `iid`), so `mixture_step_ref(..., noise=...)` reproduces a Triton step;
  explicit noise tensors replace the matching streams on both paths.
- `z/τ` is `z` times the float32 reciprocal of τ on every path, the reference's included
  (`mixture_math.inverse_temperature`), and FMA contraction is off, so the same noise gives
  the same ids on every device. Offsets are int64, accumulation float32.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ._backend import ENV_VAR, device_guard, resolve_backend, triton
from ._launch import sm_count
from ._philox import StepNoise, philox_step_seed
from ._step_embed import launch_embed
from ._step_launch import (  # noqa: F401 - the tunables and split_count are public here
    BLOCK_V,
    IID_TILE,
    MERGE_TILE,
    MIN_SPLIT_COLUMNS,
    NOISE_PHILOX,
    PROGRAMS_PER_SM,
    SCAN_WARPS,
    TRITON_MAX_K,
    check_tuning,
    float_noise,
    launch_select,
    make_plan,
    split_count,
    split_plan,
)
from ._validation import check_float_matrix, check_logits_rows, check_same_device
from .mixture_embed import mixture_embed_ref
from .mixture_math import (
    dirichlet_slot_mask,
    gumbel_noise,
    inverse_temperature,
    mixture_weight_logits,
    representative_slot,
    rest_logprob,
    select_candidates,
    select_iid,
    select_sample_topk,
    slot_mask,
    weights_from_logits,
)
from .spec import MixtureSpec, check_k, spec_from_keywords


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
    token_slot: torch.Tensor  # [B] int64 slot of `token` in `ids` (the drawn slot)
    weight_logits: torch.Tensor  # [B,k] float32 ω: w = softmax(ω) over valid slots, 0 masked
    rest_logprob: torch.Tensor | None  # [B] float32 log Σ_{v∉ids} p_v (spec.needs_rest)


def full_distribution_stats(
    logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(scaled [B,V], logsumexp [B], entropy [B])` in float32 for logits `[B,V]`."""
    scaled = logits.float() * inverse_temperature(temperature)
    lse = scaled.logsumexp(-1)
    logp = scaled - lse.unsqueeze(-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return scaled, lse, entropy


def mixture_step_ref(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    spec: MixtureSpec,
    *,
    generator: torch.Generator | None = None,
    noise: StepNoise | None = None,
) -> MixtureStep:
    """Pure-PyTorch rollout step (the oracle of the Triton kernel); arguments as `mixture_step`.

    Random draws, in order, from `generator` unless `noise` gives them: selection noise
    (`[B,V]` for `sample`/`sample_topk`, `[B,k,V]` for `iid`), weight noise `[B,k]`
    (`gumbel`) or Gamma draws (`dirichlet`), token noise `[B,k]` (`representative="sample"`).
    """
    noise = noise or StepNoise()
    scaled, lse, entropy = full_distribution_stats(logits, spec.temperature)
    ids = _select(logits, scaled, spec, noise.selection, generator)
    logprobs = scaled.gather(-1, ids) - lse.unsqueeze(-1)
    max_logprob = scaled.max(-1).values - lse
    mask = slot_mask(
        logprobs, max_logprob, top_p=spec.top_p, min_p=spec.min_p, top_p_mass=spec.top_p_mass
    )
    omega, mask = _weight_logits(logprobs, mask, spec, generator, noise.weight)
    weights = weights_from_logits(omega, mask)
    slot = representative_slot(
        omega, mask, spec.representative, generator=generator, token_noise=noise.token
    )
    token = ids.gather(-1, slot.unsqueeze(-1)).squeeze(-1)
    embeds = mixture_embed_ref(embedding, ids, weights)
    rest = rest_logprob(scaled, lse, ids) if spec.needs_rest else None
    return MixtureStep(ids, weights, mask, token, logprobs, lse, entropy, embeds, slot, omega, rest)


def _weight_logits(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    spec: MixtureSpec,
    generator: torch.Generator | None,
    weight_noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ω [B,k], mask [B,k])` of the spec's weighting, in torch (the reference's weights, and
    the Triton path's `dirichlet` and `blend`); Dirichlet slots too small to draw are masked
    (`dirichlet_slot_mask`)."""
    if spec.weighting == "dirichlet":
        mask = dirichlet_slot_mask(logprobs, mask, spec.concentration)
    omega = mixture_weight_logits(
        logprobs,
        mask,
        spec.weighting,
        concentration=spec.concentration,
        gumbel_temperature=spec.gumbel_temperature,
        gumbel_clamp=spec.gumbel_clamp,
        blend_beta=spec.blend_beta,
        blend_prior_scale=spec.blend_prior_scale,
        generator=generator,
        weight_noise=weight_noise,
    )
    return omega, mask


def selection_noise_shape(spec: MixtureSpec, batch: int, vocab: int) -> tuple[int, ...]:
    """Shape of the selection noise of a step: `[B,k,V]` for `iid`, `[B,V]` otherwise."""
    return (batch, spec.k, vocab) if spec.selection == "iid" else (batch, vocab)


def _select(logits, scaled, spec: MixtureSpec, noise, generator) -> torch.Tensor:
    """Candidate ids `[B,k]` of the spec's selection (noise drawn from `generator` if None)."""
    if spec.selection == "topk":
        return select_candidates(logits.float(), spec.k)
    if noise is None:
        shape = selection_noise_shape(spec, *scaled.shape)
        noise = gumbel_noise(shape, device=scaled.device, generator=generator)
    if spec.selection == "iid":
        return select_iid(scaled, noise)
    sampled = scaled + noise.float()
    if spec.selection == "sample_topk":
        return select_sample_topk(logits, sampled, spec.k)
    return select_candidates(sampled, spec.k)


def check_step_args(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    spec: MixtureSpec,
    noise: StepNoise | None,
    *,
    validate: bool,
) -> None:
    """Raise a clear error for any bad argument of `mixture_step` (see its docstring)."""
    if not isinstance(spec, MixtureSpec):
        raise TypeError(f"spec must be a MixtureSpec, got {type(spec).__name__}")
    check_float_matrix("logits", logits)
    check_float_matrix("embedding", embedding)
    check_same_device(logits=logits, embedding=embedding)
    if embedding.shape[0] != logits.shape[1]:
        raise ValueError(
            f"embedding has {embedding.shape[0]} rows but logits have {logits.shape[1]} "
            "vocabulary entries"
        )
    check_k(spec.k, logits.shape[1])
    batch, vocab = logits.shape
    noise = noise or StepNoise()
    shapes = {
        "selection": selection_noise_shape(spec, batch, vocab),
        "weight": (batch, spec.k),
        "token": (batch, spec.k),
    }
    for name, tensor in noise._asdict().items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(
                f"{name} noise must have shape {shapes[name]}, got {tuple(tensor.shape)}"
            )
        if tensor.device != logits.device or not tensor.is_floating_point():
            raise ValueError(f"{name} noise must be a floating-point tensor on {logits.device}")
    if spec.weighting == "dirichlet" and noise.weight is not None:
        raise ValueError("weight noise applies to weighting='gumbel' only")
    if validate:
        check_logits_rows(logits)


# --------------------------------------------------------------------------------------
# The Triton path (its launchers and tunables: `_step_launch.py`)
# --------------------------------------------------------------------------------------


def mixture_step_triton(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    spec: MixtureSpec,
    *,
    generator: torch.Generator | None = None,
    noise: StepNoise | None = None,
    vocab_splits: int | None = None,
    block_v: int | None = None,
) -> MixtureStep:
    """The Triton rollout step for already-checked arguments (see `mixture_step`).

    Noise: streams `noise` does not give come from Philox keyed by one seed drawn from
    `generator` (`philox_step_seed`), before the Dirichlet draws (which use `generator` in
    torch); `noise.selection` is `[B,k,V]` for `iid`. `vocab_splits` (programs per row;
    default `split_count`) and `block_v` (scan tile, a power of two) override the launch
    heuristics.

    Returns:
        `MixtureStep` with the reference's shapes and dtypes.
    """
    if triton is None:
        raise RuntimeError("the Triton path of mixture_step needs triton, which is not installed")
    noise = float_noise(noise or StepNoise())
    if spec.weighting == "dirichlet" and noise.weight is not None:
        raise ValueError("weight noise applies to weighting='gumbel' only")
    batch, vocab = logits.shape
    device = logits.device
    plan = make_plan(spec, noise)
    block_v = check_tuning(vocab_splits, block_v, plan.k_pad, spec.selection == "iid")
    if batch == 0:
        return mixture_step_ref(logits, embedding, MixtureSpec(k=spec.k))
    sources = (plan.codes["SEL_NOISE"], plan.codes["W_NOISE"], plan.token)
    seed = philox_step_seed(generator, device) if NOISE_PHILOX in sources else None
    if vocab_splits is None:
        vocab_splits = split_count(batch, vocab, sm_count(device))
    with device_guard(device):
        ids, weights, omega, mask, logprobs, lse, entropy = launch_select(
            logits, spec.k, plan, seed, noise, vocab_splits, block_v
        )
        if spec.weighting in TORCH_WEIGHTINGS:
            omega, mask = _weight_logits(logprobs, mask, spec, generator, None)
            weights = weights_from_logits(omega, mask)
        token, slot, embeds = launch_embed(
            embedding,
            ids,
            weights,
            omega,
            mask,
            seed=seed,
            token_noise=noise.token,
            token_source=plan.token,
        )
        rest = None
        if spec.needs_rest:
            scaled = logits.float() * inverse_temperature(spec.temperature)
            rest = rest_logprob(scaled, lse, ids)
    return MixtureStep(ids, weights, mask, token, logprobs, lse, entropy, embeds, slot, omega, rest)


# --------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------

# Modes of the spec the Triton kernels implement (today all of them); others run the reference.
TRITON_SELECTIONS = ("topk", "sample", "iid", "sample_topk")
# Weightings whose weight logits the Triton path computes in torch after the select stage.
TORCH_WEIGHTINGS = ("dirichlet", "blend")
TRITON_WEIGHTINGS = ("prob", "dirichlet", "gumbel", "uniform", "blend")
TRITON_REPRESENTATIVES = ("sample", "argmax", "first")


def triton_unsupported(spec: MixtureSpec) -> str | None:
    """Why the Triton path cannot run `spec` (None when it can)."""
    if spec.k > TRITON_MAX_K:
        return f"the Triton path supports k <= {TRITON_MAX_K}, got k={spec.k}"
    for name, value, supported in (
        ("selection", spec.selection, TRITON_SELECTIONS),
        ("weighting", spec.weighting, TRITON_WEIGHTINGS),
        ("representative", spec.representative, TRITON_REPRESENTATIVES),
    ):
        if value not in supported:
            return f"the Triton path has no {name}={value!r} yet"
    return None


_LEGACY_NOISE = {"selection_noise": "selection", "weight_noise": "weight", "token_noise": "token"}


def mixture_step(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    spec: MixtureSpec | None = None,
    *,
    generator: torch.Generator | None = None,
    noise: StepNoise | None = None,
    backend: str | None = None,
    validate: bool = True,
    **legacy,
) -> MixtureStep:
    """One MoT-G rollout step for logits `[B,V]` and an input-embedding matrix `[V,H]`.

    Args:
        spec: the `MixtureSpec` (k ≤ V, τ, selection, weighting, filters, representative).
        generator: `torch.Generator` for every random draw (reproducible steps). The
            reference draws its noise from it with `torch.rand`; the Triton path draws one
            Philox seed from it (`philox_step_seed`) and the noise in-kernel, so the two paths
            give different (equally distributed) samples for the same generator state.
        noise: a `StepNoise` of explicit Gumbel noise (`selection [B,V]`, `[B,k,V]` for
            `iid`; `weight [B,k]`, `token [B,k]`; each optional) replacing the draws from
            `generator`.
        backend: None (auto), `"reference"` or `"triton"`; env `MOTG_BACKEND` as fallback.
            The Triton path takes k ≤ `TRITON_MAX_K` (64); auto uses the reference above.
        validate: check logits for NaN, +inf and fully masked rows (one host sync).
        **legacy: the deprecated keyword form (`k=`, `temperature=`, …, and
            `selection_noise=`/`weight_noise=`/`token_noise=`) instead of `spec`/`noise`.

    Returns:
        `MixtureStep(ids, weights, mask, token, logprobs, logsumexp, entropy, embeds,
        token_slot, weight_logits, rest_logprob)`.
    """
    old_names = sorted(n for n in legacy if n in _LEGACY_NOISE)
    if old_names and (spec is not None or noise is not None):
        raise TypeError(
            "mixture_step() takes a MixtureSpec and noise=StepNoise(...) or the old keywords, "
            f"not both: {old_names}"
        )
    old_noise = {_LEGACY_NOISE[n]: legacy.pop(n) for n in old_names}
    spec = spec_from_keywords("mixture_step", spec, legacy)
    noise = StepNoise(**old_noise) if old_noise else noise
    check_step_args(logits, embedding, spec, noise, validate=validate)
    path = resolve_backend("mixture_step", backend, logits.device)
    unsupported = triton_unsupported(spec)
    if path == "triton" and unsupported:
        if backend is not None or os.environ.get(ENV_VAR):
            raise ValueError(f"mixture_step: {unsupported}; use backend='reference'")
        path = "reference"
    step = mixture_step_triton if path == "triton" else mixture_step_ref
    return step(logits, embedding, spec, generator=generator, noise=noise)
