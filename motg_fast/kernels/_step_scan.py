"""The rollout step's logits pass in Triton: scan the rows, select the slots (see
`mixture_step.py` for the math and the launchers).

`scan_columns` streams part of one logits row in `BLOCK_V` tiles into an online softmax
state and the selection's running keys; `select_slots` turns a row's final state and keys
into ids, log-probs, the slot mask, the weight logits and the weights (all but `dirichlet`
and `blend`) and stores them.
Kernel: `step_row_kernel` (one program per row: scan, then select). The split kernels that
share these device functions are in `_step_merge.py`.

Running keys per selection (`SELECTION`; keys pack (score, id) as `_topk.py`):
- `topk` / `sample`: the top-K_PAD keys of z / of z/τ + g (stream 0, draw 0);
- `sample_topk`: the top-K_PAD keys of z, plus `sampled`, the best key of z/τ + g;
- `iid`: lane j holds the best key of z/τ + g_j (draw j of stream 0), lanes j ≥ k unused.
Splits merge by top-K_PAD of keys (`sampled`: max) or, for `iid`, by a per-lane max.
"""

from __future__ import annotations

from ._backend import constexpr, jit, tl
from ._online_softmax import combine_stats, tile_stats
from ._philox import (
    NOISE_GIVEN,
    NOISE_PHILOX,
    STREAM_WEIGHT,
    column_gumbel,
    draw_gumbel,
    load_seed,
    slot_gumbel,
)
from ._topk import (
    KEY_EMPTY,
    KEY_FLOOR,
    absorb,
    empty_top,
    key_ids,
    key_score,
    pack_keys,
    place_desc,
    sort_desc,
)

# Host codes of the constexprs `SELECTION` and `WEIGHTING` (`dirichlet`, `blend`: weights in torch).
SELECTION_CODES = {"topk": 0, "sample": 1, "sample_topk": 2, "iid": 3}
WEIGHTING_CODES = {"prob": 0, "gumbel": 1, "dirichlet": 2, "uniform": 3, "blend": 4}
_TOPK = constexpr(SELECTION_CODES["topk"])
_SAMPLE = constexpr(SELECTION_CODES["sample"])
_SAMPLE_TOPK = constexpr(SELECTION_CODES["sample_topk"])
_IID = constexpr(SELECTION_CODES["iid"])
_GUMBEL = constexpr(WEIGHTING_CODES["gumbel"])
_DIRICHLET = constexpr(WEIGHTING_CODES["dirichlet"])
_UNIFORM = constexpr(WEIGHTING_CODES["uniform"])
_BLEND = constexpr(WEIGHTING_CODES["blend"])
_NO_COLUMN = constexpr(2**40)  # above every column id


@jit
def scale_logits(z, inv_temperature):
    """`z/τ` in float32 as every path computes it: `z` times the float32 reciprocal of τ
    (`mixture_math.inverse_temperature`)."""
    return z * inv_temperature


@jit
def fold_draws(best_score, best_col, score, cols, inb):
    """Fold a tile of per-draw scores `score [D, BLOCK]` (columns `cols [BLOCK]` int64,
    in bounds where `inb`) into the running best of each draw, `best_score [D]` float32 and
    `best_col [D]` int64 (−1: nothing seen yet): the highest score, the lower column on ties
    (±0 tie, −inf ranks by column), as the keys of `_topk.py` order them."""
    tile_best = tl.max(score, 1)
    at_best = inb[None, :] & (score == tile_best[:, None])
    hit = tl.min(tl.where(at_best, cols[None, :], _NO_COLUMN), 1)
    win = (tile_best > best_score) | (best_col < 0)  # earlier columns win ties
    return tl.where(win, tile_best, best_score), tl.where(win, hit, best_col)


