"""Back-propagating a piece of the training graph as a backward of its own.

Autograd sums all the gradients a tensor receives before passing them on: a weight used by
two pieces of one graph has the first piece's whole gradient held until the second's
arrives. The policy forward has two such pairs: the shared prompt's two passes use every
decoder weight, and a tied LM head is the input embedding. `backward_apart` cuts a piece
out of the graph; its backward runs as soon as the enclosing backward has delivered the
gradients of the piece's outputs, so each piece's weight gradients go straight into
`.grad` (same gradients, summed in another order).

Only in one process (`can_cut`): DDP's reducer and FSDP's hooks take each parameter's
gradient once per backward, so there the graph stays whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def can_cut(*outputs: torch.Tensor) -> bool:
    """Whether `backward_apart` applies: gradients are being recorded for `outputs`, in one
    process."""
    if not (torch.is_grad_enabled() and any(out.requires_grad for out in outputs)):
        return False
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def backward_apart(
    outputs: Sequence[torch.Tensor],
    leaves: Sequence[torch.Tensor] = (),
    sources: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, ...]:
    """Copies of `outputs` (any shapes) cut from their graph; their backward runs the
    outputs' own graph with the gradients they received, then passes the gradient of each
    of `leaves` (detached `requires_grad` copies of `sources` that the outputs were
    computed from) on to its source. Gradients that reach nothing but the outputs' graph
    (weights) are accumulated there."""
    if len(leaves) != len(sources):
        raise ValueError("backward_apart: one source per leaf")
    # with no source, a dummy input requiring grad keeps the cut in the enclosing graph
    anchors = tuple(sources) or (torch.empty(0, requires_grad=True),)
    cut = [out.detach() for out in outputs]
    return _Apart.apply((list(outputs), list(leaves)), len(anchors), *anchors, *cut)


class _Apart(torch.autograd.Function):
    """Identity on detached outputs; the backward of `backward_apart`."""

    @staticmethod
    def forward(ctx, graph, n_anchors: int, *tensors):
        ctx.graph, ctx.n_anchors = graph, n_anchors
        return tuple(t.clone() for t in tensors[n_anchors:])

    @staticmethod
    def backward(ctx, *grads):
        outputs, leaves = ctx.graph
        ctx.graph = None  # the piece's graph is freed with this backward
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        if pairs:
            with torch.enable_grad():  # activation checkpointing replays layers here
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        anchor_grads = [leaf.grad for leaf in leaves] or [None] * ctx.n_anchors
        return (None, None, *anchor_grads, *(None for _ in grads))
