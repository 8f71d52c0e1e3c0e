"""Mixture embedding: the input a MoT-G position feeds back to the model.

Math: `e_n = Σ_j w_nj E[ids_nj]` for embedding `E [V,H]`, ids `[N,k]`, weights `[N,k]`.
Backward: `dE[v] += Σ_{n,j: ids_nj = v} w_nj · de_n` (a scatter-add; a discrete token is
the case `w = [1, 0, …]`, exactly an embedding lookup) and `dw_nj = <de_n, E[ids_nj]>`.

Shapes: leading dimensions are free: ids and weights `[..., k]` give `[..., H]`, in the
embedding's dtype; accumulation in float32 (float64 for float64 inputs).

Zero-weight slots (k − 1 of the k slots at every discrete position: prompt, answer, k = 1
decoding) add exactly 0, so the Triton path skips them everywhere: the forward does not
read their rows, neither backward mode adds them to `dE` (no atomic, no sorted slot). They
still get their `dw_nj = <de_n, E[ids_nj]>`. So an inf/NaN in such a row of `E`, or in `de`,
does not leak through a zero weight (the reference computes `0 · inf = NaN` there).

Triton path (bf16/fp16/fp32; float64 inputs always run the reference):
- forward: one program per (position, block of H) loads the rows `E[ids_nj]` of the slots
  with `w_nj ≠ 0` and sums them weighted, in float32.
- backward, `deterministic=False` (default): one program per position computes `dw_n` and
  scatters `w_nj · de_n` into `dE` with float32 atomics, for `w_nj ≠ 0` only (the mask
  leaves the zero-weight slots' lanes idle). Fast, but the summation order of a
  row shared by several positions varies from run to run (last-bit differences). A bf16/fp16
  embedding needs a float32 `[V,H]` accumulator for the atomics, cast to the embedding dtype
  at the end.
- backward, `deterministic=True`: the `N·k` slots are sorted by token id (stable sort, so
  ties keep position order; zero-weight slots are dropped, they add exactly 0); the first
  slot of every run of equal ids owns that vocabulary row and sums its run, `BLOCK_M` slots
  at a time, in a fixed order, then writes the row once in the embedding dtype. Bit-identical
  across runs, no atomics, no float32 `[V,H]` buffer; one `O(N·k log N·k)` sort. A very
  frequent id makes one long run, summed by `H / BLOCK_H` programs.
`dw` is always computed without atomics (one program per position), so it is deterministic.
Rows of `dE` that no slot touches are zero.
"""

from __future__ import annotations

import torch

