"""Host-side helpers shared by the launchers of every op: grid arithmetic and the GPU's size."""

from __future__ import annotations

import functools

import torch


def cdiv(a: int, b: int) -> int:
    """`ceil(a / b)` for integers."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two `>= n` (1 for n <= 1): `tl.arange` sizes."""
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
