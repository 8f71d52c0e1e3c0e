"""Back-propagating a piece of the training graph as a backward of its own.

Autograd sums all the gradients a tensor receives before passing them on: a weight used by
two pieces of one graph has the first piece's whole gradient held until the second's
arrives. The policy forward has two such pairs: the shared prompt's two passes use every
decoder weight, and a tied LM head is the input embedding. `backward_apart` cuts a piece
out of the graph; its backward runs as soon as the enclosing backward has delivered the
gradients of the piece's outputs, so each piece's weight gradients go straight into
`.grad` (same gradients, summed in another order).

The contract (`can_cut`): the caller back-propagates once, with `.backward()` into the
leaves' `.grad`, in one process. Not `torch.autograd.grad` or `backward(inputs=...)` (the
piece's gradients would go to `.grad` regardless), not `create_graph=True` or a second
backward through a retained graph (both refused with an error), and not under DDP or FSDP,
whose hooks take each parameter's gradient once per backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def can_cut(*outputs: torch.Tensor) -> bool:
    """Whether `backward_apart` applies to `outputs`: gradients are being recorded for
    them, in one process (the caller also keeps the rest of the contract above)."""
    if not (torch.is_grad_enabled() and any(out.requires_grad for out in outputs)):
        return False
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def backward_apart(
    outputs: Sequence[torch.Tensor],
    leaves: Sequence[torch.Tensor] = (),
    sources: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, ...]:
    """Views of `outputs` (any shapes) cut from their graph; their backward runs the
    outputs' own graph with the gradients they received, then passes the gradient of each
    of `leaves` (detached `requires_grad` copies of `sources` that the outputs were
    computed from) on to its source. Gradients that reach nothing but the outputs' graph
    (weights) are accumulated into `.grad` there."""
    if len(leaves) != len(sources):
        raise ValueError("backward_apart: one source per leaf")
    # an input requiring grad keeps the cut in the enclosing graph even when no source does
    anchor = torch.empty(0, requires_grad=True)
    cut = [out.detach() for out in outputs]
    return _Apart.apply((list(outputs), list(leaves)), anchor, *sources, *cut)


class _Apart(torch.autograd.Function):
    """Identity on detached outputs; the backward of `backward_apart`."""

    @staticmethod
    def forward(ctx, piece, anchor, *tensors):
        ctx.piece = piece  # (outputs in the piece's graph, leaves)
        ctx.set_materialize_grads(False)  # an output without gradient stays None
        return tuple(t.view_as(t) for t in tensors[len(piece[1]) :])

    @staticmethod
    def backward(ctx, *grads):
        if ctx.piece is None:
            raise RuntimeError(
                "backward_apart: this piece was already back-propagated (a second backward "
                "through a retained graph, or reentrant checkpointing replaying it)"
            )
        if torch.is_grad_enabled():
            raise RuntimeError("backward_apart: create_graph=True is not supported")
        outputs, leaves = ctx.piece
        ctx.piece = None  # the piece's graph is freed with this backward
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        if pairs:
            with torch.enable_grad():  # activation checkpointing replays layers here
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, *(leaf.grad for leaf in leaves), *(None for _ in grads))