from ._backend import device_guard, jit, resolve_backend, tl
from ._launch import cdiv, next_pow2
from ._validation import check_float_matrix, check_ids, check_same_device


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def mixture_embed_ref(
    embedding: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Eager `Σ_j w_j E[ids_j]`: embedding `[V,H]`, ids/weights `[..., k]` → `[..., H]`."""
    acc = accumulation_dtype(embedding, weights)
    rows = torch.nn.functional.embedding(ids, embedding).to(acc)  # [..., k, H]
    mixed = (weights.to(acc).unsqueeze(-1) * rows).sum(-2)
    return mixed.to(embedding.dtype)


def check_embed_args(embedding: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
    """Raise a clear error for bad `mixture_embed` arguments."""
    check_float_matrix("embedding", embedding)
    check_ids("ids", ids, embedding.shape[0])
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    if ids.shape != weights.shape or ids.dim() < 1:
        raise ValueError(
            f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must share one shape "
            "[..., k]"
        )
    check_same_device(embedding=embedding, ids=ids, weights=weights)


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------


@jit
def _embed_fwd_kernel(
    # inputs: embedding [V,H] (row stride given, unit column stride), ids/weights [N,k]
    emb_ptr,
    stride_emb,
    ids_ptr,
    w_ptr,
    k,
    H,
    # output: mixture embedding [N,H] (contiguous)
    out_ptr,
    # tile sizes: BLOCK_K >= k slots, BLOCK_H hidden columns per program
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < k
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    ids = tl.load(ids_ptr + row * k + offs_k, mask=k_mask, other=0).to(tl.int64)
    w = tl.load(w_ptr + row * k + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    live = k_mask & (w != 0.0)  # a zero-weight slot adds exactly 0: its row is never read
    rows = tl.load(
        emb_ptr + ids[:, None] * stride_emb + offs_h[None, :],
        mask=live[:, None] & h_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    mixed = tl.sum(w[:, None] * rows, axis=0)
    tl.store(out_ptr + row * H + offs_h, mixed.to(out_ptr.dtype.element_ty), mask=h_mask)


@jit
def _embed_bwd_rows_kernel(
    # inputs: upstream grad de [N,H] (contiguous), embedding [V,H], ids/weights [N,k]
    grad_ptr,
    emb_ptr,
    stride_emb,
    ids_ptr,
    w_ptr,
    k,
    H,
    # outputs: dweights [N,k]; dE accumulator [V,H] (contiguous, float32) when SCATTER
    dw_ptr,
    de_acc_ptr,
    # what to compute, tile sizes
    COMPUTE_DW: tl.constexpr,
    SCATTER: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < k
    ids = tl.load(ids_ptr + row * k + offs_k, mask=k_mask, other=0).to(tl.int64)
    w = tl.load(w_ptr + row * k + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    live = k_mask & (w != 0.0)  # slots that scatter: a zero weight adds exactly 0 to dE
    dw = tl.zeros([BLOCK_K], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        tile_mask = k_mask[:, None] & h_mask[None, :]
        de = tl.load(grad_ptr + row * H + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        if COMPUTE_DW:
            rows = tl.load(
                emb_ptr + ids[:, None] * stride_emb + offs_h[None, :], mask=tile_mask, other=0.0
            ).to(tl.float32)
            dw += tl.sum(rows * de[None, :], axis=1)
        if SCATTER:
            tl.atomic_add(
                de_acc_ptr + ids[:, None] * H + offs_h[None, :],
                w[:, None] * de[None, :],
                mask=live[:, None] & h_mask[None, :],
                sem="relaxed",
            )
    if COMPUTE_DW:
        tl.store(dw_ptr + row * k + offs_k, dw.to(dw_ptr.dtype.element_ty), mask=k_mask)


@jit
def _embed_bwd_segments_kernel(
    # slots sorted by vocabulary row: sorted keys [M] (V marks a dropped zero-weight slot),
    # source slot index n·k + j [M], end of each slot's run of equal keys [M]
    keys_ptr,
    src_ptr,
    ends_ptr,
    # inputs: upstream grad de [N,H] (contiguous), flat weights [N·k]
    grad_ptr,
    w_ptr,
    k,
    V,
    H,
    # output: dE [V,H] (contiguous, zero-initialised, embedding dtype)
    de_ptr,
    # tile sizes: BLOCK_M slots of a run per step, BLOCK_H hidden columns per program
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    key = tl.load(keys_ptr + i)
    prev = tl.load(keys_ptr + i - 1, mask=i > 0, other=-1)
    if (key != prev) & (key < V):  # this program owns the run starting at slot i
        end = tl.load(ends_ptr + i)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for start in range(i, end, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_mask = offs_m < end
            src = tl.load(src_ptr + offs_m, mask=m_mask, other=0)
            w = tl.load(w_ptr + src, mask=m_mask, other=0.0).to(tl.float32)
            de = tl.load(
                grad_ptr + (src // k)[:, None] * H + offs_h[None, :],
                mask=m_mask[:, None] & h_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(w[:, None] * de, axis=0)
        tl.store(de_ptr + key * H + offs_h, acc.to(de_ptr.dtype.element_ty), mask=h_mask)


# ---------------------------------------------------------------------------------------
# Launchers: check, allocate, launch
# ---------------------------------------------------------------------------------------

_MAX_BLOCK_H = 512
_MAX_TILE = 4096  # BLOCK_K · BLOCK_H elements a row program holds (more spills registers)
_SEGMENT_BLOCK_M = 16


def _block_h(H: int, block_k: int = 1) -> int:
    return min(next_pow2(H), _MAX_BLOCK_H, max(16, _MAX_TILE // block_k))


def launch_embed_forward(embedding: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """`[V,H]`, `[N,k]`, `[N,k]` (contiguous) → `[N,H]` in the embedding dtype."""
    N, k = ids.shape
    H = embedding.shape[1]
    out = torch.empty(N, H, dtype=embedding.dtype, device=embedding.device)
    if N == 0 or H == 0:
        return out
    block_k = next_pow2(k)
    block_h = _block_h(H, block_k)
    _embed_fwd_kernel[(N, cdiv(H, block_h))](
        emb_ptr=embedding,
        stride_emb=embedding.stride(0),
        ids_ptr=ids,
        w_ptr=weights,
        k=k,
        H=H,
        out_ptr=out,
        BLOCK_K=block_k,
        BLOCK_H=block_h,
    )
    return out


def _embed_dweights(grad, embedding, ids, weights, *, compute_dw: bool, de_acc=None):
    """`dw [N,k]` (None unless `compute_dw`); also scatters `w·de` into `de_acc` when given."""
    N, k = ids.shape
    H = embedding.shape[1]
    dw = torch.zeros_like(weights) if compute_dw else None
    if N == 0 or H == 0 or (not compute_dw and de_acc is None):
        return dw
    _embed_bwd_rows_kernel[(N,)](
        grad_ptr=grad,
        emb_ptr=embedding,
        stride_emb=embedding.stride(0),
        ids_ptr=ids,
        w_ptr=weights,
        k=k,
        H=H,
        dw_ptr=dw if compute_dw else weights,
        de_acc_ptr=de_acc if de_acc is not None else grad,
        COMPUTE_DW=compute_dw,
        SCATTER=de_acc is not None,
        BLOCK_K=next_pow2(k),
        BLOCK_H=_block_h(H, next_pow2(k)),
    )
    return dw


def _embed_dembedding_sorted(grad, embedding, ids, weights) -> torch.Tensor:
    """Deterministic `dE [V,H]`: stable sort of the slots by id, one program per run."""
    V, H = embedding.shape
    grad_embedding = torch.zeros_like(embedding, memory_format=torch.contiguous_format)
    if ids.numel() == 0 or H == 0:
        return grad_embedding
    flat_w = weights.reshape(-1)
    keys = torch.where(flat_w != 0, ids.reshape(-1).long(), V)
    sorted_keys, src = torch.sort(keys, stable=True)
    ends = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    block_h = _block_h(H)
    _embed_bwd_segments_kernel[(sorted_keys.numel(), cdiv(H, block_h))](
        keys_ptr=sorted_keys,
        src_ptr=src,
        ends_ptr=ends,
        grad_ptr=grad,
        w_ptr=flat_w,
        k=ids.shape[1],
        V=V,
        H=H,
        de_ptr=grad_embedding,
        BLOCK_M=_SEGMENT_BLOCK_M,
        BLOCK_H=block_h,
    )
    return grad_embedding


def launch_embed_backward(
    grad, embedding, ids, weights, *, need_embedding, need_weights, deterministic
):
    """`(dE [V,H] or None, dw [N,k] or None)` for the upstream grad `[N,H]`."""
    grad = grad.contiguous()
    if not need_embedding:
        return None, _embed_dweights(grad, embedding, ids, weights, compute_dw=need_weights)
    if deterministic:
        dw = _embed_dweights(grad, embedding, ids, weights, compute_dw=need_weights)
        return _embed_dembedding_sorted(grad, embedding, ids, weights), dw
    de_acc = torch.zeros(embedding.shape, dtype=torch.float32, device=embedding.device)
    dw = _embed_dweights(grad, embedding, ids, weights, compute_dw=need_weights, de_acc=de_acc)
    return de_acc.to(embedding.dtype), dw  # no copy for a float32 embedding


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------


class MixtureEmbedFunction(torch.autograd.Function):
    """Triton `Σ_j w_j E[ids_j]` with backward to `E` and `w` (ids/weights flat `[N,k]`).

    `apply(embedding [V,H], ids [N,k], weights [N,k], deterministic: bool)` → `[N,H]`;
    ids and weights must be contiguous, the embedding row-major (unit column stride).
    """

    @staticmethod
    def forward(ctx, embedding, ids, weights, deterministic):
        ctx.save_for_backward(embedding, ids, weights)
        ctx.deterministic = bool(deterministic)
        with device_guard(embedding.device):
            return launch_embed_forward(embedding, ids, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        embedding, ids, weights = ctx.saved_tensors
        need_embedding, _, need_weights, _ = ctx.needs_input_grad
        with device_guard(embedding.device):
            grad_embedding, grad_weights = launch_embed_backward(
                grad,
                embedding,
                ids,
                weights,
                need_embedding=need_embedding,
                need_weights=need_weights,
                deterministic=ctx.deterministic,
            )
        return grad_embedding, None, grad_weights, None


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------


def mixture_embed(
    embedding: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    backend: str | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Differentiable mixture embedding `Σ_j w_j E[ids_j]`.

    Args:
        embedding: `[V,H]` input-embedding matrix (gradient flows into it).
        ids: `[..., k]` int64/int32 token ids.
        weights: `[..., k]` mixture weights (gradient flows into them).
        backend: None (auto), `"reference"` or `"triton"`; env `MOTG_BACKEND` as fallback.
            float64 inputs always run the reference.
        deterministic: Triton path only: scatter `dE` by a sorted, segmented reduction
            (bit-identical across runs) instead of float32 atomics (see the module docstring).

    Returns:
        `[..., H]` in the embedding's dtype.
    """
    check_embed_args(embedding, ids, weights)
    path = resolve_backend("mixture_embed", backend, embedding.device)
    if path == "reference" or torch.float64 in (embedding.dtype, weights.dtype):
        return mixture_embed_ref(embedding, ids, weights)
    if embedding.stride(1) != 1:
        embedding = embedding.contiguous()
    lead, k = ids.shape[:-1], ids.shape[-1]
    out = MixtureEmbedFunction.apply(
        embedding,
        ids.reshape(-1, k).contiguous(),
        weights.reshape(-1, k).contiguous(),
        deterministic,
    )
    return out.reshape(*lead, embedding.shape[1])
