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

Triton path (each logits row is read once; kernels below, launchers after them):
- scan: a program streams a column range of one row in `BLOCK_V` tiles. Per tile it folds
  the scaled logits `x = z/τ` into an online state `(m, s, t)` = running max, `Σ e^{x−m}`,
  `Σ e^{x−m}(x−m)` (so `logsumexp = m + log s`, `entropy = log s − t/s`), and updates a
  running top-k of int64 keys that pack (score, id) exactly as
  `mixture_math.ordering_keys` does (score = z for `topk`, z/τ + g for `sample`): ties rank
  the lower id first, −inf entries rank below every finite one. A tile touches the top-k
  only when its best score beats the current k-th score (later columns carry higher ids,
  so an equal score never wins); its keys then enter best first, each replacing the
  current minimum, until none beats it (`_absorb`). Rounds = keys that enter the top-k,
  about k·(1 + ln(V/k)) per row for random rows.
- one program per row (`_step_row_kernel`) when the batch fills the GPU; otherwise
  `split_count` splits each row over programs (`_step_split_kernel` writes a partial top-k
  and `(m, s, t)` per split) and `_step_merge_kernel` combines them per row.
- select (end of the row / merge kernel): the k keys sorted, ids, the k logits reloaded
  for `log p` at the ids, logsumexp, entropy, the slot mask (top_p, min_p) and the
  `prob` / `gumbel` weights. `dirichlet` then draws its k weights in torch
  (`mixture_math.mixture_weights`, from `generator`).
- embed (`_step_embed_kernel`, programs over rows × H blocks): the representative token
  (Gumbel-max over log w, or argmax) and `e = Σ_j w_j E[S_j]` accumulated in float32
  (float64 for a float64 embedding), stored in the embedding's dtype.
- noise: Gumbel(0, 1) `-log(-log(u))` from Philox keyed by one int64 seed per call (drawn
  from `generator` into a device tensor by `philox_step_seed`: no host sync), counters
  `(column or slot, row, stream)`: stream 0 selection `[B,V]`, 1 weights `[B,k]`, 2 token
  `[B,k]`. `philox_step_noise` materialises exactly this noise, so
  `mixture_step_ref(selection_noise=…, weight_noise=…, token_noise=…)` reproduces a Triton
  step; explicit noise tensors replace the matching streams.
- `z/τ` is rounded as the reference rounds it on the same device (CUDA multiplies by the
  float32 reciprocal, the CPU divides), and FMA contraction is off, so the same noise gives
  the same ids. Offsets are int64, accumulation float32.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from typing import NamedTuple

import torch

from ._backend import ENV_VAR, constexpr, device_guard, jit, resolve_backend, tl, triton
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

HAS_TRITON_PATH = True


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


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


# Packed (score, id) keys are > -(2**63) + 2**40 (−inf included). Below that: an empty
# lane, and the distinct placeholders that fill a running top-k before real keys arrive.
_KEY_EMPTY = constexpr(-(2**63))
_KEY_FLOOR = constexpr(-(2**63) + 2**16)
_TINY = constexpr(torch.finfo(torch.float32).tiny)  # u is clamped here, as `gumbel_noise`
_TWO_POW_M24 = constexpr(2.0**-24)
_STREAM_WEIGHT = constexpr(1)  # Philox counter word 2: 0 selection, 1 weights, 2 token
_STREAM_TOKEN = constexpr(2)

# Noise sources (constexpr codes) and weighting codes of the kernels.
_NOISE_NONE, _NOISE_GIVEN, _NOISE_PHILOX = 0, 1, 2
_WEIGHTING_CODES = {"prob": 0, "gumbel": 1, "dirichlet": 2}  # 2: weights drawn in torch


@jit
def _scale(z, temperature, inv_temperature, RECIPROCAL: tl.constexpr):
    """`z/τ` in float32 exactly as the reference computes it on this device: CUDA's
    `tensor / scalar` multiplies by the float32 reciprocal, the CPU divides (IEEE)."""
    if RECIPROCAL:
        x = z * inv_temperature
    else:
        x = tl.math.div_rn(z, tl.zeros_like(z) + temperature)
    return x


@jit
def _order_keys(score, cols):
    """int64 keys of float32 `score` at int64 `cols`, as `mixture_math.ordering_keys`."""
    score = tl.where(score == 0.0, 0.0, score)  # −0.0 ranks as +0.0
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered << 32) | (0xFFFFFFFF - cols)


@jit
def _key_ids(keys):
    """Token ids (int64) packed in `keys`."""
    return 0xFFFFFFFF - (keys & 0xFFFFFFFF)


