"""The rollout step's last stage: the representative token and the mixture embedding.

Programs over (row, block of H): `e = Σ_j w_j E[S_j]` accumulated in float32 (float64 for a
float64 embedding) and stored in the embedding's dtype; the first block of a row also picks
the representative slot (Gumbel-max over the weight logits ω, i.e. log w up to a constant,
with given or Philox noise; argmax of ω; or slot 0) and stores it with its token.
"""

from __future__ import annotations

import torch

from ._backend import constexpr, jit, tl
from ._launch import cdiv, next_pow2
from ._philox import NOISE_GIVEN, NOISE_PHILOX, STREAM_TOKEN, slot_gumbel

EMBED_TILE = 4096  # K_PAD · BLOCK_H elements an embed program holds
# Codes of the constexpr `TOKEN`: the representative slot is the argmax of ω, a Gumbel-max
# draw over ω (noise `NOISE_GIVEN` 1 or `NOISE_PHILOX` 2), or slot 0.
TOKEN_ARGMAX = 0
TOKEN_FIRST = 3
_FIRST = constexpr(TOKEN_FIRST)


@jit
def _embed_token_kernel(
    # candidates [B,k] (ids int64, weights and weight logits float32, mask bool), token
    # noise [B,k], seed
    ids_ptr,
    weights_ptr,
    w_logits_ptr,
    mask_ptr,
    token_noise_ptr,
    seed_ptr,
    # embedding [V,H] (element strides) and outputs: embeds [B,H], token [B], slot [B]
    emb_ptr,
    stride_emb_row,
    stride_emb_col,
    embeds_ptr,
    token_ptr,
    slot_ptr,
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
    representative slot and its token (TOKEN 0: argmax of ω, 1: Gumbel-max over ω with
    given noise, 2: with Philox noise, 3: slot 0)."""
    row = tl.program_id(0)
    hblock = tl.program_id(1)
    slots = tl.arange(0, K_PAD)
    live = slots < k
    cand = row.to(tl.int64) * k + slots
    ids = tl.load(ids_ptr + cand, mask=live, other=0)
    w = tl.load(weights_ptr + cand, mask=live, other=0.0)
    if hblock == 0:
        if TOKEN == _FIRST:
            slot = tl.sum(slots * 0, 0)
        else:
            valid = live & (tl.load(mask_ptr + cand, mask=live, other=0) != 0)
            omega = tl.load(w_logits_ptr + cand, mask=live, other=0.0)
            score = tl.where(valid, omega, float("-inf"))
            if TOKEN == NOISE_GIVEN:
                score = score + tl.load(token_noise_ptr + cand, mask=live, other=0.0)
            if TOKEN == NOISE_PHILOX:
                score = score + slot_gumbel(tl.load(seed_ptr), row, slots, STREAM_TOKEN)
            slot = tl.argmax(score, 0)
        tl.store(token_ptr + row, tl.sum(tl.where(slots == slot, ids, 0), 0))
        tl.store(slot_ptr + row, slot.to(tl.int64))
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


def launch_embed(
    embedding, ids, weights, weight_logits, mask, *, seed, token_noise, token_source: int
):
    """`(token [B], slot [B], embeds [B,H])` (int64, int64, embedding dtype) of ids, weights,
    weight logits and mask `[B,k]`; `token_source` is the `TOKEN` code."""
    batch, k = ids.shape
    hidden = embedding.shape[1]
    token = torch.empty(batch, dtype=torch.int64, device=ids.device)
    slot = torch.empty(batch, dtype=torch.int64, device=ids.device)
    embeds = torch.empty(batch, hidden, dtype=embedding.dtype, device=ids.device)
    block_h = max(16, min(next_pow2(hidden), EMBED_TILE // next_pow2(k)))
    _embed_token_kernel[(batch, max(1, cdiv(hidden, block_h)))](
        ids_ptr=ids,
        weights_ptr=weights,
        w_logits_ptr=weight_logits,
        mask_ptr=mask,
        token_noise_ptr=token_noise if token_noise is not None else weights,
        seed_ptr=seed if seed is not None else ids,
        emb_ptr=embedding,
        stride_emb_row=embedding.stride(0),
        stride_emb_col=embedding.stride(1),
        embeds_ptr=embeds,
        token_ptr=token,
        slot_ptr=slot,
        k=k,
        H=hidden,
        K_PAD=next_pow2(k),
        BLOCK_H=block_h,
        TOKEN=token_source,
        ACC_F64=embedding.dtype == torch.float64,
        enable_fp_fusion=False,
    )
    return token, slot, embeds
