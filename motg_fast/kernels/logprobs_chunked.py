"""The chunked path of `mixture_logprobs` (`backend="chunked"`): the LM-head GEMMs go to
torch (cuBLAS on CUDA), a chunk of rows (forward) or vocabulary columns (backward) at a time,
so `[N,V]` logits never exist at once. Plain torch: runs on any device. The math, the chunk
sizes and the trade-off against the Triton path are in `mixture_logprobs.py`'s docstring.

Chunked path (`"chunked"`, plain torch: the GEMMs go to cuBLAS on CUDA, any device works):
the forward takes `C` whole rows at a time (`[C,V]` logits in the input dtype by one GEMM,
then float32: `logsumexp`, the log-probs at the ids gathered from the same float32 block,
the entropy only when asked for); the backward takes `C` vocabulary columns at a time
(`[N,C]` logits recomputed by one GEMM, `dz` in the input dtype, `dW[chunk] = dzᵀ h` by one
GEMM straight into its rows, `dh += dz W[chunk]` into a float32 `[N,H]` buffer: on CUDA by
a GEMM with a float32 output, elsewhere through the product rounded to the input dtype).
The backward chunks columns rather than rows so that no `[V,H]` gradient is summed across
chunks (a 16-bit sum would lose precision; a float32 one would cost a `[V,H]` buffer and
its traffic per chunk). `C` makes each float32 block about `CHUNK_BUDGET_BYTES`; peak
memory is a few such blocks. Deterministic where the GEMMs are. Same four `N·V·H` GEMMs as
the Triton path, but each logits block makes round trips through memory (GEMM output,
float32 copy, softmax passes) that the Triton kernels keep on chip.
Why Triton stays the default on CUDA: its epilogue never writes logits to memory, where the
chunked path moves every logits element through HBM several times (for N = 8192 and
V = 151936 one float32 pass is 5 GB); cuBLAS's GEMMs are likely faster than these untuned
`tl.dot` tiles. Which effect wins at the Qwen2.5-1.5B shapes has not been measured (no GPU
was available): `bench/bench_training_kernels.py` times both (`scripts/gpu_check.sh` runs
it); switch the default if the chunked path wins there.
"""

from __future__ import annotations

import torch

from .mixture_math import inverse_temperature

# Size of the chunked path's float32 logits block: [C, V] rows in the forward, [N, C]
# columns in the backward (peak memory is a few times this: the GEMM output, its float32
# copy and the softmax temporaries).
CHUNK_BUDGET_BYTES = 256 * 2**20