@jit
def _key_score(key):
    """The float32 score packed in `key` (meaningless for a placeholder key)."""
    ordered = key >> 32
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@jit
def _empty_top(K_PAD: tl.constexpr):
    """A running top-k holding K_PAD distinct placeholders (all below `_KEY_FLOOR`)."""
    return _KEY_EMPTY + 1 + tl.arange(0, K_PAD).to(tl.int64)


@jit
def _absorb(top, kth, cand):
    """Insert the keys of `cand [N]` that beat the k-th key into the running `top [K_PAD]`.

    `top` is unordered with distinct keys, `kth` its minimum. Candidates are taken best
    first and each replaces the current minimum, until none beats it: the number of rounds
    is the number of keys that enter the top-k, usually 0 after the first tiles of a row.
    """
    best = tl.max(cand, 0)
    while best > kth:
        top = tl.where(top == kth, best, top)
        kth = tl.min(top, 0)
        cand = tl.where(cand == best, _KEY_EMPTY, cand)
        best = tl.max(cand, 0)
    return top, kth


@jit
def _sort_desc(top, K_PAD: tl.constexpr):
    """`top [K_PAD]` (distinct keys) in descending order, by rank counting."""
    rank = tl.sum((top[None, :] > top[:, None]).to(tl.int32), 1)
    slots = tl.arange(0, K_PAD)
    return tl.sum(tl.where(rank[:, None] == slots[None, :], top[:, None], 0), 0)


@jit
def _uniform_to_gumbel(bits):
    """Gumbel(0, 1) from uint32 `bits`: u = 24 high bits / 2^24, clamped, `-log(-log(u))`."""
    u = (bits >> 8).to(tl.float32) * _TWO_POW_M24
    u = tl.maximum(u, _TINY)
    return -tl.log(-tl.log(u))


@jit
def _column_gumbel(seed, row, base, BLOCK: tl.constexpr):
    """Selection noise `[BLOCK]` of `row` at columns `base…` (base % 4 == 0).

    Column c uses output `c % 4` of Philox(key = seed, counter = (c // 4, row, 0, 0)).
    """
    quad = (base // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    zero = quad * 0
    r0, r1, r2, r3 = tl.philox(seed, quad, zero + row.to(tl.uint32), zero, zero)
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK])
    return _uniform_to_gumbel(bits)


@jit
def _slot_gumbel(seed, row, slots, STREAM: tl.constexpr):
    """Per-slot noise of `row`: output 0 of Philox(seed, counter = (slot, row, STREAM, 0))."""
    c0 = slots.to(tl.uint32)
    zero = c0 * 0
    r0, _, _, _ = tl.philox(seed, c0, zero + row.to(tl.uint32), zero + STREAM, zero)
    return _uniform_to_gumbel(r0)


@jit
def _load_seed(seed_ptr, NEEDED: tl.constexpr):
    if NEEDED:
        seed = tl.load(seed_ptr)
    else:
        seed = 0
    return seed


@jit
def _reduce_stats(m, s, t):
    """Combine vectors of online-softmax states `(max, Σe^{x−max}, Σe^{x−max}(x−max))`."""
    top = tl.max(m, 0)
    pivot = tl.where(top == float("-inf"), 0.0, top)
    scale = tl.exp(m - pivot)  # 0 for empty states (m = −inf)
    shift = tl.where(m == float("-inf"), 0.0, m - pivot)
    return top, tl.sum(scale * s, 0), tl.sum(scale * (t + shift * s), 0)


@jit
def _tile_stats(x, x_max):
    """Online-softmax state of scaled logits `x [N]` (−inf allowed) with max `x_max`."""
    pivot = tl.where(x_max == float("-inf"), 0.0, x_max)
    e = tl.exp(x - pivot)
    shift = tl.where(x == float("-inf"), 0.0, x - pivot)
    return x_max, tl.sum(e, 0), tl.sum(e * shift, 0)


@jit
def _combine_stats(m1, s1, t1, m2, s2, t2):
    """Combine two scalar online-softmax states (either may be empty: m = −inf, s = t = 0)."""
    m = tl.maximum(m1, m2)
    pivot = tl.where(m == float("-inf"), 0.0, m)
    a1 = tl.exp(m1 - pivot)
    a2 = tl.exp(m2 - pivot)
    d1 = tl.where(m1 == float("-inf"), 0.0, m1 - pivot)
    d2 = tl.where(m2 == float("-inf"), 0.0, m2 - pivot)
    return m, a1 * s1 + a2 * s2, a1 * (t1 + d1 * s1) + a2 * (t2 + d2 * s2)


