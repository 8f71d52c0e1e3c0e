"""Mixture log-probs fused with the LM head: log p' at the k stored ids of every position.

Math: logits `z = h Wᵀ` for hidden `h [N,H]` and LM-head weight `W [V,H]`,
`lse_n = logsumexp_v(z_nv/τ)`, `logprobs_nj = z_n,ids_nj/τ − lse_n`, and optionally the
entropy `ent_n = −Σ_v p_nv log p_nv` of `p_n = softmax(z_n/τ)` and the log-mass outside the
ids `rest_n = logsumexp_{v ∉ ids_n}(z_nv/τ) − lse_n` (a second online logsumexp over the
columns that hold no id, so confident rows keep their digits).
Backward (upstream grads `g [N,k]` on logprobs, `g_lse [N]` on lse, `g_ent [N]` on entropy,
`g_rest [N]` on rest): `∂/∂z_nv = (1/τ)(Σ_j g_nj [v = ids_nj] − (Σ_j g_nj − g_lse_n +
g_rest_n) · p_nv − g_ent_n · p_nv (log p_nv + ent_n) + g_rest_n [v ∉ ids_n] p_nv / e^rest_n)`,
then `dh = dz W`, `dW = dzᵀ h`.

Three paths (`backend=`), same outputs and gradients. The reference materialises `[N,V]`
logits (the eager baseline); the Triton and chunked paths never hold `[N,V]`.

Shapes: hidden `[..., H]`, ids `[..., k]` → logprobs `[..., k]`, logsumexp `[...]`, both
float32 (float64 for float64 inputs). The reference and the chunked path compute the logits
in the inputs' dtype, as an eager LM head would, then normalise them in float32; the Triton
path keeps each logits tile in float32 (accumulated in float32, never rounded to a 16-bit
input dtype), so for bf16/fp16 inputs the paths differ by that rounding.

Triton path (`"triton"`, the default for CUDA tensors; bf16/fp16/fp32 with hidden and weight
of one dtype; float64 inputs always run the reference):
- forward: programs tile `(BLOCK_N rows) × (a split of the vocabulary)`; each streams its
  split in `BLOCK_V` columns, computes the logits tile with `tl.dot` over `BLOCK_H` slices
  of H (float32 accumulation, logits kept in float32, not rounded to the input dtype), and
  keeps an online softmax state (`_online_softmax.py`: running max `m`, `Σ e^{x−m}`,
  `Σ e^{x−m}(x−m)` for the entropy). The tile that holds an id also hands its scaled logit
  to the output (one program owns each id), so the logits at the ids are the very numbers
  the logsumexp was taken over: whatever the dot precision (TF32 or IEEE float32, see
  below), `log p ≤ 0` up to float32 rounding of the logsumexp and the forward agrees with
  the backward, which recomputes the same tiles. A second kernel merges the splits per row
  and subtracts the logsumexp. Memory: `3·splits·N` floats.
- backward: for each chunk of `C` vocabulary columns (`C` chosen so the chunk buffer holds
  about `DLOGITS_BUDGET_BYTES`), a kernel recomputes the logits tile by tile and writes
  `dz [N,C]` in the input dtype (as eager autograd rounds the logits' grad); then
  `dW[chunk] = dzᵀ h` (a matmul straight into its rows of `dW`) and `dh += dz W[chunk]`
  (a Triton matmul accumulating into a float32 `[N,H]` buffer). Extra memory: the `[N,C]`
  chunk and the `[N,H]` float32 accumulator. The logits are computed twice (forward and
  backward): four `N·V·H` matmuls in all against eager's three. No atomics: deterministic.
With float32 inputs every `tl.dot` (forward tiles, backward tiles, the `dh` matmul) uses TF32
exactly when `torch.backends.cuda.matmul.allow_tf32` is set, as torch's own matmuls do (the
backward's `dW` matmul is torch's). The flag is read at each launch: a forward's logsumexp
and logits at the ids share one precision by construction, and its backward uses the same
one unless the flag is switched in between.

Chunked path (`"chunked"`, the default off CUDA, where `[N,V]` logits would set a training
step's peak memory; `logprobs_chunked.py`): the same outputs through torch GEMMs, a chunk of
rows or vocabulary columns at a time; why Triton stays the CUDA default is argued there.

Autocast: under `torch.autocast` the Triton and chunked paths run hidden and weight in the
autocast dtype, as `F.linear` would; the cast of a trainable LM head is made once per weight
version and shared by every call until the next optimizer step (`weight_cast.py`;
`clear_weight_cast_cache()` after changing a weight behind autograd's back).
"""

from __future__ import annotations

