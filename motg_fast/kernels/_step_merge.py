"""The rollout step's split path in Triton: `step_split_kernel` (programs over row ×
vocabulary split write partial online-softmax states and keys) and `step_merge_kernel`
(merge a row's splits by top-K_PAD of keys, or per draw for `iid`, then select). The device
functions they share with `step_row_kernel` are in `_step_scan.py`.
"""

from __future__ import annotations

from ._backend import jit, tl
from ._online_softmax import combine_stats, reduce_stats
from ._philox import NOISE_PHILOX, load_seed
from ._step_scan import _IID, _SAMPLE_TOPK, scan_columns, select_slots
from ._topk import KEY_EMPTY, KEY_FLOOR, absorb, empty_top


@jit
def step_split_kernel(
    # logits [B,V] (element strides), explicit selection noise (as `step_row_kernel`), seed
    logits_ptr,
    stride_row,
    stride_col,
    sel_noise_ptr,
    stride_noise_row,
    stride_noise_draw,
    seed_ptr,
    # partial results: keys [B, n_split, K_PAD] int64, sample_topk's sampled keys
    # [B, n_split] int64, states [B, n_split, 3] float32
    part_keys_ptr,
    part_sampled_ptr,
    part_stats_ptr,
    # sizes and scalars
    V,
    k,
    chunk,
    n_split,
    inv_temperature,
    # meta-parameters
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SELECTION: tl.constexpr,
    SEL_NOISE: tl.constexpr,
):
    """Program `(row, split)` scans columns `[split·chunk, (split+1)·chunk)` (grid `(B, n)`)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    seed = load_seed(seed_ptr, SEL_NOISE == NOISE_PHILOX)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    top, sampled, m, s, t = scan_columns(
        row_ptr=row_ptr,
        stride_col=stride_col,
        noise_row_ptr=sel_noise_ptr + row.to(tl.int64) * stride_noise_row,
        stride_noise_draw=stride_noise_draw,
        seed=seed,
        row=row,
        col_start=start,
        col_end=end,
        k=k,
        inv_temperature=inv_temperature,
        K_PAD=K_PAD,
        BLOCK_V=BLOCK_V,
        SELECTION=SELECTION,
        SEL_NOISE=SEL_NOISE,
    )
    part = row.to(tl.int64) * n_split + split
    tl.store(part_keys_ptr + part * K_PAD + tl.arange(0, K_PAD), top)
    if SELECTION == _SAMPLE_TOPK:
        tl.store(part_sampled_ptr + part, sampled)
    tl.store(part_stats_ptr + part * 3, m)
    tl.store(part_stats_ptr + part * 3 + 1, s)
    tl.store(part_stats_ptr + part * 3 + 2, t)


@jit
def step_merge_kernel(
    # logits [B,V] (for the k selected logits), partial results of `step_split_kernel`
    logits_ptr,
    stride_row,
    stride_col,
    part_keys_ptr,
    part_sampled_ptr,
    part_stats_ptr,
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
    n_split,
    k,
    inv_temperature,
    top_p,
    log_min_p,
    gumbel_temperature,
    gumbel_lo,
    gumbel_hi,
    # meta-parameters
    K_PAD: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    SELECTION: tl.constexpr,
    W_NOISE: tl.constexpr,
    WEIGHTING: tl.constexpr,
    USE_TOP_P: tl.constexpr,
    TOP_P_SLOTS: tl.constexpr,
    USE_MIN_P: tl.constexpr,
):
    """Merge the splits of one row, then select (grid `(B,)`)."""
    row = tl.program_id(0)
    seed = load_seed(seed_ptr, W_NOISE == NOISE_PHILOX)
    top = empty_top(K_PAD)
    kth = tl.min(top, 0)
    sampled = kth * 0 + KEY_EMPTY
    m = tl.max(tl.full([2], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([2], tl.float32), 0)
    t = s
    for first in range(0, n_split, SPLIT_BLOCK):
        splits = first + tl.arange(0, SPLIT_BLOCK)
        ok = splits < n_split
        part = row.to(tl.int64) * n_split + splits
        key_offs = part[:, None] * K_PAD + tl.arange(0, K_PAD)[None, :]
        keys = tl.load(part_keys_ptr + key_offs, mask=ok[:, None], other=KEY_EMPTY)
        if SELECTION == _IID:  # each draw's best over the splits
            top = tl.maximum(top, tl.max(keys, 0))
        else:
            keys = tl.where(keys < KEY_FLOOR, KEY_EMPTY, keys)  # a short split's placeholders
            top, kth = absorb(top, kth, tl.reshape(keys, [SPLIT_BLOCK * K_PAD]))
        if SELECTION == _SAMPLE_TOPK:
            part_sampled = tl.load(part_sampled_ptr + part, mask=ok, other=KEY_EMPTY)
            sampled = tl.maximum(sampled, tl.max(part_sampled, 0))
        pm = tl.load(part_stats_ptr + part * 3, mask=ok, other=float("-inf"))
        ps = tl.load(part_stats_ptr + part * 3 + 1, mask=ok, other=0.0)
        pt = tl.load(part_stats_ptr + part * 3 + 2, mask=ok, other=0.0)
        bm, bs, bt = reduce_stats(pm, ps, pt, 0)
        m, s, t = combine_stats(m, s, t, bm, bs, bt)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
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