@jit
def scan_columns(
    # one logits row: pointer to its first element, column stride
    row_ptr,
    stride_col,
    # the row's explicit selection noise ([V], or [k,V] for iid with draw stride)
    noise_row_ptr,
    stride_noise_draw,
    # Philox key and row (counter word 1), the column range [col_start, col_end)
    seed,
    row,
    col_start,
    col_end,
    # k (iid draws), the float32 reciprocal of the temperature τ
    k,
    inv_temperature,
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SELECTION: tl.constexpr,
    SEL_NOISE: tl.constexpr,
):
    """Stream columns of one row: returns `(keys [K_PAD], sampled, m, s, t)`.

    `keys`: the running top-K_PAD keys, unordered (`topk`, `sample`, `sample_topk`), or the
    best key of each draw in draw order (`iid`); `sampled`: the best key of z/τ + g
    (`sample_topk`; KEY_EMPTY otherwise); `(m, s, t)`: the online softmax state of z/τ.
    """
    offs = tl.arange(0, BLOCK_V)
    top = empty_top(K_PAD)
    kth = tl.min(top, 0)
    bar = key_score(kth)  # the k-th score once `top` holds only real keys
    sampled = kth * 0 + KEY_EMPTY
    draws = tl.arange(0, K_PAD)
    best_score = tl.full([K_PAD], float("-inf"), tl.float32)
    best_col = tl.full([K_PAD], -1, tl.int64)
    m = tl.max(tl.full([2], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([2], tl.float32), 0)
    t = s
    for base in range(col_start, col_end, BLOCK_V):
        cols = base + offs
        inb = cols < col_end
        cols64 = cols.to(tl.int64)
        z = tl.load(row_ptr + cols64 * stride_col, mask=inb, other=float("-inf"))
        z = z.to(tl.float32)
        x = scale_logits(z, inv_temperature)
        if SELECTION == _IID:
            if SEL_NOISE == NOISE_GIVEN:
                offs2 = draws.to(tl.int64)[:, None] * stride_noise_draw + cols64[None, :]
                live = (draws < k)[:, None] & inb[None, :]
                g2 = tl.load(noise_row_ptr + offs2, mask=live, other=0.0)
            else:
                g2 = draw_gumbel(seed, row, base, K_PAD, BLOCK_V)
            best_score, best_col = fold_draws(best_score, best_col, x[None, :] + g2, cols64, inb)
            x_max = tl.max(x, 0)
        else:
            if SELECTION != _TOPK:
                if SEL_NOISE == NOISE_GIVEN:
                    g = tl.load(noise_row_ptr + cols64, mask=inb, other=0.0)
                else:
                    g = column_gumbel(seed, row, base, 0, BLOCK_V)
                drawn = x + g
            if SELECTION == _SAMPLE:
                score = drawn
                best = tl.max(score, 0)
                x_max = tl.max(x, 0)
            else:
                score = z
                best = tl.max(score, 0)
                # rounding of z/τ is monotone: the max of x is the scaled max of z
                x_max = scale_logits(best, inv_temperature)
            if SELECTION == _SAMPLE_TOPK:
                # later columns have higher ids: only a strictly higher score wins
                if (tl.max(drawn, 0) > key_score(sampled)) | (sampled < KEY_FLOOR):
                    sampled = tl.max(tl.where(inb, pack_keys(drawn, cols64), KEY_EMPTY), 0)
            # Later columns have higher ids, so a tile matters only if it beats the k-th score.
            if (best > bar) | (kth < KEY_FLOOR):
                keys = tl.where(inb, pack_keys(score, cols64), KEY_EMPTY)
                top, kth = absorb(top, kth, keys)
                bar = key_score(kth)
        tm, ts, tt = tile_stats(x, x_max, 0)
        m, s, t = combine_stats(m, s, t, tm, ts, tt)
    if SELECTION == _IID:
        top = pack_keys(best_score, best_col)
    return top, sampled, m, s, t


@jit
def select_slots(
    # the row, its final keys [K_PAD] (as `scan_columns` returns them), sample_topk's
    # sampled key and the online-softmax state
    row,
    top,
    sampled,
    m,
    s,
    t,
    # logits row (to reload the k selected logits), explicit weight noise [B,k], seed
    row_ptr,
    stride_col,
    weight_noise_ptr,
    seed,
    # outputs: ids, weights, weight logits, mask, logprobs [B,k]; logsumexp, entropy [B]
    ids_ptr,
    weights_ptr,
    w_logits_ptr,
    mask_ptr,
    logprobs_ptr,
    lse_ptr,
    entropy_ptr,
    # k, 1/τ, filters, the gumbel weighting temperature λ and its noise clamp [lo, hi]
    k,
    inv_temperature,
    top_p,
    log_min_p,
    gumbel_temperature,
    gumbel_lo,
    gumbel_hi,
    K_PAD: tl.constexpr,
    SELECTION: tl.constexpr,
    USE_TOP_P: tl.constexpr,
    TOP_P_SLOTS: tl.constexpr,
    USE_MIN_P: tl.constexpr,
    WEIGHTING: tl.constexpr,
    W_NOISE: tl.constexpr,
):
    """Candidates, log-probs, mask, weight logits ω and weights `softmax(ω)` over the valid
    slots (all but dirichlet's and blend's, drawn in torch) of one row; stores them.

    ids: `topk` / `sample` the keys best first; `iid` the draws in order; `sample_topk` the
    sampled token y, then the k−1 best logits of the other tokens (y's key, if among the
    top K_PAD ≥ k, ranks last: `mixture_math.select_sample_topk`).
    """
    slots = tl.arange(0, K_PAD)
    live = slots < k
    out = row.to(tl.int64) * k + slots
    if SELECTION == _IID:
        ids = key_ids(top)
    elif SELECTION == _SAMPLE_TOPK:
        first = key_ids(sampled)
        ranked = tl.where(key_ids(top) == first, KEY_EMPTY, top)  # below the placeholders
        ids = tl.where(slots == 0, first, key_ids(place_desc(ranked, K_PAD, 1)))
    else:
        ids = key_ids(sort_desc(top, K_PAD))
    ids = tl.where(live, ids, 0)
    z = tl.load(row_ptr + ids * stride_col, mask=live, other=float("-inf")).to(tl.float32)
    lse = m + tl.log(s)
    logprobs = scale_logits(z, inv_temperature) - lse
    valid = live & (logprobs > float("-inf"))
    if USE_TOP_P:
        p = tl.exp(logprobs)
        if TOP_P_SLOTS:  # the mass renormalised over the k slots
            p = p / tl.sum(tl.where(live, p, 0.0), 0)
        valid = valid & (tl.cumsum(p, 0) - p < top_p)
    if USE_MIN_P:
        valid = valid & (logprobs >= (m - lse) + log_min_p)
    valid = valid | (slots == 0)
    tl.store(ids_ptr + out, ids, mask=live)
    tl.store(logprobs_ptr + out, logprobs, mask=live)
    tl.store(mask_ptr + out, valid, mask=live)
    tl.store(lse_ptr + row, lse)
    tl.store(entropy_ptr + row, tl.log(s) - t / s)
    if WEIGHTING == _UNIFORM:
        count = tl.sum(valid.to(tl.float32), 0)
        w = tl.where(valid, tl.math.div_rn(count * 0.0 + 1.0, count), 0.0)  # 1/m, IEEE
        tl.store(w_logits_ptr + out, tl.zeros([K_PAD], tl.float32), mask=live)
        tl.store(weights_ptr + out, w, mask=live)
    elif (WEIGHTING != _DIRICHLET) & (WEIGHTING != _BLEND):
        kept = tl.where(valid, logprobs, float("-inf"))
        top_kept = tl.max(kept, 0)
        log_p = kept - (top_kept + tl.log(tl.sum(tl.exp(kept - top_kept), 0)))
        if WEIGHTING == _GUMBEL:
            if W_NOISE == NOISE_GIVEN:
                g = tl.load(weight_noise_ptr + out, mask=live, other=0.0)
            else:
                g = slot_gumbel(seed, row, slots, STREAM_WEIGHT)
            g = tl.minimum(tl.maximum(g, gumbel_lo), gumbel_hi)
            log_p = (log_p + g) / gumbel_temperature
        e = tl.exp(log_p - tl.max(log_p, 0))
        w = tl.where(valid, e / tl.sum(tl.where(valid, e, 0.0), 0), 0.0)
        tl.store(w_logits_ptr + out, tl.where(valid, log_p, 0.0), mask=live)
        tl.store(weights_ptr + out, w, mask=live)


@jit
def step_row_kernel(
    # logits [B,V] (element strides); explicit selection noise ([B,V] or iid's [B,k,V],
    # row and draw strides), weight noise [B,k]; Philox seed [1]
    logits_ptr,
    stride_row,
    stride_col,
    sel_noise_ptr,
    stride_noise_row,
    stride_noise_draw,
    weight_noise_ptr,
    seed_ptr,
    # outputs
    ids_ptr,
    weights_ptr,
    w_logits_ptr,
    mask_ptr,
    logprobs_ptr,
    lse_ptr,
    entropy_ptr,
    # sizes and scalars
    V,
    k,
    inv_temperature,
    top_p,
    log_min_p,
    gumbel_temperature,
    gumbel_lo,
    gumbel_hi,
    # meta-parameters
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SELECTION: tl.constexpr,
    SEL_NOISE: tl.constexpr,
    W_NOISE: tl.constexpr,
    WEIGHTING: tl.constexpr,
    USE_TOP_P: tl.constexpr,
    TOP_P_SLOTS: tl.constexpr,
    USE_MIN_P: tl.constexpr,
):
    """One program per row: scan the whole row, then select (grid `(B,)`)."""
    row = tl.program_id(0)
    seed = load_seed(seed_ptr, (SEL_NOISE == NOISE_PHILOX) | (W_NOISE == NOISE_PHILOX))
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    top, sampled, m, s, t = scan_columns(
        row_ptr=row_ptr,
        stride_col=stride_col,
        noise_row_ptr=sel_noise_ptr + row.to(tl.int64) * stride_noise_row,
        stride_noise_draw=stride_noise_draw,
        seed=seed,
        row=row,
        col_start=0,
        col_end=V,
        k=k,
        inv_temperature=inv_temperature,
        K_PAD=K_PAD,
        BLOCK_V=BLOCK_V,
        SELECTION=SELECTION,
        SEL_NOISE=SEL_NOISE,
    )
    select_slots(
        row=row,
        top=top,
        sampled=sampled,
        m=m,
        s=s,
        t=t,
        row_ptr=row_ptr,
        stride_col=stride_col,
        weight_noise_ptr=weight_noise_ptr,
        seed=seed,
        ids_ptr=ids_ptr,
        weights_ptr=weights_ptr,
        w_logits_ptr=w_logits_ptr,
        mask_ptr=mask_ptr,
        logprobs_ptr=logprobs_ptr,
        lse_ptr=lse_ptr,
        entropy_ptr=entropy_ptr,
        k=k,
        inv_temperature=inv_temperature,
        top_p=top_p,
        log_min_p=log_min_p,
        gumbel_temperature=gumbel_temperature,
        gumbel_lo=gumbel_lo,
        gumbel_hi=gumbel_hi,
        K_PAD=K_PAD,
        SELECTION=SELECTION,
        USE_TOP_P=USE_TOP_P,
        TOP_P_SLOTS=TOP_P_SLOTS,
        USE_MIN_P=USE_MIN_P,
        WEIGHTING=WEIGHTING,
        W_NOISE=W_NOISE,
    )