import torch

from ._backend import device_guard, resolve_backend, triton_interpreter_on
from ._launch import cdiv, next_pow2, sm_count
from ._validation import check_float_matrix, check_ids, check_same_device
from .logprobs_chunked import ChunkedLogprobsFunction
from .logprobs_kernels import (
    logprobs_bwd_dlogits_kernel,
    logprobs_fwd_finalize_kernel,
    logprobs_fwd_partial_kernel,
    matmul_accumulate_kernel,
)
from .mixture_embed import accumulation_dtype
from .mixture_math import inverse_temperature
from .spec import check_positive
from .weight_cast import (  # noqa: F401 - public
    autocast_weight,
    clear_weight_cast_cache,
    weight_casts_made,
)


def _scale(dtype: torch.dtype, temperature: float) -> float:
    """The logits' scale: the float32 reciprocal of τ that every float32 path multiplies by
    (`inverse_temperature`); exact `1/τ` in float64."""
    return 1.0 / temperature if dtype == torch.float64 else inverse_temperature(temperature)


def mixture_logprobs_ref(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager log-probs at ids: hidden `[N,H]`, weight `[V,H]`, ids `[N,k]` → `([N,k], [N])`."""
    acc = accumulation_dtype(hidden, lm_head_weight)
    logits = torch.nn.functional.linear(hidden, lm_head_weight).to(acc) * _scale(acc, temperature)
    lse = logits.logsumexp(-1)
    return logits.gather(-1, ids.long()) - lse.unsqueeze(-1), lse


def mixture_logprobs_rest_ref(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Eager `rest [N] = log Σ_{v ∉ ids} p_v`, the log-mass outside the ids, as a
    logsumexp over the other columns (no cancellation); arguments as the reference."""
    acc = accumulation_dtype(hidden, lm_head_weight)
    logits = torch.nn.functional.linear(hidden, lm_head_weight).to(acc) * _scale(acc, temperature)
    outside = logits.scatter(-1, ids.long(), float("-inf"))
    return outside.logsumexp(-1) - logits.logsumexp(-1)


def mixture_logprobs_entropy_ref(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager `(logprobs [N,k], logsumexp [N], entropy [N])`, arguments as the reference."""
    acc = accumulation_dtype(hidden, lm_head_weight)
    logits = torch.nn.functional.linear(hidden, lm_head_weight).to(acc) * _scale(acc, temperature)
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, ids.long()), logits.logsumexp(-1), entropy


def check_logprobs_args(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor, temperature: float
) -> None:
    """Raise a clear error for bad `mixture_logprobs` arguments."""
    check_float_matrix("lm_head_weight", lm_head_weight)
    if not hidden.is_floating_point() or hidden.dim() < 1:
        raise TypeError(f"hidden must be a floating-point tensor [..., H], got {hidden.dtype}")
    if hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden size {hidden.shape[-1]} does not match lm_head_weight "
            f"{tuple(lm_head_weight.shape)}"
        )
    check_ids("ids", ids, lm_head_weight.shape[0])
    if ids.dim() != hidden.dim() or ids.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"ids {tuple(ids.shape)} must be [..., k] with the leading shape of hidden "
            f"{tuple(hidden.shape)}"
        )
    check_positive("temperature", temperature)
    check_same_device(hidden=hidden, lm_head_weight=lm_head_weight, ids=ids)
    if hidden.dtype != lm_head_weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise TypeError(
            f"mixture_logprobs: hidden ({hidden.dtype}) and lm_head_weight "
            f"({lm_head_weight.dtype}) must share one dtype (or run under torch.autocast)"
        )


# ---------------------------------------------------------------------------------------
# Launchers: check, allocate, launch
# ---------------------------------------------------------------------------------------

# Size of the backward's dlogits chunk buffer [N, C] (C >= one tile, at most V).
DLOGITS_BUDGET_BYTES = 128 * 2**20
# Forward vocabulary splits on the CPU interpreter (on CUDA: enough programs for the SMs).
_INTERPRETER_SPLITS = 4


def _dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: float32 follows torch's TF32 switch for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _tile_config(N: int, dtype: torch.dtype, rest: bool = False) -> dict:
    """Block sizes and launch options of the logits-tile kernels (`rest`: at most 64 rows)."""
    if triton_interpreter_on():
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=32, UPCAST=True, PRECISION="ieee")
    block_n = max(16, min(64 if rest else 128, next_pow2(N)))
    block_v = 128
    block_h = 32 if dtype == torch.float32 else 64
    precision = _dot_precision(dtype)
    if precision == "ieee":  # float32 dots on FMA units: 128×128 tiles spill registers
        block_n, block_v = min(block_n, 64), 64
    return dict(
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_H=block_h,
        UPCAST=False,
        PRECISION=precision,
        num_warps=8,
        num_stages=3,
    )


def _matmul_config(dtype: torch.dtype) -> dict:
    if triton_interpreter_on():
        return dict(BLOCK_M=16, BLOCK_P=32, BLOCK_KD=32, UPCAST=True, PRECISION="ieee")
    block_kd = 32 if dtype == torch.float32 else 64
    return dict(
        BLOCK_M=128,
        BLOCK_P=128,
        BLOCK_KD=block_kd,
        UPCAST=False,
        PRECISION=_dot_precision(dtype),
        num_warps=8,
        num_stages=3,
    )


def vocab_splits(
    n_blocks: int, V: int, block_v: int, device: torch.device, num_sms: int | None = None
) -> tuple[int, int]:
    """`(splits, span)`: the forward grid's vocabulary axis; `span` is a multiple of BLOCK_V.

    On CUDA about two programs per SM (`num_sms`: the device's unless given, e.g. to plan
    for another GPU); in the CPU interpreter `_INTERPRETER_SPLITS`."""
    if num_sms is None and device.type == "cuda":
        num_sms = sm_count(device)
    target = 2 * num_sms if num_sms is not None else _INTERPRETER_SPLITS
    v_blocks = cdiv(V, block_v)
    wanted = max(1, min(v_blocks, cdiv(target, n_blocks)))
    span = cdiv(v_blocks, wanted) * block_v
    return cdiv(V, span), span


def vocab_chunk(N: int, V: int, element_size: int, block_v: int) -> int:
    """Columns per backward chunk: the `[N, C]` buffer holds about DLOGITS_BUDGET_BYTES."""
    columns = DLOGITS_BUDGET_BYTES // max(1, N * element_size)
    return min(V, max(block_v, columns // block_v * block_v))


def launch_logprobs_forward(hidden, weight, ids, temperature, need_rest=False, num_sms=None):
    """`(logprobs [N,k], logsumexp [N], entropy [N], rest [N])` float32 (rest empty unless
    `need_rest`); `[N,H]`, `[V,H]`, `[N,k]`; `num_sms` plans the grid for a GPU of that many
    SMs (`vocab_splits`)."""
    N, H = hidden.shape
    V, k = weight.shape[0], ids.shape[1]
    dev = hidden.device
    logp = torch.empty(N, k, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev)
    rest = torch.empty(N if need_rest else 0, dtype=torch.float32, device=dev)
    if N == 0:
        return logp, lse, ent, rest
    cfg = _tile_config(N, hidden.dtype, need_rest)
    n_blocks = cdiv(N, cfg["BLOCK_N"])
    splits, span = vocab_splits(n_blocks, V, cfg["BLOCK_V"], dev, num_sms)
    partial = torch.empty(5 if need_rest else 3, splits, N, dtype=torch.float32, device=dev)
    inputs = dict(h_ptr=hidden, stride_h=hidden.stride(0), w_ptr=weight, stride_w=weight.stride(0))
    states = dict(m_ptr=partial[0], s_ptr=partial[1], t_ptr=partial[2])
    rest_states = dict(
        rm_ptr=partial[3] if need_rest else partial[0],
        rs_ptr=partial[4] if need_rest else partial[0],
    )
    logprobs_fwd_partial_kernel[(n_blocks, splits)](
        N=N,
        V=V,
        H=H,
        inv_tau=inverse_temperature(temperature),
        ids_ptr=ids,
        x_ptr=logp,
        span=span,
        K=k,
        REST=need_rest,
        **inputs,
        **states,
        **rest_states,
        **cfg,
    )
    logprobs_fwd_finalize_kernel[(N,)](
        splits=splits,
        N=N,
        k=k,
        logp_ptr=logp,
        lse_ptr=lse,
        ent_ptr=ent,
        rest_ptr=rest if need_rest else lse,
        BLOCK_S=next_pow2(splits),
        BLOCK_K=next_pow2(k),
        REST=need_rest,
        **states,
        **rest_states,
    )
    return logp, lse, ent, rest


def _matmul_accumulate(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
    """`c += a @ b` with `c` float32 (`a [M,Kd]`, `b [Kd,P]`, unit column strides)."""
    M, Kd = a.shape
    P = b.shape[1]
    cfg = _matmul_config(a.dtype)
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(P, cfg["BLOCK_P"]))
    matmul_accumulate_kernel[grid](
        a_ptr=a,
        stride_a=a.stride(0),
        b_ptr=b,
        stride_b=b.stride(0),
        c_ptr=c,
        stride_c=c.stride(0),
        M=M,
        P=P,
        Kd=Kd,
        **cfg,
    )


def launch_logprobs_backward(saved, grads, temperature, need_hidden, need_weight):
    """`(dh [N,H] or None, dW [V,H] or None)`, the vocabulary streamed in chunks."""
    hidden, weight, ids, lse, ent, rest = saved
    g_logp, g_lse, g_ent, g_rest = grads
    N, H = hidden.shape
    V, k = weight.shape[0], ids.shape[1]
    dev = hidden.device
    grad_hidden = torch.zeros(N, H, dtype=torch.float32, device=dev) if need_hidden else None
    grad_weight = torch.zeros_like(weight) if need_weight else None
    if N == 0:
        return grad_hidden, grad_weight
    need_rest = rest.numel() > 0
    g = g_logp.float().contiguous()
    coef = g.sum(-1) - g_lse.float()
    if need_rest:  # ∂rest/∂x_v = [v∉ids] p_v / e^rest − p_v
        g_rest = g_rest.float().contiguous()
        coef = coef + g_rest
        rest = rest.clamp(min=torch.finfo(torch.float32).min).contiguous()  # ids cover all p>0
    coef = coef.contiguous()
    g_ent = g_ent.float().contiguous()
    cfg = _tile_config(N, hidden.dtype, need_rest)
    chunk = vocab_chunk(N, V, hidden.element_size(), cfg["BLOCK_V"])
    dz = torch.empty(N, chunk, dtype=hidden.dtype, device=dev)
    for v0 in range(0, V, chunk):
        width = min(chunk, V - v0)
        dz_chunk = dz[:, :width]
        logprobs_bwd_dlogits_kernel[(cdiv(N, cfg["BLOCK_N"]), cdiv(width, cfg["BLOCK_V"]))](
            h_ptr=hidden,
            stride_h=hidden.stride(0),
            w_ptr=weight,
            stride_w=weight.stride(0),
            N=N,
            V=V,
            H=H,
            v0=v0,
            chunk=width,
            inv_tau=inverse_temperature(temperature),
            lse_ptr=lse,
            ent_ptr=ent,
            coef_ptr=coef,
            gent_ptr=g_ent,
            rest_ptr=rest if need_rest else lse,
            grest_ptr=g_rest if need_rest else lse,
            ids_ptr=ids,
            g_ptr=g,
            dz_ptr=dz_chunk,
            stride_dz=dz_chunk.stride(0),
            K=k,
            REST=need_rest,
            **cfg,
        )
        if need_weight:
            torch.mm(dz_chunk.t(), hidden, out=grad_weight[v0 : v0 + width])
        if need_hidden:
            _matmul_accumulate(dz_chunk, weight[v0 : v0 + width], grad_hidden)
    if need_hidden:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------


class MixtureLogprobsFunction(torch.autograd.Function):
    """Fused LM head + log-probs at ids with backward to hidden and weight.

    `apply(hidden [N,H], weight [V,H], ids [N,k], temperature, need_rest)` →
    `(logprobs [N,k], logsumexp [N], entropy [N], rest [N])`, all float32 and
    differentiable (rest empty unless `need_rest`); hidden and weight share one dtype and
    have unit column strides, ids are contiguous.
    """

    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, need_rest=False):
        with device_guard(hidden.device):
            logp, lse, ent, rest = launch_logprobs_forward(
                hidden, weight, ids, temperature, need_rest
            )
        ctx.save_for_backward(hidden, weight, ids, lse, ent, rest)
        ctx.temperature = temperature
        return logp, lse, ent, rest

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_lse, g_ent, g_rest):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        saved = ctx.saved_tensors
        with device_guard(saved[0].device):
            grad_hidden, grad_weight = launch_logprobs_backward(
                saved, (g_logp, g_lse, g_ent, g_rest), ctx.temperature, need_hidden, need_weight
            )
        return grad_hidden, grad_weight, None, None, None


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------

# Paths of `mixture_logprobs`: every op's `BACKENDS` plus the torch-GEMM "chunked" path.
LOGPROBS_BACKENDS = ("reference", "triton", "chunked")


def _reference_path(hidden, lm_head_weight, ids, temperature, return_entropy, return_rest):
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_ids = ids.reshape(-1, ids.shape[-1])
    if return_entropy:
        out = mixture_logprobs_entropy_ref(flat_hidden, lm_head_weight, flat_ids, temperature)
    else:
        out = mixture_logprobs_ref(flat_hidden, lm_head_weight, flat_ids, temperature) + (None,)
    rest = None
    if return_rest:
        rest = mixture_logprobs_rest_ref(flat_hidden, lm_head_weight, flat_ids, temperature)
    return (*out, rest)


def _flat_inputs(hidden, lm_head_weight, ids, path):
    """`(hidden [N,H], weight [V,H], ids [N,k])` for the triton/chunked paths: the autocast
    dtype under `torch.autocast` (as `F.linear` would), one dtype, unit column strides."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # the LM head matmul autocasts, as F.linear
        dtype = torch.get_autocast_dtype(device_type)
        hidden, lm_head_weight = hidden.to(dtype), autocast_weight(lm_head_weight, dtype)
    if hidden.dtype != lm_head_weight.dtype:
        raise TypeError(
            f"mixture_logprobs: hidden ({hidden.dtype}) and lm_head_weight "
            f"({lm_head_weight.dtype}) must share one dtype on the {path} path"
        )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    if flat_hidden.stride(-1) != 1:
        flat_hidden = flat_hidden.contiguous()
    if lm_head_weight.stride(1) != 1:
        lm_head_weight = lm_head_weight.contiguous()
    return flat_hidden, lm_head_weight, ids.reshape(-1, ids.shape[-1])


def _triton_path(hidden, lm_head_weight, ids, temperature, return_rest):
    flat_hidden, weight, flat_ids = _flat_inputs(hidden, lm_head_weight, ids, "triton")
    return MixtureLogprobsFunction.apply(
        flat_hidden, weight, flat_ids.contiguous(), temperature, return_rest
    )


def _chunked_path(hidden, lm_head_weight, ids, temperature, return_entropy, return_rest):
    flat_hidden, weight, flat_ids = _flat_inputs(hidden, lm_head_weight, ids, "chunked")
    return ChunkedLogprobsFunction.apply(
        flat_hidden, weight, flat_ids.long(), temperature, return_entropy, return_rest
    )


def mixture_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str | None = None,
    return_entropy: bool = False,
    return_rest: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Differentiable `log softmax(h Wᵀ/τ)` at `ids`, with the logsumexp.

    Args:
        hidden: `[..., H]` final hidden states (gradient flows into them).
        lm_head_weight: `[V,H]` LM-head weight, tied to the embedding or not (gradient too).
        ids: `[..., k]` token ids whose log-probs are wanted.
        temperature: τ > 0.
        backend: None (auto: `"triton"` for CUDA tensors, else `"chunked"`),
            `"reference"`, `"triton"` (fused kernels), or `"chunked"` (torch GEMMs in
            chunks, any device; chosen per call only); env `MOTG_BACKEND` as fallback for
            the first three. float64 inputs always run the reference; the triton and
            chunked paths need hidden and weight in one dtype (under `torch.autocast` both
            take the autocast dtype, the weight's copy cached per weight version).
        return_entropy: also return the entropy of `softmax(h Wᵀ/τ)` (differentiable).
        return_rest: also return `rest [...] = log Σ_{v ∉ ids} p_v`, the log-mass outside
            the ids, as a logsumexp over the other columns (no `1 − Σ p` cancellation on
            confident rows; differentiable): what the exact Plackett–Luce likelihood of
            `sample` needs (`action_logprob(..., rest_logprob=rest)`).

    Returns:
        `(logprobs [..., k], logsumexp [...])`, float32 (float64 for float64 inputs), then
        `entropy [...]` when `return_entropy`, then `rest [...]` when `return_rest`.
    """
    check_logprobs_args(hidden, lm_head_weight, ids, temperature)
    if backend is not None and backend not in LOGPROBS_BACKENDS:
        raise ValueError(
            f"mixture_logprobs: unknown backend {backend!r}; expected one of {LOGPROBS_BACKENDS}"
        )
    if backend == "chunked":
        path = "chunked"
    else:
        path = resolve_backend("mixture_logprobs", backend, hidden.device, auto_cpu="chunked")
    args = (hidden, lm_head_weight, ids, temperature)
    if path == "reference" or torch.float64 in (hidden.dtype, lm_head_weight.dtype):
        outputs = _reference_path(*args, return_entropy, return_rest)
    elif path == "chunked":
        outputs = _chunked_path(*args, return_entropy, return_rest)
    else:
        outputs = _triton_path(*args, return_rest)
    logp, lse, ent, rest = outputs
    outputs = (logp, lse) + ((ent,) if return_entropy else ()) + ((rest,) if return_rest else ())
    lead = hidden.shape[:-1]
    shaped = (outputs[0].reshape(*lead, ids.shape[-1]),)
    return shaped + tuple(out.reshape(lead) for out in outputs[1:])
