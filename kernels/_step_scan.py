"""The rollout step's logits pass in Triton: scan the rows, select the slots (see
`mixture_step.py` for the math and the launchers).

`scan_columns` streams part of one logits row in `BLOCK_V` tiles into an online softmax
state and a running top-k of packed keys; `select_slots` turns a row's final state and
top-k into ids, log-probs, the slot mask and the `prob`/`gumbel` weights and stores them.
Kernels: `step_row_kernel` (one program per row: scan, then select), or
`step_split_kernel` (programs over row × vocabulary split write partial states and top-k)
followed by `step_merge_kernel` (merge a row's splits, then select).
"""

from __future__ import annotations

from ._backend import jit, tl
from ._online_softmax import combine_stats, reduce_stats, tile_stats
from ._philox import STREAM_WEIGHT, column_gumbel, load_seed, slot_gumbel
from ._topk import KEY_EMPTY, KEY_FLOOR, absorb, empty_top, key_ids, key_score, pack_keys, sort_desc


@jit
def scale_logits(z, temperature, inv_temperature, RECIPROCAL: tl.constexpr):
    """`z/τ` in float32 exactly as the reference computes it on this device: CUDA's
    `tensor / scalar` multiplies by the float32 reciprocal, the CPU divides (IEEE)."""
    if RECIPROCAL:
        x = z * inv_temperature
    else:
        x = tl.math.div_rn(z, tl.zeros_like(z) + temperature)
    return x