def row_chunk(N: int, V: int) -> int:
    """Rows per forward chunk: the float32 `[C, V]` block holds about CHUNK_BUDGET_BYTES."""
    return max(1, min(N, CHUNK_BUDGET_BYTES // max(1, 4 * V)))


def column_chunk(N: int, V: int) -> int:
    """Columns per backward chunk: the float32 `[N, C]` block holds about CHUNK_BUDGET_BYTES."""
    return max(1, min(V, CHUNK_BUDGET_BYTES // max(1, 4 * N)))


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """Scaled float32 logits `h Wᵀ/τ` of one chunk (`[n,H]`, `[c,H]` → `[n,c]`): the GEMM in
    the inputs' dtype (as an eager LM head), then float32, as the reference."""
    return (hidden @ weight.t()).float().mul_(inverse_temperature(temperature))


# torch >= 2.8 has GEMMs with a float32 output for 16-bit inputs (CUDA kernels only).
_FP32_OUT_GEMM = "dtype" in torch.ops.aten.addmm.overloads()


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`acc + a @ b` for a float32 accumulator `[M,P]`: on CUDA with 16-bit `a [M,K]`,
    `b [K,P]` one cuBLAS GEMM adds the float32 product (as the Triton path's dh matmul);
    elsewhere the product is rounded to the inputs' dtype before the add."""
    global _FP32_OUT_GEMM
    if _FP32_OUT_GEMM and a.is_cuda and a.dtype != torch.float32:
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32)
        except (NotImplementedError, TypeError):  # no such kernel in this build
            _FP32_OUT_GEMM = False
    return acc.add_(a @ b)


def chunked_forward(hidden, weight, ids, temperature, need_entropy, need_rest):
    """`(logprobs [N,k], logsumexp [N], entropy [N], rest [N])` (entropy and rest empty when
    not asked for): whole rows, a chunk at a time."""
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    logp = torch.empty(N, ids.shape[1], dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    ent = torch.empty(N if need_entropy else 0, dtype=torch.float32, device=dev)
    rest = torch.empty(N if need_rest else 0, dtype=torch.float32, device=dev)
    rows = row_chunk(N, V)
    for n0 in range(0, N, rows):
        part = slice(n0, n0 + rows)
        x = chunk_logits(hidden[part], weight, temperature)  # [C,V]
        lse[part] = torch.logsumexp(x, dim=-1)
        x.sub_(lse[part, None])  # now log p: the logits at the ids and the lse share x
        logp[part] = x.gather(1, ids[part])
        if need_entropy:
            ent[part] = -(x.exp() * x).sum(-1)
        if need_rest:  # log Σ_{v∉ids} p_v, summed without cancellation
            rest[part] = x.scatter_(1, ids[part], float("-inf")).logsumexp(-1)
        del x  # before the next chunk's GEMM allocates
    return logp, lse, ent, rest


def chunked_backward(saved, grads, temperature, need_hidden, need_weight, need_entropy):
    """`(dh [N,H] or None, dW [V,H] or None)`, the vocabulary in column chunks: each chunk's
    `dW` rows come from one GEMM (no cross-chunk accumulation of `[V,H]`), `dh` sums the
    chunks' products in a float32 `[N,H]` buffer (`_accumulate_product`)."""
    hidden, weight, ids, lse, ent, rest = saved
    g_logp, g_lse, g_ent, g_rest = grads
    need_rest = rest.numel() > 0
    N, H = hidden.shape
    V = weight.shape[0]
    grad_hidden = hidden.new_zeros(N, H, dtype=torch.float32) if need_hidden else None
    grad_weight = (torch.empty_like if N else torch.zeros_like)(weight) if need_weight else None
    g = g_logp.float()
    coef = g.sum(-1) - g_lse.float()
    if need_rest:  # ∂rest/∂x_v = [v∉ids] p_v / e^rest − p_v
        g_rest = g_rest.float()
        coef = coef + g_rest
        rest_floor = rest.clamp(min=torch.finfo(torch.float32).min)  # ids cover every p > 0
    coef = coef[:, None]
    cols = column_chunk(N, V)
    for v0 in range(0, V if N else 0, cols):
        w_chunk = weight[v0 : v0 + cols]
        width = w_chunk.shape[0]
        dz = chunk_logits(hidden, w_chunk, temperature).sub_(lse[:, None])  # log p [N,C]
        local = ids - v0
        inside = (local >= 0) & (local < width)
        outside = None
        if need_rest:  # g_rest · p_v / e^rest at the columns that hold no id
            outside = (dz - rest_floor[:, None]).exp_().mul_(g_rest[:, None])
            outside.masked_fill_(_id_columns(local, inside, width), 0.0)
        if need_entropy:  # dz = −p (coef + g_ent (log p + ent)), in place
            prob = dz.exp()
            dz.add_(ent[:, None]).mul_(g_ent.float()[:, None]).add_(coef).mul_(prob).neg_()
            del prob
        else:  # dz = −p · coef, in place
            dz.exp_().mul_(coef).neg_()
        if outside is not None:
            dz.add_(outside)
            del outside
        dz.scatter_add_(1, local.clamp(0, width - 1), torch.where(inside, g, 0.0))
        dz = dz.mul_(inverse_temperature(temperature)).to(
            hidden.dtype
        )  # frees the float32 block (16-bit inputs)
        if need_weight:
            torch.mm(dz.t(), hidden, out=grad_weight[v0 : v0 + width])
        if need_hidden:
            grad_hidden = _accumulate_product(grad_hidden, dz, w_chunk)
        del dz  # before the next chunk's GEMM allocates
    if need_hidden:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight


def _id_columns(local: torch.Tensor, inside: torch.Tensor, width: int) -> torch.Tensor:
    """`[N, width]` bool: the chunk's columns that hold one of the row's ids (`local [N,k]`
    the ids minus the chunk's first column, `inside` those within it)."""
    hits = torch.zeros(local.shape[0], width, dtype=torch.int32, device=local.device)
    hits.scatter_add_(1, local.clamp(0, width - 1), inside.to(torch.int32))
    return hits > 0


class ChunkedLogprobsFunction(torch.autograd.Function):
    """LM head + log-probs at ids through torch GEMMs in chunks, never `[N,V]` at once.

    `apply(hidden [N,H], weight [V,H], ids [N,k] int64, temperature, need_entropy,
    need_rest)` → `(logprobs [N,k], logsumexp [N], entropy [N], rest [N])`, float32 and
    differentiable; hidden and weight share one dtype. Without `need_entropy` /
    `need_rest` the entropy / rest is empty (`[0]`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, need_entropy, need_rest):
        logp, lse, ent, rest = chunked_forward(
            hidden, weight, ids, temperature, need_entropy, need_rest
        )
        ctx.save_for_backward(hidden, weight, ids, lse, ent, rest)
        ctx.temperature = temperature
        ctx.need_entropy = need_entropy
        return logp, lse, ent, rest

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_lse, g_ent, g_rest):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden, grad_weight = chunked_backward(
            ctx.saved_tensors,
            (g_logp, g_lse, g_ent, g_rest),
            ctx.temperature,
            need_hidden,
            need_weight,
            ctx.need_entropy,
        )
        return grad_hidden, grad_weight, None, None, None, None