@jit
def _scan_columns(
    # one logits row: pointer to its first element, column stride; explicit noise row
    row_ptr,
    stride_col,
    noise_row_ptr,
    # Philox key and row (counter word 1), the column range [col_start, col_end)
    seed,
    row,
    col_start,
    col_end,
    # temperature τ and its float32 reciprocal
    temperature,
    inv_temperature,
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SAMPLE: tl.constexpr,
    SEL_NOISE: tl.constexpr,
    RECIPROCAL: tl.constexpr,
):
    """Stream columns of one row: returns (top keys [K_PAD] unordered, m, s, t)."""
    offs = tl.arange(0, BLOCK_V)
    top = _empty_top(K_PAD)
    kth = tl.min(top, 0)
    bar = _key_score(kth)  # the k-th score once `top` holds only real keys
    m = tl.max(tl.full([2], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([2], tl.float32), 0)
    t = s
    for base in range(col_start, col_end, BLOCK_V):
        cols = base + offs
        inb = cols < col_end
        cols64 = cols.to(tl.int64)
        z = tl.load(row_ptr + cols64 * stride_col, mask=inb, other=float("-inf"))
        z = z.to(tl.float32)
        x = _scale(z, temperature, inv_temperature, RECIPROCAL)
        if SAMPLE:
            if SEL_NOISE == 1:
                g = tl.load(noise_row_ptr + cols64, mask=inb, other=0.0)
            else:
                g = _column_gumbel(seed, row, base, BLOCK_V)
            score = x + g
            best = tl.max(score, 0)
            x_max = tl.max(x, 0)
        else:
            score = z
            best = tl.max(score, 0)
            # rounding of z/τ is monotone: the max of x is the scaled max of z
            x_max = _scale(best, temperature, inv_temperature, RECIPROCAL)
        tm, ts, tt = _tile_stats(x, x_max)
        m, s, t = _combine_stats(m, s, t, tm, ts, tt)
        # Later columns have higher ids, so a tile matters only if it beats the k-th score.
        if (best > bar) | (kth < _KEY_FLOOR):
            keys = tl.where(inb, _order_keys(score, cols64), _KEY_EMPTY)
            top, kth = _absorb(top, kth, keys)
            bar = _key_score(kth)
    return top, m, s, t


@jit
def _select_slots(
    # the row, its final top keys [K_PAD] (any order) and online-softmax state
    row,
    top,
    m,
    s,
    t,
    # logits row (to reload the k selected logits), explicit weight noise [B,k], seed
    row_ptr,
    stride_col,
    weight_noise_ptr,
    seed,
    # outputs: ids, weights, mask, logprobs [B,k]; logsumexp, entropy [B]
    ids_ptr,
    weights_ptr,
    mask_ptr,
    logprobs_ptr,
    lse_ptr,
    entropy_ptr,
    # k, temperature, filters and the gumbel weighting temperature
    k,
    temperature,
    inv_temperature,
    top_p,
    log_min_p,
    gumbel_temperature,
    K_PAD: tl.constexpr,
    RECIPROCAL: tl.constexpr,
    USE_TOP_P: tl.constexpr,
    USE_MIN_P: tl.constexpr,
    WEIGHTING: tl.constexpr,
    W_NOISE: tl.constexpr,
):
    """Candidates, log-probs, mask and (prob/gumbel) weights of one row; stores them."""
    slots = tl.arange(0, K_PAD)
    live = slots < k
    out = row.to(tl.int64) * k + slots
    ids = tl.where(live, _key_ids(_sort_desc(top, K_PAD)), 0)
    z = tl.load(row_ptr + ids * stride_col, mask=live, other=float("-inf")).to(tl.float32)
    lse = m + tl.log(s)
    logprobs = _scale(z, temperature, inv_temperature, RECIPROCAL) - lse
    valid = live & (logprobs > float("-inf"))
    if USE_TOP_P:
        p = tl.exp(logprobs)
        valid = valid & (tl.cumsum(p, 0) - p < top_p)
    if USE_MIN_P:
        valid = valid & (logprobs >= (m - lse) + log_min_p)
    valid = valid | (slots == 0)
    tl.store(ids_ptr + out, ids, mask=live)
    tl.store(logprobs_ptr + out, logprobs, mask=live)
    tl.store(mask_ptr + out, valid, mask=live)
    tl.store(lse_ptr + row, lse)
    tl.store(entropy_ptr + row, tl.log(s) - t / s)
    if WEIGHTING != 2:
        kept = tl.where(valid, logprobs, float("-inf"))
        top_kept = tl.max(kept, 0)
        log_p = kept - (top_kept + tl.log(tl.sum(tl.exp(kept - top_kept), 0)))
        if WEIGHTING == 1:
            if W_NOISE == 1:
                g = tl.load(weight_noise_ptr + out, mask=live, other=0.0)
            else:
                g = _slot_gumbel(seed, row, slots, _STREAM_WEIGHT)
            log_p = (log_p + g) / gumbel_temperature
        e = tl.exp(log_p - tl.max(log_p, 0))
        w = tl.where(valid, e / tl.sum(e, 0), 0.0)
        tl.store(weights_ptr + out, w, mask=live)


@jit
def _step_row_kernel(
    # logits [B,V] (element strides), explicit selection noise [B,V] and weight noise [B,k]
    logits_ptr,
    stride_row,
    stride_col,
    sel_noise_ptr,
    weight_noise_ptr,
    seed_ptr,
    # outputs
    ids_ptr,
    weights_ptr,
    mask_ptr,
    logprobs_ptr,
    lse_ptr,
    entropy_ptr,
    # sizes and scalars
    V,
    k,
    temperature,
    inv_temperature,
    top_p,
    log_min_p,
    gumbel_temperature,
    # meta-parameters
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SAMPLE: tl.constexpr,
    SEL_NOISE: tl.constexpr,
    W_NOISE: tl.constexpr,
    WEIGHTING: tl.constexpr,
    USE_TOP_P: tl.constexpr,
    USE_MIN_P: tl.constexpr,
    RECIPROCAL: tl.constexpr,
):
    """One program per row: scan the whole row, then select (grid `(B,)`)."""
    row = tl.program_id(0)
    seed = _load_seed(seed_ptr, (SEL_NOISE == 2) | (W_NOISE == 2))
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    noise_row_ptr = sel_noise_ptr + row.to(tl.int64) * V
    top, m, s, t = _scan_columns(
        row_ptr, stride_col, noise_row_ptr, seed, row, 0, V, temperature, inv_temperature,
        K_PAD, BLOCK_V, SAMPLE, SEL_NOISE, RECIPROCAL,
    )  # fmt: skip
    _select_slots(
        row, top, m, s, t, row_ptr, stride_col, weight_noise_ptr, seed,
        ids_ptr, weights_ptr, mask_ptr, logprobs_ptr, lse_ptr, entropy_ptr,
        k, temperature, inv_temperature, top_p, log_min_p, gumbel_temperature,
        K_PAD, RECIPROCAL, USE_TOP_P, USE_MIN_P, WEIGHTING, W_NOISE,
    )  # fmt: skip


@jit
def _step_split_kernel(
    # logits [B,V] (element strides), explicit selection noise [B,V], seed
    logits_ptr,
    stride_row,
    stride_col,
    sel_noise_ptr,
    seed_ptr,
    # partial results: keys [B, n_split, K_PAD] int64, states [B, n_split, 3] float32
    part_keys_ptr,
    part_stats_ptr,
    # sizes and scalars
    V,
    chunk,
    n_split,
    temperature,
    inv_temperature,
    # meta-parameters
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SAMPLE: tl.constexpr,
    SEL_NOISE: tl.constexpr,
    RECIPROCAL: tl.constexpr,
):
    """Program `(row, split)` scans columns `[split·chunk, (split+1)·chunk)` (grid `(B, n)`)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    seed = _load_seed(seed_ptr, SEL_NOISE == 2)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    noise_row_ptr = sel_noise_ptr + row.to(tl.int64) * V
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    top, m, s, t = _scan_columns(
        row_ptr, stride_col, noise_row_ptr, seed, row, start, end, temperature,
        inv_temperature, K_PAD, BLOCK_V, SAMPLE, SEL_NOISE, RECIPROCAL,
    )  # fmt: skip
    part = row.to(tl.int64) * n_split + split
    tl.store(part_keys_ptr + part * K_PAD + tl.arange(0, K_PAD), top)
    tl.store(part_stats_ptr + part * 3, m)
    tl.store(part_stats_ptr + part * 3 + 1, s)
    tl.store(part_stats_ptr + part * 3 + 2, t)


@jit
def _step_merge_kernel(
    # logits [B,V] (for the k selected logits), partial results of `_step_split_kernel`
    logits_ptr,
    stride_row,
    stride_col,
    part_keys_ptr,
    part_stats_ptr,
    weight_noise_ptr,
    seed_ptr,
    # outputs
    ids_ptr,
    weights_ptr,
    mask_ptr,
    logprobs_ptr,
    lse_ptr,
    entropy_ptr,
    # sizes and scalars
    n_split,
    k,
    temperature,
    inv_temperature,
    top_p,
    log_min_p,
    gumbel_temperature,
    # meta-parameters
    K_PAD: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    W_NOISE: tl.constexpr,
    WEIGHTING: tl.constexpr,
    USE_TOP_P: tl.constexpr,
    USE_MIN_P: tl.constexpr,
    RECIPROCAL: tl.constexpr,
):
    """Merge the splits of one row, then select (grid `(B,)`)."""
    row = tl.program_id(0)
    seed = _load_seed(seed_ptr, W_NOISE == 2)
    top = _empty_top(K_PAD)
    kth = tl.min(top, 0)
    m = tl.max(tl.full([2], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([2], tl.float32), 0)
    t = s
    for first in range(0, n_split, SPLIT_BLOCK):
        splits = first + tl.arange(0, SPLIT_BLOCK)
        ok = splits < n_split
        part = row.to(tl.int64) * n_split + splits
        key_offs = part[:, None] * K_PAD + tl.arange(0, K_PAD)[None, :]
        keys = tl.load(part_keys_ptr + key_offs, mask=ok[:, None], other=_KEY_EMPTY)
        keys = tl.where(keys < _KEY_FLOOR, _KEY_EMPTY, keys)  # a short split's placeholders
        top, kth = _absorb(top, kth, tl.reshape(keys, [SPLIT_BLOCK * K_PAD]))
        pm = tl.load(part_stats_ptr + part * 3, mask=ok, other=float("-inf"))
        ps = tl.load(part_stats_ptr + part * 3 + 1, mask=ok, other=0.0)
        pt = tl.load(part_stats_ptr + part * 3 + 2, mask=ok, other=0.0)
        bm, bs, bt = _reduce_stats(pm, ps, pt)
        m, s, t = _combine_stats(m, s, t, bm, bs, bt)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    _select_slots(
        row, top, m, s, t, row_ptr, stride_col, weight_noise_ptr, seed,
        ids_ptr, weights_ptr, mask_ptr, logprobs_ptr, lse_ptr, entropy_ptr,
        k, temperature, inv_temperature, top_p, log_min_p, gumbel_temperature,
        K_PAD, RECIPROCAL, USE_TOP_P, USE_MIN_P, WEIGHTING, W_NOISE,
    )  # fmt: skip


@jit
def _step_embed_kernel(
    # candidates [B,k] (ids int64, weights float32, mask bool), token noise [B,k], seed
    ids_ptr,
    weights_ptr,
    mask_ptr,
    token_noise_ptr,
    seed_ptr,
    # embedding [V,H] (element strides) and outputs: embeds [B,H], token [B]
    emb_ptr,
    stride_emb_row,
    stride_emb_col,
    embeds_ptr,
    token_ptr,
    # sizes
    k,
    H,
    # meta-parameters
    K_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TOKEN: tl.constexpr,
    ACC_F64: tl.constexpr,
):
    """Program `(row, h)`: columns `h·BLOCK_H…` of `Σ_j w_j E[ids_j]`; h = 0 also stores the
    representative token (TOKEN 0: argmax of w, 1: given noise, 2: Philox)."""
    row = tl.program_id(0)
    hblock = tl.program_id(1)
    slots = tl.arange(0, K_PAD)
    live = slots < k
    cand = row.to(tl.int64) * k + slots
    ids = tl.load(ids_ptr + cand, mask=live, other=0)
    w = tl.load(weights_ptr + cand, mask=live, other=0.0)
    if hblock == 0:
        valid = live & (tl.load(mask_ptr + cand, mask=live, other=0) != 0)
        score = tl.where(valid, tl.log(tl.where(valid, w, 1.0)), float("-inf"))
        if TOKEN == 1:
            score = score + tl.load(token_noise_ptr + cand, mask=live, other=0.0)
        if TOKEN == 2:
            score = score + _slot_gumbel(tl.load(seed_ptr), row, slots, _STREAM_TOKEN)
        slot = tl.argmax(score, 0)
        tl.store(token_ptr + row, tl.sum(tl.where(slots == slot, ids, 0), 0))
    cols = hblock * BLOCK_H + tl.arange(0, BLOCK_H)
    inside = cols < H
    offs = ids[:, None] * stride_emb_row + cols.to(tl.int64)[None, :] * stride_emb_col
    rows = tl.load(emb_ptr + offs, mask=live[:, None] & inside[None, :], other=0.0)
    if ACC_F64:
        mixed = tl.sum(rows.to(tl.float64) * w.to(tl.float64)[:, None], 0)
    else:
        mixed = tl.sum(rows.to(tl.float32) * w[:, None], 0)
    out = embeds_ptr + row.to(tl.int64) * H + cols
    tl.store(out, mixed.to(embeds_ptr.dtype.element_ty), mask=inside)


@jit
def _step_noise_kernel(
    # Philox seed [1] int64; outputs: selection [B,V], weight [B,k], token [B,k] float32
    seed_ptr,
    sel_ptr,
    weight_ptr,
    token_ptr,
    V,
    k,
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Materialise the noise the step kernels draw (grid `(B, cdiv(V, BLOCK_V))`)."""
    row = tl.program_id(0)
    vblock = tl.program_id(1)
    seed = tl.load(seed_ptr)
    base = vblock * BLOCK_V
    cols = base + tl.arange(0, BLOCK_V)
    noise = _column_gumbel(seed, row, base, BLOCK_V)
    tl.store(sel_ptr + row.to(tl.int64) * V + cols, noise, mask=cols < V)
    if vblock == 0:
        slots = tl.arange(0, K_PAD)
        out = row.to(tl.int64) * k + slots
        weight_noise = _slot_gumbel(seed, row, slots, _STREAM_WEIGHT)
        tl.store(weight_ptr + out, weight_noise, mask=slots < k)
        tl.store(token_ptr + out, _slot_gumbel(seed, row, slots, _STREAM_TOKEN), mask=slots < k)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

# Tunables of the Triton path. They can only be measured on a GPU; see kernels/README.md.
BLOCK_V = 1024  # vocabulary tile of a scan program
SCAN_WARPS = 4  # warps of the scan / merge programs
PROGRAMS_PER_SM = 2  # split target when the batch alone cannot fill the GPU
MIN_SPLIT_COLUMNS = 2048  # a split program streams at least this many columns
MERGE_TILE = 2048  # partial keys a merge program loads at once
EMBED_TILE = 4096  # K_PAD · BLOCK_H elements an embed program holds
TRITON_MAX_K = 64  # larger k: the reference (auto) or a clear error (forced Triton)
_SEED_HIGH = 2**62  # Philox seeds are drawn from [0, 2^62)


def split_count(batch: int, vocab: int, num_sms: int) -> int:
    """Programs per logits row for a batch of `batch` rows on a GPU with `num_sms` SMs.

    1 (one program per row, no merge stage) once the batch alone gives every SM a row;
    otherwise enough splits for about `PROGRAMS_PER_SM` programs per SM, but never fewer
    than `MIN_SPLIT_COLUMNS` columns per program (the partial top-k, the partial state and
    the merge then cost little next to the columns streamed).
    """
    if batch >= num_sms:
        return 1
    wanted = -(-PROGRAMS_PER_SM * num_sms // batch)
    return max(1, min(wanted, vocab // MIN_SPLIT_COLUMNS))


def _split_plan(vocab: int, splits: int, block_v: int) -> tuple[int, int]:
    """`(splits, chunk)`: chunks of whole `block_v` tiles covering the vocabulary."""
    tiles = -(-vocab // block_v)
    chunk = -(-tiles // max(1, min(splits, tiles))) * block_v
    return -(-vocab // chunk), chunk


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; 1 elsewhere (the interpreter gains nothing from splits)."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton path of mixture_step needs triton, which is not installed")


def _to_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _float32_reciprocal(value: float) -> float:
    """`1/value` in float32 arithmetic, as CUDA's `tensor / scalar` computes it (a float64
    quotient of float32 operands rounds to the correctly rounded float32 quotient)."""
    return _to_float32(1.0 / _to_float32(value))


def philox_step_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Draw the Philox seed of one Triton step: int64 `[1]` on `device`.

    One `torch.randint` from `generator` (the default generator of `device` when None),
    kept on the device: the kernels load it, so no host sync happens. A generator on
    another device than the logits costs a copy (a sync for a CPU generator with CUDA
    logits); use one on the logits' device in the decode loop.
    """
    device = torch.device(device)
    source = generator.device if generator is not None else device
    seed = torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=source, generator=generator)
    return seed.to(device)


def philox_step_noise(
    seed: torch.Tensor, batch: int, vocab: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gumbel noise a Triton step keyed by `seed` draws, materialised.

    Returns float32 `(selection [B,V], weight [B,k], token [B,k])` on `seed.device`: feed them
    to `mixture_step_ref(selection_noise=…, weight_noise=…, token_noise=…)` to reproduce the
    step (a stream the step's modes do not use is simply ignored).
    """
    _require_triton()
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be one int64 value, got {seed.dtype} {tuple(seed.shape)}")
    device = seed.device
    selection = torch.empty(batch, vocab, dtype=torch.float32, device=device)
    weight = torch.empty(batch, k, dtype=torch.float32, device=device)
    token = torch.empty(batch, k, dtype=torch.float32, device=device)
    if batch == 0:
        return selection, weight, token
    block = min(BLOCK_V, max(4, _pow2(vocab)))
    with device_guard(device):
        _step_noise_kernel[(batch, -(-vocab // block))](
            seed, selection, weight, token, vocab, k, K_PAD=_pow2(k), BLOCK_V=block,
            enable_fp_fusion=False,  # compiled as the step kernels: bit-identical logs
        )  # fmt: skip
    return selection, weight, token


class _Plan(NamedTuple):
    """Per-call constants of the Triton step (noise sources, codes, scalars)."""

    sel_noise: int
    weight_noise: int
    token: int
    weighting: int
    k_pad: int
    scalars: tuple[float, float, float, float, float]  # τ, 1/τ, top_p, log min_p, λ
    use_top_p: bool
    use_min_p: bool
    reciprocal: bool


def _noise_source(used: bool, given: torch.Tensor | None) -> int:
    if not used:
        return _NOISE_NONE
    return _NOISE_GIVEN if given is not None else _NOISE_PHILOX


def _make_plan(device: torch.device, k: int, **kw) -> _Plan:
    """Kernel codes and scalars from the keyword arguments of `mixture_step_triton`."""
    temperature, top_p, min_p = kw["temperature"], kw["top_p"], kw["min_p"]
    use_min_p = min_p is not None and min_p > 0
    scalars = (
        float(temperature),
        _float32_reciprocal(float(temperature)),
        float(top_p) if top_p is not None else 1.0,
        math.log(min_p) if use_min_p else 0.0,
        float(kw["gumbel_temperature"]),
    )
    return _Plan(
        sel_noise=_noise_source(kw["selection"] == "sample", kw["selection_noise"]),
        weight_noise=_noise_source(kw["weighting"] == "gumbel", kw["weight_noise"]),
        token=_noise_source(kw["representative"] == "sample", kw["token_noise"]),
        weighting=_WEIGHTING_CODES[kw["weighting"]],
        k_pad=_pow2(k),
        scalars=scalars,
        use_top_p=top_p is not None,
        use_min_p=use_min_p,
        reciprocal=device.type == "cuda",
    )


def _float_noise(noise: torch.Tensor | None) -> torch.Tensor | None:
    return None if noise is None else noise.float().contiguous()


def _select_outputs(batch: int, k: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Empty `(ids, weights, mask, logprobs [B,k], lse, entropy [B])`."""
    on = dict(device=device)
    return (
        torch.empty(batch, k, dtype=torch.int64, **on),
        torch.empty(batch, k, dtype=torch.float32, **on),
        torch.empty(batch, k, dtype=torch.bool, **on),
        torch.empty(batch, k, dtype=torch.float32, **on),
        torch.empty(batch, dtype=torch.float32, **on),
        torch.empty(batch, dtype=torch.float32, **on),
    )


def _launch_select(logits, k, plan, seed, sel_noise, weight_noise, splits, block_v):
    """Scan (+ merge) kernels: `(ids, weights, mask, logprobs, lse, entropy)`."""
    batch, vocab = logits.shape
    outs = _select_outputs(batch, k, logits.device)
    seed = seed if seed is not None else logits  # placeholders are never read
    sel_noise = sel_noise if sel_noise is not None else logits
    weight_noise = weight_noise if weight_noise is not None else logits
    scan = dict(
        K_PAD=plan.k_pad,
        RECIPROCAL=plan.reciprocal,
        num_warps=SCAN_WARPS,
        enable_fp_fusion=False,  # z·(1/τ) + g rounds twice, as the reference does
    )
    select = dict(
        WEIGHTING=plan.weighting,
        USE_TOP_P=plan.use_top_p,
        USE_MIN_P=plan.use_min_p,
        W_NOISE=plan.weight_noise,
    )
    sample = dict(BLOCK_V=block_v, SAMPLE=plan.sel_noise != _NOISE_NONE, SEL_NOISE=plan.sel_noise)
    tau, inv_tau, top_p, log_min_p, lam = plan.scalars
    strides = logits.stride()
    splits, chunk = _split_plan(vocab, splits, block_v)
    if splits == 1:
        _step_row_kernel[(batch,)](
            logits, *strides, sel_noise, weight_noise, seed, *outs,
            vocab, k, tau, inv_tau, top_p, log_min_p, lam, **scan, **select, **sample,
        )  # fmt: skip
        return outs
    part_keys = torch.empty(batch, splits, plan.k_pad, dtype=torch.int64, device=logits.device)
    part_stats = torch.empty(batch, splits, 3, dtype=torch.float32, device=logits.device)
    _step_split_kernel[(batch, splits)](
        logits, *strides, sel_noise, seed, part_keys, part_stats,
        vocab, chunk, splits, tau, inv_tau, **scan, **sample,
    )  # fmt: skip
    split_block = min(_pow2(splits), max(1, MERGE_TILE // plan.k_pad))
    _step_merge_kernel[(batch,)](
        logits, *strides, part_keys, part_stats, weight_noise, seed, *outs,
        splits, k, tau, inv_tau, top_p, log_min_p, lam,
        SPLIT_BLOCK=split_block, **scan, **select,
    )  # fmt: skip
    return outs


def _launch_embed(embedding, ids, weights, mask, plan, seed, token_noise):
    """Embed kernel: `(token [B], embeds [B,H])`."""
    batch, k = ids.shape
    hidden = embedding.shape[1]
    token = torch.empty(batch, dtype=torch.int64, device=ids.device)
    embeds = torch.empty(batch, hidden, dtype=embedding.dtype, device=ids.device)
    block_h = max(16, min(_pow2(hidden), EMBED_TILE // plan.k_pad))
    grid = (batch, max(1, -(-hidden // block_h)))
    _step_embed_kernel[grid](
        ids, weights, mask,
        token_noise if token_noise is not None else weights,
        seed if seed is not None else ids,
        embedding, embedding.stride(0), embedding.stride(1), embeds, token,
        k, hidden,
        K_PAD=plan.k_pad, BLOCK_H=block_h, TOKEN=plan.token,
        ACC_F64=embedding.dtype == torch.float64, enable_fp_fusion=False,
    )  # fmt: skip
    return token, embeds


def _check_tuning(splits: int | None, block_v: int | None, k_pad: int) -> int:
    if splits is not None and (not isinstance(splits, int) or splits < 1):
        raise ValueError(f"vocab_splits must be an integer >= 1, got {splits!r}")
    block_v = BLOCK_V if block_v is None else block_v
    if not isinstance(block_v, int) or block_v < max(16, k_pad) or block_v & (block_v - 1):
        raise ValueError(
            f"block_v must be a power of two >= max(16, next_pow2(k)={k_pad}), got {block_v!r}"
        )
    return block_v


def mixture_step_triton(
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
    vocab_splits: int | None = None,
    block_v: int | None = None,
) -> MixtureStep:
    """The Triton rollout step for already-checked arguments (see `mixture_step`).

    Noise: streams without an explicit tensor come from Philox keyed by one seed drawn from
    `generator` (`philox_step_seed`), before the Dirichlet draws (which use `generator` in
    torch). `vocab_splits` (programs per row; default `split_count`) and `block_v` (scan
    tile, a power of two) override the launch heuristics.

    Returns:
        `MixtureStep` with the reference's shapes and dtypes.
    """
    _require_triton()
    if weighting == "dirichlet" and weight_noise is not None:
        raise ValueError("weight_noise applies to weighting='gumbel' only")
    batch, vocab = logits.shape
    device = logits.device
    plan = _make_plan(
        device,
        k,
        temperature=temperature,
        selection=selection,
        weighting=weighting,
        top_p=top_p,
        min_p=min_p,
        gumbel_temperature=gumbel_temperature,
        representative=representative,
        selection_noise=selection_noise,
        weight_noise=weight_noise,
        token_noise=token_noise,
    )
    block_v = _check_tuning(vocab_splits, block_v, plan.k_pad)
    if batch == 0:
        return mixture_step_ref(logits, embedding, k=k, temperature=temperature)
    philox = _NOISE_PHILOX in (plan.sel_noise, plan.weight_noise, plan.token)
    seed = philox_step_seed(generator, device) if philox else None
    if vocab_splits is None:
        vocab_splits = split_count(batch, vocab, _sm_count(device))
    with device_guard(device):
        ids, weights, mask, logprobs, lse, entropy = _launch_select(
            logits, k, plan, seed, _float_noise(selection_noise), _float_noise(weight_noise),
            vocab_splits, block_v,
        )  # fmt: skip
        if weighting == "dirichlet":
            weights = mixture_weights(
                logprobs, mask, "dirichlet", concentration=concentration, generator=generator
            )
        token, embeds = _launch_embed(
            embedding, ids, weights, mask, plan, seed, _float_noise(token_noise)
        )
    return MixtureStep(ids, weights, mask, token, logprobs, lse, entropy, embeds)


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
        generator: `torch.Generator` for every random draw (reproducible steps). The
            reference draws its noise from it with `torch.rand`; the Triton path draws one
            Philox seed from it (`philox_step_seed`) and the noise in-kernel, so the two paths
            give different (equally distributed) samples for the same generator state.
        backend: None (auto), `"reference"` or `"triton"`; env `MOTG_BACKEND` as fallback.
            The Triton path takes k ≤ `TRITON_MAX_K` (64); auto uses the reference above.
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
    path = resolve_backend("mixture_step", backend, logits.device, HAS_TRITON_PATH)
    if path == "triton" and k > TRITON_MAX_K:
        if backend is not None or os.environ.get(ENV_VAR):
            raise ValueError(
                f"mixture_step: the Triton path supports k <= {TRITON_MAX_K}, got k={k}; "
                "use backend='reference'"
            )
        path = "reference"
    step = mixture_step_triton if path == "triton" else mixture_step_ref
    return step(
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
