"""The Triton kernels of `mixture_logprobs` (the math, the launchers and the autograd function
are in `mixture_logprobs.py`): the logits tile, the forward partial and finalize kernels,
the backward's dlogits chunk and the float32-accumulating matmul.
"""

from __future__ import annotations

from ._backend import jit, tl
from ._online_softmax import combine_stats, reduce_stats, tile_stats


@jit
def logits_tile(
    # hidden [N,H] and weight [V,H] (row strides given, unit column strides)
    h_ptr,
    stride_h,
    w_ptr,
    stride_w,
    H,
    # the tile: int64 row offsets [BLOCK_N] and vocabulary columns [BLOCK_V], with masks
    offs_n,
    n_mask,
    offs_v,
    v_mask,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Float32 logits `h[offs_n] · W[offs_v]ᵀ` as a `[BLOCK_N, BLOCK_V]` tile."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        a = tl.load(
            h_ptr + offs_n[:, None] * stride_h + offs_h[None, :],
            mask=n_mask[:, None] & h_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + offs_v[:, None] * stride_w + offs_h[None, :],
            mask=v_mask[:, None] & h_mask[None, :],
            other=0.0,
        )
        if UPCAST:  # Triton's CPU interpreter computes 16-bit dots wrongly
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@jit
def _store_at_ids(
    # a tile of scaled logits x [BLOCK_N, BLOCK_V] (columns v0…), its rows and their mask
    x,
    ids_ptr,
    out_ptr,
    offs_n,
    n_mask,
    v0,
    v_end,
    K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Store `x[n, ids_nj − v0]` to `out[n, j]` for every id inside the tile's columns."""
    offs_c = tl.arange(0, BLOCK_V)
    for j in range(K):
        id_j = tl.load(ids_ptr + offs_n * K + j, mask=n_mask, other=-1)
        col = id_j - v0
        inside = n_mask & (col >= 0) & (col < BLOCK_V) & (id_j < v_end)
        if tl.max(inside.to(tl.int32), axis=0) > 0:  # most tiles hold none of the block's ids
            hit = offs_c[None, :] == col[:, None]
            x_j = tl.sum(tl.where(hit, x, 0.0), axis=1)
            tl.store(out_ptr + offs_n * K + j, x_j, mask=inside)


@jit
def _id_columns(ids_ptr, offs_n, n_mask, v0, K: tl.constexpr, BLOCK_V: tl.constexpr):
    """`[BLOCK_N, BLOCK_V]` bool: the tile's columns (v0…) that hold one of the row's ids."""
    offs_c = tl.arange(0, BLOCK_V)
    hit = (offs_n[:, None] < 0) & (offs_c[None, :] < 0)  # all False, [BLOCK_N, BLOCK_V]
    for j in range(K):
        id_j = tl.load(ids_ptr + offs_n * K + j, mask=n_mask, other=-1)
        hit = hit | (offs_c[None, :] == (id_j - v0)[:, None])
    return hit


@jit
def logprobs_fwd_partial_kernel(
    # inputs: hidden [N,H], weight [V,H], 1/τ
    h_ptr,
    stride_h,
    w_ptr,
    stride_w,
    N,
    V,
    H,
    inv_tau,
    # ids [N,K]; output x [N,K] float32: the scaled logit at each id, written by the program
    # whose split holds the id (from the very tile that enters the logsumexp)
    ids_ptr,
    x_ptr,
    # outputs, [splits, N] float32 each: running max m, Σ e^{x−m}, Σ e^{x−m}(x−m); with REST
    # also the max and Σ e^{x−m} over the columns that hold none of the row's ids
    m_ptr,
    s_ptr,
    t_ptr,
    rm_ptr,
    rs_ptr,
    # program (i, j) covers rows i·BLOCK_N… and vocabulary columns [j·span, (j+1)·span)
    span,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    REST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    v_start = split * span
    v_end = tl.minimum(v_start + span, V)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    rm = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    rs = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        logits = logits_tile(
            h_ptr=h_ptr,
            stride_h=stride_h,
            w_ptr=w_ptr,
            stride_w=stride_w,
            H=H,
            offs_n=offs_n,
            n_mask=n_mask,
            offs_v=offs_v.to(tl.int64),
            v_mask=v_mask,
            BLOCK_N=BLOCK_N,
            BLOCK_V=BLOCK_V,
            BLOCK_H=BLOCK_H,
            UPCAST=UPCAST,
            PRECISION=PRECISION,
        )
        x = tl.where(v_mask[None, :], logits * inv_tau, float("-inf"))
        tm, ts, tt = tile_stats(x, tl.max(x, axis=1), 1)
        m, s, t = combine_stats(m, s, t, tm, ts, tt)
        _store_at_ids(x, ids_ptr, x_ptr, offs_n, n_mask, v0, v_end, K, BLOCK_V)
        if REST:
            xr = tl.where(_id_columns(ids_ptr, offs_n, n_mask, v0, K, BLOCK_V), float("-inf"), x)
            rm_tile = tl.max(xr, axis=1)
            rm_new = tl.maximum(rm, rm_tile)
            safe = tl.where(rm_new == float("-inf"), 0.0, rm_new)
            rs = rs * tl.exp(rm - safe) + tl.sum(tl.exp(xr - safe[:, None]), axis=1)
            rm = rm_new
    out = split.to(tl.int64) * N + offs_n
    tl.store(m_ptr + out, m, mask=n_mask)
    tl.store(s_ptr + out, s, mask=n_mask)
    tl.store(t_ptr + out, t, mask=n_mask)
    if REST:
        tl.store(rm_ptr + out, rm, mask=n_mask)
        tl.store(rs_ptr + out, rs, mask=n_mask)


@jit
def logprobs_fwd_finalize_kernel(
    # per-split partials [splits, N] from the partial kernel
    m_ptr,
    s_ptr,
    t_ptr,
    splits,
    N,
    k,
    # in: the scaled logits at the ids [N,k]; out: logprobs [N,k] (same buffer, float32)
    logp_ptr,
    # outputs (float32): logsumexp [N], entropy [N]; with REST the partial rest states and
    # rest [N] = log Σ_{v∉ids} p_v
    lse_ptr,
    ent_ptr,
    rm_ptr,
    rs_ptr,
    rest_ptr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    REST: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S).to(tl.int64)
    s_mask = offs_s < splits
    m = tl.load(m_ptr + offs_s * N + row, mask=s_mask, other=float("-inf"))
    s = tl.load(s_ptr + offs_s * N + row, mask=s_mask, other=0.0)
    t = tl.load(t_ptr + offs_s * N + row, mask=s_mask, other=0.0)
    m_max, total, centred = reduce_stats(m, s, t, 0)
    lse = m_max + tl.log(total)
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, tl.log(total) - centred / total)
    if REST:
        rm = tl.load(rm_ptr + offs_s * N + row, mask=s_mask, other=float("-inf"))
        rs = tl.load(rs_ptr + offs_s * N + row, mask=s_mask, other=0.0)
        top = tl.max(rm, 0)
        safe = tl.where(top == float("-inf"), 0.0, top)
        rest_total = tl.sum(rs * tl.exp(rm - safe), 0)
        tl.store(rest_ptr + row, safe + tl.log(rest_total) - lse)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < k
    x = tl.load(logp_ptr + row * k + offs_k, mask=k_mask, other=0.0)
    tl.store(logp_ptr + row * k + offs_k, x - lse, mask=k_mask)


@jit
def logprobs_bwd_dlogits_kernel(
    # inputs: hidden [N,H], weight [V,H]; this launch covers columns [v0, v0 + chunk)
    h_ptr,
    stride_h,
    w_ptr,
    stride_w,
    N,
    V,
    H,
    v0,
    chunk,
    inv_tau,
    # per row (float32 [N]): logsumexp, entropy, Σ_j g_j − g_lse (+ g_rest), g_ent; with
    # REST the rest (clamped to a finite floor) and its upstream grad g_rest
    lse_ptr,
    ent_ptr,
    coef_ptr,
    gent_ptr,
    rest_ptr,
    grest_ptr,
    # per slot: ids [N,K], upstream grads g [N,K] (float32)
    ids_ptr,
    g_ptr,
    # output: dlogits [N, chunk] in the input dtype, row stride given
    dz_ptr,
    stride_dz,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    REST: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_v = v0 + offs_c.to(tl.int64)
    v_mask = (offs_c < chunk) & (offs_v < V)
    logits = logits_tile(
        h_ptr=h_ptr,
        stride_h=stride_h,
        w_ptr=w_ptr,
        stride_w=stride_w,
        H=H,
        offs_n=offs_n,
        n_mask=n_mask,
        offs_v=offs_v,
        v_mask=v_mask,
        BLOCK_N=BLOCK_N,
        BLOCK_V=BLOCK_V,
        BLOCK_H=BLOCK_H,
        UPCAST=UPCAST,
        PRECISION=PRECISION,
    )
    x = logits * inv_tau
    lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
    ent = tl.load(ent_ptr + offs_n, mask=n_mask, other=0.0)
    coef = tl.load(coef_ptr + offs_n, mask=n_mask, other=0.0)
    g_ent = tl.load(gent_ptr + offs_n, mask=n_mask, other=0.0)
    logp = x - lse[:, None]
    dz = -tl.exp(logp) * (coef[:, None] + g_ent[:, None] * (logp + ent[:, None]))
    if REST:  # + g_rest · p_v / e^rest at the columns that hold no id
        rest = tl.load(rest_ptr + offs_n, mask=n_mask, other=0.0)
        g_rest = tl.load(grest_ptr + offs_n, mask=n_mask, other=0.0)
        first = (v0 + tl.program_id(1) * BLOCK_V).to(tl.int64)
        is_id = _id_columns(ids_ptr, offs_n, n_mask, first, K, BLOCK_V)
        outside = tl.exp(logp - rest[:, None]) * g_rest[:, None]
        dz += tl.where(is_id, 0.0, outside)
    for j in range(K):
        id_j = tl.load(ids_ptr + offs_n * K + j, mask=n_mask, other=-1).to(tl.int64)
        col_j = (id_j - v0).to(tl.int32)
        g_j = tl.load(g_ptr + offs_n * K + j, mask=n_mask, other=0.0)
        dz += tl.where(offs_c[None, :] == col_j[:, None], g_j[:, None], 0.0)
    tl.store(
        dz_ptr + offs_n[:, None] * stride_dz + offs_c[None, :],
        (dz * inv_tau).to(dz_ptr.dtype.element_ty),
        mask=n_mask[:, None] & v_mask[None, :],
    )


@jit
def matmul_accumulate_kernel(
    # a [M,Kd] and b [Kd,P] (row strides given, unit column strides)
    a_ptr,
    stride_a,
    b_ptr,
    stride_b,
    # c [M,P] float32 accumulator (row stride given): c += a @ b
    c_ptr,
    stride_c,
    M,
    P,
    Kd,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_KD: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_mask = offs_m < M
    p_mask = offs_p < P
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    for k0 in range(0, Kd, BLOCK_KD):
        offs_k = k0 + tl.arange(0, BLOCK_KD)
        k_mask = offs_k < Kd
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_a + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_k.to(tl.int64)[:, None] * stride_b + offs_p[None, :],
            mask=k_mask[:, None] & p_mask[None, :],
            other=0.0,
        )
        if UPCAST:  # Triton's CPU interpreter computes 16-bit dots wrongly
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c_ptrs = c_ptr + offs_m[:, None] * stride_c + offs_p[None, :]
    c_mask = m_mask[:, None] & p_mask[None, :]
    tl.store(c_ptrs, tl.load(c_ptrs, mask=c_mask, other=0.0) + acc, mask=c_mask)
