"""Gaussian soft tokens ("Soft Tokens, Hard Truths"): the noise and its log-density.

A thinking step's input is `x = μ + σ ε` with `μ = Σ_j w_j E[S_j]` (probability weights)
and `ε ~ N(0, I_H)`. The action's log-likelihood under a policy whose mean is `μ_θ` is

    log N(x; μ_θ, σ² I) = −‖x − μ_θ‖² / (2σ²) − (H/2) log(2π σ²).

`ε` is never stored: it is a pure function of one int64 seed per trajectory row and the
step's position, `gaussian_input_noise(seed, position, H)`, so a trajectory keeps 2k numbers
per position plus one seed per row, and training regenerates the exact same ε on any device.
The generator is Philox4x32-10 (key = the seed's two 32-bit halves, counter =
(h // 4, position, 0, 0)) written in integer torch ops, then Box–Muller on the four 32-bit
outputs of each counter: `u1 = (o0 + 1) / 2^32`, `u2 = o1 / 2^32`,
`ε_{4b} = √(−2 log u1) cos 2πu2`, `ε_{4b+1} = √(−2 log u1) sin 2πu2`, and the same with
(o2, o3) for `ε_{4b+2}`, `ε_{4b+3}`.

Shapes: seeds and positions `[N]` (int64) → noise `[N,H]` float32.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of `a · b` for 32-bit values held in int64 (wraps mod 2^64)."""
    product = b * a
    return (product >> 32) & _MASK32, product & _MASK32


def philox4x32(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10: `counter [..., 4]` and `key [..., 2]` (int64 holding uint32 values,
    broadcastable) → four uint32 outputs `[..., 4]` (int64)."""
    c0, c1, c2, c3 = (counter[..., i] & _MASK32 for i in range(4))
    k0, k1 = key[..., 0] & _MASK32, key[..., 1] & _MASK32
    for _ in range(_ROUNDS):
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), dim=-1)


def gaussian_input_noise(seed: torch.Tensor, position: torch.Tensor, hidden: int) -> torch.Tensor:
    """Standard normal noise `[N, hidden]` float32 for rows with `seed [N]` at `position [N]`
    (int64; same values on every device for the same inputs)."""
    seed, position = seed.long(), position.long()
    blocks = torch.arange(-(-hidden // 4), dtype=torch.int64, device=seed.device)  # [Hb]
    counter = torch.stack(
        torch.broadcast_tensors(
            blocks[None, :], position[:, None], torch.zeros_like(blocks)[None, :],
            torch.zeros_like(blocks)[None, :],
        ),
        dim=-1,
    )  # fmt: skip
    key = torch.stack([seed & _MASK32, (seed >> 32) & _MASK32], dim=-1)[:, None, :]
    bits = philox4x32(counter, key).double()  # [N,Hb,4]
    u1 = (bits[..., 0::2] + 1.0) / 2.0**32  # (0, 1]
    u2 = bits[..., 1::2] / 2.0**32
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = 2.0 * math.pi * u2
    pairs = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
    return pairs.flatten(1)[:, :hidden].float()


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """`log N(x; mean, std² I)` over the last dimension: `[..., H]` × 2 → `[...]` (float32,
    float64 for float64 inputs), differentiable in both."""
    dtype = torch.float64 if torch.float64 in (x.dtype, mean.dtype) else torch.float32
    diff = x.to(dtype) - mean.to(dtype)
    hidden = x.shape[-1]
    return -(diff * diff).sum(-1) / (2.0 * std**2) - 0.5 * hidden * math.log(2.0 * math.pi * std**2)
