"""The noise contract of the Triton rollout step: Gumbel(0, 1) noise from Philox.

One int64 seed per step, drawn from the caller's `torch.Generator` into a device tensor
(`philox_step_seed`: no host sync), keys Philox; the counters are
`(column or slot, row, stream, 0)` with stream 0 for the selection noise `[B,V]` (column c
takes output `c % 4` of counter `c // 4`), 1 for the weight noise `[B,k]` and 2 for the
token noise `[B,k]` (output 0 of counter `slot`). A uniform is the 24 high bits of a
32-bit output over 2**24, clamped to the smallest normal float32, and the noise is
`−log(−log(u))`, as `mixture_math.gumbel_noise` computes it. `philox_step_noise`
materialises exactly this noise as a `StepNoise`, so the reference reproduces a Triton step.
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

    `selection [B,V]` (`selection="sample"`), `weight [B,k]` (`weighting="gumbel"`),
    `token [B,k]` (`representative="sample"`); a stream the spec does not use is ignored.
    """

    selection: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    token: torch.Tensor | None = None


_TINY = constexpr(torch.finfo(torch.float32).tiny)  # u is clamped here, as `gumbel_noise`
_TWO_POW_M24 = constexpr(2.0**-24)
STREAM_WEIGHT = constexpr(1)  # Philox counter word 2: 0 selection, 1 weights, 2 token
STREAM_TOKEN = constexpr(2)


@jit
def uniform_to_gumbel(bits):
    """Gumbel(0, 1) from uint32 `bits`: u = 24 high bits / 2^24, clamped, `-log(-log(u))`."""
    u = (bits >> 8).to(tl.float32) * _TWO_POW_M24
    u = tl.maximum(u, _TINY)
    return -tl.log(-tl.log(u))


@jit
def column_gumbel(seed, row, base, BLOCK: tl.constexpr):
    """Selection noise `[BLOCK]` of `row` at columns `base…` (base % 4 == 0).

    Column c uses output `c % 4` of Philox(key = seed, counter = (c // 4, row, 0, 0)).
    """
    quad = (base // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    zero = quad * 0
    r0, r1, r2, r3 = tl.philox(seed, quad, zero + row.to(tl.uint32), zero, zero)
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK])
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
    noise = column_gumbel(seed, row, base, BLOCK_V)
    tl.store(sel_ptr + row.to(tl.int64) * V + cols, noise, mask=cols < V)
    if vblock == 0:
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


def philox_step_noise(seed: torch.Tensor, batch: int, vocab: int, k: int) -> StepNoise:
    """The Gumbel noise a Triton step keyed by `seed` draws, materialised.

    Returns a `StepNoise` of float32 `selection [B,V]`, `weight [B,k]` and `token [B,k]` on
    `seed.device`: `mixture_step_ref(..., noise=...)` with it reproduces the step.
    """
    if triton is None:
        raise RuntimeError("philox_step_noise needs triton, which is not installed")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be one int64 value, got {seed.dtype} {tuple(seed.shape)}")
    on = dict(dtype=torch.float32, device=seed.device)
    noise = StepNoise(
        selection=torch.empty(batch, vocab, **on),
        weight=torch.empty(batch, k, **on),
        token=torch.empty(batch, k, **on),
    )
    if batch == 0:
        return noise
    block = min(NOISE_BLOCK, max(4, next_pow2(vocab)))
    with device_guard(seed.device):
        _step_noise_kernel[(batch, cdiv(vocab, block))](
            seed_ptr=seed,
            sel_ptr=noise.selection,
            weight_ptr=noise.weight,
            token_ptr=noise.token,
            V=vocab,
            k=k,
            K_PAD=next_pow2(k),
            BLOCK_V=block,
            enable_fp_fusion=False,  # compiled as the step kernels: bit-identical logs
        )
    return noise