@jit
def scan_columns(
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
    top = empty_top(K_PAD)
    kth = tl.min(top, 0)
    bar = key_score(kth)  # the k-th score once `top` holds only real keys
    m = tl.max(tl.full([2], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([2], tl.float32), 0)
    t = s
    for base in range(col_start, col_end, BLOCK_V):
        cols = base + offs
        inb = cols < col_end
        cols64 = cols.to(tl.int64)
        z = tl.load(row_ptr + cols64 * stride_col, mask=inb, other=float("-inf"))
        z = z.to(tl.float32)
        x = scale_logits(z, temperature, inv_temperature, RECIPROCAL)
        if SAMPLE:
            if SEL_NOISE == 1:
                g = tl.load(noise_row_ptr + cols64, mask=inb, other=0.0)
            else:
                g = column_gumbel(seed, row, base, BLOCK_V)
            score = x + g
            best = tl.max(score, 0)
            x_max = tl.max(x, 0)
        else:
            score = z
            best = tl.max(score, 0)
            # rounding of z/τ is monotone: the max of x is the scaled max of z
            x_max = scale_logits(best, temperature, inv_temperature, RECIPROCAL)
        tm, ts, tt = tile_stats(x, x_max, 0)
        m, s, t = combine_stats(m, s, t, tm, ts, tt)
        # Later columns have higher ids, so a tile matters only if it beats the k-th score.
        if (best > bar) | (kth < KEY_FLOOR):
            keys = tl.where(inb, pack_keys(score, cols64), KEY_EMPTY)
            top, kth = absorb(top, kth, keys)
            bar = key_score(kth)
    return top, m, s, t


@jit
def select_slots(
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
    ids = tl.where(live, key_ids(sort_desc(top, K_PAD)), 0)
    z = tl.load(row_ptr + ids * stride_col, mask=live, other=float("-inf")).to(tl.float32)
    lse = m + tl.log(s)
    logprobs = scale_logits(z, temperature, inv_temperature, RECIPROCAL) - lse
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
                g = slot_gumbel(seed, row, slots, STREAM_WEIGHT)
            log_p = (log_p + g) / gumbel_temperature
        e = tl.exp(log_p - tl.max(log_p, 0))
        w = tl.where(valid, e / tl.sum(e, 0), 0.0)
        tl.store(weights_ptr + out, w, mask=live)


@jit
def step_row_kernel(
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
    seed = load_seed(seed_ptr, (SEL_NOISE == 2) | (W_NOISE == 2))
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    noise_row_ptr = sel_noise_ptr + row.to(tl.int64) * V
    top, m, s, t = scan_columns(
        row_ptr=row_ptr,
        stride_col=stride_col,
        noise_row_ptr=noise_row_ptr,
        seed=seed,
        row=row,
        col_start=0,
        col_end=V,
        temperature=temperature,
        inv_temperature=inv_temperature,
        K_PAD=K_PAD,
        BLOCK_V=BLOCK_V,
        SAMPLE=SAMPLE,
        SEL_NOISE=SEL_NOISE,
        RECIPROCAL=RECIPROCAL,
    )
    select_slots(
        row=row,
        top=top,
        m=m,
        s=s,
        t=t,
        row_ptr=row_ptr,
        stride_col=stride_col,
        weight_noise_ptr=weight_noise_ptr,
        seed=seed,
        ids_ptr=ids_ptr,
        weights_ptr=weights_ptr,
        mask_ptr=mask_ptr,
        logprobs_ptr=logprobs_ptr,
        lse_ptr=lse_ptr,
        entropy_ptr=entropy_ptr,
        k=k,
        temperature=temperature,
        inv_temperature=inv_temperature,
        top_p=top_p,
        log_min_p=log_min_p,
        gumbel_temperature=gumbel_temperature,
        K_PAD=K_PAD,
        RECIPROCAL=RECIPROCAL,
        USE_TOP_P=USE_TOP_P,
        USE_MIN_P=USE_MIN_P,
        WEIGHTING=WEIGHTING,
        W_NOISE=W_NOISE,
    )


@jit
def step_split_kernel(
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
    seed = load_seed(seed_ptr, SEL_NOISE == 2)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    noise_row_ptr = sel_noise_ptr + row.to(tl.int64) * V
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    top, m, s, t = scan_columns(
        row_ptr=row_ptr,
        stride_col=stride_col,
        noise_row_ptr=noise_row_ptr,
        seed=seed,
        row=row,
        col_start=start,
        col_end=end,
        temperature=temperature,
        inv_temperature=inv_temperature,
        K_PAD=K_PAD,
        BLOCK_V=BLOCK_V,
        SAMPLE=SAMPLE,
        SEL_NOISE=SEL_NOISE,
        RECIPROCAL=RECIPROCAL,
    )
    part = row.to(tl.int64) * n_split + split
    tl.store(part_keys_ptr + part * K_PAD + tl.arange(0, K_PAD), top)
    tl.store(part_stats_ptr + part * 3, m)
    tl.store(part_stats_ptr + part * 3 + 1, s)
    tl.store(part_stats_ptr + part * 3 + 2, t)


@jit
def step_merge_kernel(
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
    seed = load_seed(seed_ptr, W_NOISE == 2)
    top = empty_top(K_PAD)
    kth = tl.min(top, 0)
    m = tl.max(tl.full([2], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([2], tl.float32), 0)
    t = s
    for first in range(0, n_split, SPLIT_BLOCK):
        splits = first + tl.arange(0, SPLIT_BLOCK)
        ok = splits < n_split
        part = row.to(tl.int64) * n_split + splits
        key_offs = part[:, None] * K_PAD + tl.arange(0, K_PAD)[None, :]
        keys = tl.load(part_keys_ptr + key_offs, mask=ok[:, None], other=KEY_EMPTY)
        keys = tl.where(keys < KEY_FLOOR, KEY_EMPTY, keys)  # a short split's placeholders
        top, kth = absorb(top, kth, tl.reshape(keys, [SPLIT_BLOCK * K_PAD]))
        pm = tl.load(part_stats_ptr + part * 3, mask=ok, other=float("-inf"))
        ps = tl.load(part_stats_ptr + part * 3 + 1, mask=ok, other=0.0)
        pt = tl.load(part_stats_ptr + part * 3 + 2, mask=ok, other=0.0)
        bm, bs, bt = reduce_stats(pm, ps, pt, 0)
        m, s, t = combine_stats(m, s, t, bm, bs, bt)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    select_slots(
        row=row,
        top=top,
        m=m,
        s=s,
        t=t,
        row_ptr=row_ptr,
        stride_col=stride_col,
        weight_noise_ptr=weight_noise_ptr,
        seed=seed,
        ids_ptr=ids_ptr,
        weights_ptr=weights_ptr,
        mask_ptr=mask_ptr,
        logprobs_ptr=logprobs_ptr,
        lse_ptr=lse_ptr,
        entropy_ptr=entropy_ptr,
        k=k,
        temperature=temperature,
        inv_temperature=inv_temperature,
        top_p=top_p,
        log_min_p=log_min_p,
        gumbel_temperature=gumbel_temperature,
        K_PAD=K_PAD,
        RECIPROCAL=RECIPROCAL,
        USE_TOP_P=USE_TOP_P,
        USE_MIN_P=USE_MIN_P,
        WEIGHTING=WEIGHTING,
        W_NOISE=W_NOISE,
    )
