"""One autocast copy of the LM head per weight version, for `mixture_logprobs.py`
(`CACHE_WEIGHT_CASTS = False` in this module casts on every call instead).

Autocast: under `torch.autocast` the Triton and chunked paths run hidden and weight in the
autocast dtype, as `F.linear` would. The cast copy of a weight that is a leaf requiring
grad (the trainable LM head) is cached: every call between two optimizer steps (micro-
batches, the old-log-prob forward) reuses one copy, and the copy saved for backward is
that same tensor, where a per-call `weight.to(dtype)` would make (and save) a new
`[V,H]` copy each call (466 MB in bf16 for Qwen2.5-1.5B). torch's own autocast cache does
not help here: it serves only autocast ops (`F.linear`, not `Tensor.to`) and is emptied
when the outermost autocast region exits, once per micro-batch in a training loop. The
cache entry is rebuilt when the weight's version counter, storage, shape or device
changes and dropped after every `torch.optim` optimizer step (a global post-step hook:
fused optimizers update in place without bumping the version) and when the weight is freed.
A weight changed another way (through `.data` outside a torch optimizer) needs
`clear_weight_cast_cache()`.
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

# Cache the autocast-dtype copy of a leaf weight that requires grad (see the module
# docstring); False casts on every call, as before.
CACHE_WEIGHT_CASTS = True
_weight_casts: dict[int, tuple] = {}  # id(weight) -> (weakref, stamp, detached cast)
_step_hook = None
_casts_made = 0  # every copy `_cast_weight` has made in this process


def weight_casts_made() -> int:
    """How many cached LM-head copies to another dtype this process has made so far: the
    difference over a training step counts that step's casts."""
    return _casts_made


def cached_cast(weight: torch.Tensor) -> torch.Tensor | None:
    """The cached cast copy of `weight` (None when the cache holds none)."""
    entry = _weight_casts.get(id(weight))
    return entry[2] if entry is not None and entry[0]() is weight else None


def cached_cast_count() -> int:
    """How many weights the cache holds a cast of."""
    return len(_weight_casts)


def clear_weight_cast_cache() -> None:
    """Drop every cached LM-head cast (after changing a weight behind autograd's back, e.g.
    through `.data` outside a torch optimizer)."""
    _weight_casts.clear()


def _clear_after_optimizer_step(optimizer, args, kwargs) -> None:
    _weight_casts.clear()


def _cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The one place that copies the LM head to another dtype (detached)."""
    global _casts_made
    _casts_made += 1
    return weight.detach().to(dtype)


class _CachedCast(torch.autograd.Function):
    """`cast` (a detached copy of `weight` in another dtype) with its gradient sent to
    `weight` in `weight`'s dtype, as autograd would for `weight.to(dtype)`."""

    @staticmethod
    def forward(ctx, weight, cast):
        ctx.dtype = weight.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def _cacheable(weight: torch.Tensor) -> bool:
    return (
        CACHE_WEIGHT_CASTS
        and weight.requires_grad
        and weight.is_leaf
        and not weight.is_inference()
        and not torch.is_inference_mode_enabled()  # its copy could never be saved for backward
        and not torch.compiler.is_compiling()
    )


def autocast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight.to(dtype)` (differentiable), cast once per version of a trainable weight.

    The cached copy is reused while the weight's version counter, storage, shape and device
    are unchanged, and dropped after every `torch.optim` optimizer step (a global post-step
    hook, registered on first use: a fused optimizer updates in place without bumping the
    version counter) and when the weight is garbage collected.
    """
    global _step_hook
    if weight.dtype == dtype or not _cacheable(weight):
        return weight.to(dtype)
    key = id(weight)
    stamp = (weight._version, weight.data_ptr(), dtype, weight.device, weight.shape)
    entry = _weight_casts.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != stamp:
        ref = weakref.ref(weight, lambda _, key=key: _weight_casts.pop(key, None))
        entry = (ref, stamp, _cast_weight(weight, dtype))
        _weight_casts[key] = entry
        if _step_hook is None:
            _step_hook = register_optimizer_step_post_hook(_clear_after_optimizer_step)
    return _CachedCast.apply(weight, entry[2])
