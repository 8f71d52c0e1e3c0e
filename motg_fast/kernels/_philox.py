"""The noise contract of the Triton rollout step: Gumbel(0, 1) noise from Philox.

One int64 seed per step, drawn from the caller's `torch.Generator` into a device tensor
(`philox_step_seed`: no host sync), keys Philox; the counters are
`(column or slot, row, stream, draw)`:
- stream 0, the selection noise: column c of row r takes output `c % 4` of
  Philox(key = seed, counter = (c // 4, r, 0, j)) for draw j. `sample` and `sample_topk`
  use draw 0 (`[B,V]`); `iid` uses draws j ∈ [0, k) (`[B,k,V]`, draw j at `[:, j]`), so its
  draw 0 is exactly the `sample` stream;
- stream 1, the weight noise `[B,k]`, and stream 2, the token noise `[B,k]`: output 0 of
  Philox(key = seed, counter = (slot, r, stream, 0)).
A uniform is the 24 high bits of a 32-bit output over 2**24, clamped to the smallest
normal float32, and the noise is `−log(−log(u))`, as `mixture_math.gumbel_noise` computes
it. `philox_step_noise` materialises exactly this noise as a `StepNoise`, so the reference
reproduces a Triton step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._backend import constexpr, device_guard, jit, tl, triton
from ._launch import cdiv, next_pow2

SEED_HIGH = 2**62  # seeds are drawn from [0, 2^62)
NOISE_BLOCK = 1024  # columns per program of `philox_step_noise`


class StepNoise(NamedTuple):
    """Explicit Gumbel(0, 1) noise of one step, each stream optional (None: drawn).

    `selection [B,V]` (`selection="sample"` / `"sample_topk"`) or `[B,k,V]` (`"iid"`: one
    row of noise per draw), `weight [B,k]` (`weighting="gumbel"`), `token [B,k]`
    (`representative="sample"`); a stream the spec does not use is ignored.
    """

    selection: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    token: torch.Tensor | None = None


_TINY = constexpr(torch.finfo(torch.float32).tiny)  # u is clamped here, as `gumbel_noise`
_TWO_POW_M24 = constexpr(2.0**-24)
STREAM_WEIGHT = constexpr(1)  # Philox counter word 2: 0 selection, 1 weights, 2 token
STREAM_TOKEN = constexpr(2)
# Where a stream's noise comes from, as the step kernels' constexprs `SEL_NOISE`, `W_NOISE`
# and `TOKEN` code it (0: the stream is unused).
NOISE_GIVEN = constexpr(1)  # an explicit tensor
NOISE_PHILOX = constexpr(2)  # drawn in-kernel from the seed


@jit
def uniform_to_gumbel(bits):
    """Gumbel(0, 1) from uint32 `bits`: u = 24 high bits / 2^24, clamped, `-log(-log(u))`."""
    u = (bits >> 8).to(tl.float32) * _TWO_POW_M24
    u = tl.maximum(u, _TINY)
    return -tl.log(-tl.log(u))


@jit
def column_gumbel(seed, row, base, draw, BLOCK: tl.constexpr):
    """Selection noise `[BLOCK]` of draw `draw` of `row` at columns `base…` (base % 4 == 0).

    Column c uses output `c % 4` of Philox(key = seed, counter = (c // 4, row, 0, draw)).
    """
    quad = (base // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    zero = quad * 0
    r0, r1, r2, r3 = tl.philox(seed, quad, zero + row.to(tl.uint32), zero, zero + draw)
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK])
    return uniform_to_gumbel(bits)


@jit
def draw_gumbel(seed, row, base, DRAWS: tl.constexpr, BLOCK: tl.constexpr):
    """Selection noise `[DRAWS, BLOCK]` of draws `0…DRAWS−1` of `row` at columns `base…`
    (base % 4 == 0): row j is `column_gumbel(seed, row, base, j, BLOCK)`."""
    quad = (base // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)[None, :]
    draws = tl.arange(0, DRAWS).to(tl.uint32)[:, None]
    zero = (quad + draws) * 0  # [DRAWS, BLOCK // 4]
    r0, r1, r2, r3 = tl.philox(seed, zero + quad, zero + row.to(tl.uint32), zero, zero + draws)
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [DRAWS, BLOCK])
    return uniform_to_gumbel(bits)


@jit
def slot_gumbel(seed, row, slots, STREAM: tl.constexpr):
    """Per-slot noise of `row`: output 0 of Philox(seed, counter = (slot, row, STREAM, 0))."""
    c0 = slots.to(tl.uint32)
    zero = c0 * 0
    r0, _, _, _ = tl.philox(seed, c0, zero + row.to(tl.uint32), zero + STREAM, zero)
    return uniform_to_gumbel(r0)


@jit
def load_seed(seed_ptr, NEEDED: tl.constexpr):
    if NEEDED:
        seed = tl.load(seed_ptr)
    else:
        seed = 0
    return seed


@jit
def _step_noise_kernel(
    # Philox seed [1] int64; outputs: selection [B,D,V], weight [B,k], token [B,k] float32
    seed_ptr,
    sel_ptr,
    weight_ptr,
    token_ptr,
    V,
    k,
    n_draws,
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Materialise the noise the step kernels draw (grid `(B, cdiv(V, BLOCK_V), D)`, D
    selection draws; D = 1 is the `[B,V]` layout)."""
    row = tl.program_id(0)
    vblock = tl.program_id(1)
    draw = tl.program_id(2)
    seed = tl.load(seed_ptr)
    base = vblock * BLOCK_V
    cols = base + tl.arange(0, BLOCK_V)
    noise = column_gumbel(seed, row, base, draw.to(tl.uint32), BLOCK_V)
    sel_row = (row.to(tl.int64) * n_draws + draw) * V
    tl.store(sel_ptr + sel_row + cols, noise, mask=cols < V)
    if (vblock == 0) & (draw == 0):
        slots = tl.arange(0, K_PAD)
        out = row.to(tl.int64) * k + slots
        weight_noise = slot_gumbel(seed, row, slots, STREAM_WEIGHT)
        tl.store(weight_ptr + out, weight_noise, mask=slots < k)
        tl.store(token_ptr + out, slot_gumbel(seed, row, slots, STREAM_TOKEN), mask=slots < k)


def philox_step_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Draw the Philox seed of one Triton step: int64 `[1]` on `device`.

    One `torch.randint` from `generator` (the default generator of `device` when None),
    kept on the device: the kernels load it, so no host sync happens. A generator on
    another device than the logits costs a copy (a sync for a CPU generator with CUDA
    logits); use one on the logits' device in the decode loop.
    """
    device = torch.device(device)
    source = generator.device if generator is not None else device
    seed = torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=source, generator=generator)
    return seed.to(device)


def philox_step_noise(
    seed: torch.Tensor, batch: int, vocab: int, k: int, *, draws: int | None = None
) -> StepNoise:
    """The Gumbel noise a Triton step keyed by `seed` draws, materialised.

    Returns a `StepNoise` of float32 `selection`, `weight [B,k]` and `token [B,k]` on
    `seed.device`: `mixture_step_ref(..., noise=...)` with it reproduces the step.
    `selection` is `[B,V]` (the `sample` / `sample_topk` stream) when `draws` is None, else
    `[B,draws,V]` with draw j at `[:, j]` (`iid` takes `draws=k`; draw 0 equals the `[B,V]`
    stream).
    """
    if triton is None:
        raise RuntimeError("philox_step_noise needs triton, which is not installed")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be one int64 value, got {seed.dtype} {tuple(seed.shape)}")
    if draws is not None and (not isinstance(draws, int) or isinstance(draws, bool) or draws < 1):
        raise ValueError(f"draws must be None or an integer >= 1, got {draws!r}")
    on = dict(dtype=torch.float32, device=seed.device)
    sel_shape = (batch, vocab) if draws is None else (batch, draws, vocab)
    noise = StepNoise(
        selection=torch.empty(sel_shape, **on),
        weight=torch.empty(batch, k, **on),
        token=torch.empty(batch, k, **on),
    )
    if batch == 0:
        return noise
    block = min(NOISE_BLOCK, max(4, next_pow2(vocab)))
    with device_guard(seed.device):
        _step_noise_kernel[(batch, cdiv(vocab, block), draws or 1)](
            seed_ptr=seed,
            sel_ptr=noise.selection,
            weight_ptr=noise.weight,
            token_ptr=noise.token,
            V=vocab,
            k=k,
            n_draws=draws or 1,
            K_PAD=next_pow2(k),
            BLOCK_V=block,
            enable_fp_fusion=False,  # compiled as the step kernels: bit-identical logs
        )
    return noise
