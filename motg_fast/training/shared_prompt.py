"""The training forward with each distinct prompt computed once.

The G rows of a group share their prompt: one pass runs the U distinct prompts into a KV
cache, a second runs every row's fed-back actions on a copy of its prompt's keys and
values. Outputs equal the full forward over every row up to the order of floating-point
sums; the prompt compute drops G-fold.

Both passes write the cache through `PrefixLayer` (:func:`prefix_layer_class`), whose
update returns "fixed prefix + new states" instead of appending to what it holds and
keeps only the first call's: replaying a layer (gradient checkpointing recomputes each
layer during backward) returns the same keys and values as the first call and leaves the
cache as it was, so sharing and activation checkpointing combine.

Every weight serves both passes: when the caller allows it (`apart`), the prompt pass is
back-propagated apart (`backward_apart`), so autograd does not hold the fed-back pass's
gradient of every weight until the prompt pass's arrives. Reentrant activation
checkpointing replays a layer's forward without a graph, which would cut the gradient from
the fed-back pass to the prompt's keys and values: there prompts are not shared.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ..models import cache_argument
from .backward_apart import backward_apart, can_cut


def distinct_prompts(prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(prompt_of_row [N], first_row [U])` int64: the index of each row's prompt among the
    U distinct prompts (in order of first appearance) and the first row holding each; None
    when no two rows share a prompt (nothing to share)."""
    index: dict[tuple[int, ...], int] = {}
    first_row: list[int] = []
    prompt_of_row = []
    for row, prompt in enumerate(prompt_ids):
        key = tuple(prompt)
        if key not in index:
            index[key] = len(first_row)
            first_row.append(row)
        prompt_of_row.append(index[key])
    if len(first_row) == len(prompt_ids):
        return None
    return torch.tensor(prompt_of_row), torch.tensor(first_row)


# transformers drops the cache argument of a layer it checkpoints unless the layer declares
# that a replay is safe with this flag; `PrefixLayer` makes it safe for the layers it fills.
_REPLAY_SAFE_FLAG = "_can_checkpoint_with_cache"


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers whose activations transformers recomputes in backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [
        m
        for m in model.modules()
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing is True
    ]


def can_share_prompt(model: torch.nn.Module) -> bool:
    """Whether `shared_prompt_forward` applies: only full-attention layers (a sliding window
    or a recurrent layer keeps no plain K/V to copy) and, under gradient checkpointing,
    non-reentrant checkpointing in a transformers that lets a checkpointed layer keep its
    cache (`_REPLAY_SAFE_FLAG`)."""
    checkpointing = any(
        getattr(m, "gradient_checkpointing", False) is True for m in model.modules()
    )
    layers = checkpointed_layers(model) if checkpointing else []
    if checkpointing and not (layers and all(hasattr(m, _REPLAY_SAFE_FLAG) for m in layers)):
        return False
    if any(_reentrant(layer) for layer in layers):
        return False
    text_config = model.config.get_text_config(decoder=True)
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"]
    return set(layer_types) == {"full_attention"}


def _reentrant(layer: torch.nn.Module) -> bool:
    """Whether transformers checkpoints `layer` with reentrant checkpointing (its
    checkpoint function's `use_reentrant`, torch's default True when unset or unknown)."""
    function = getattr(layer, "_gradient_checkpointing_func", None)
    return getattr(function, "keywords", {}).get("use_reentrant", True) is not False


@contextlib.contextmanager
def keep_cache_under_checkpointing(decoder: torch.nn.Module):
    """Let the checkpointed layers of `decoder` keep their cache argument for the duration
    (their replays are safe: every cache layer is a `PrefixLayer`)."""
    layers = checkpointed_layers(decoder)
    for layer in layers:
        setattr(layer, _REPLAY_SAFE_FLAG, True)
    try:
        yield
    finally:
        for layer in layers:
            delattr(layer, _REPLAY_SAFE_FLAG)  # back to the class's value


@functools.cache
def prefix_layer_class() -> type:
    """`PrefixLayer`, a transformers cache layer, defined on first use (this module does
    not import transformers until a forward needs it)."""
    from transformers.cache_utils import DynamicLayer

    class PrefixLayer(DynamicLayer):
        """A cache layer holding a fixed prefix `[U,heads,S,d]` (or none), gathered to
        the batch's rows by `rows [B]` when given. Each update returns prefix + the new
        states; with `keep`, the first one is kept (the next pass reads it), a replayed
        one (activation checkpointing's recomputation) is not: it appends nothing twice
        and keeps no recomputed tensor, with its graph, alive. Without `keep` (the last
        pass) nothing is kept: the gathered prefix and the concatenation live only as long
        as the attention needs them."""

        def __init__(self, keys=None, values=None, rows=None, keep: bool = True):
            super().__init__()
            self.prefix, self.rows, self.keep = (keys, values), rows, keep
            self.updated = False
            if keys is not None:  # the prefix's length is the cache's length
                self.device, self.keys, self.values = keys.device, keys, values
                self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = self.prefix
            if keys is not None:
                if self.rows is not None:
                    keys, values = (t.index_select(0, self.rows) for t in (keys, values))
                key_states = torch.cat([keys, key_states], dim=-2)
                value_states = torch.cat([values, value_states], dim=-2)
            if self.keep and not self.updated:
                self.device, self.keys, self.values = key_states.device, key_states, value_states
                self.is_initialized = self.updated = True
            return key_states, value_states

    return PrefixLayer


def _prefix_cache(layers: list | None = None):
    """A cache of `PrefixLayer`s: the given ones, or empty ones made per layer."""
    from transformers.cache_utils import Cache

    if layers is None:
        return Cache(layer_class_to_replicate=prefix_layer_class())
    return Cache(layers=layers)


def shared_prompt_forward(
    decoder: torch.nn.Module,
    inputs: torch.Tensor,
    batch,
    shared: tuple[torch.Tensor, torch.Tensor],
    apart: bool = False,
) -> torch.Tensor:
    """The final hidden states `[N,T,H]` that score the T actions, computing each distinct
    prompt once (`shared` from `distinct_prompts`; `batch` a
    :class:`~motg_fast.training.policy.SequenceBatch`).

    One pass runs the U distinct prompts `[U,P]` into a KV cache; a second runs the
    fed-back actions `[N,T−1]` on it, each layer gathering its keys and values to the N
    rows (`index_select`, whose backward sums the rows' gradients into their prompt's).
    Positions, masks and therefore outputs are those of the full forward over
    `inputs [N,P+T−1,H]`; only the order of floating-point sums differs. With `apart` (the
    caller keeps `backward_apart`'s contract) the prompt pass is back-propagated apart.
    """
    p = batch.prompt_length
    prompt_of_row, first_row = (index.to(inputs.device) for index in shared)
    fed_back = inputs.shape[1] > p  # else one action per row: no second pass
    apart = apart and fed_back and can_cut(inputs)
    with keep_cache_under_checkpointing(decoder):
        last, keys, values = _prompt_pass(decoder, inputs[first_row, :p], batch, first_row, apart)
        last_prompt = last[prompt_of_row]  # [N,1,H] scores action 0
        if not fed_back:
            return last_prompt
        return _fed_pass(decoder, inputs, batch, last_prompt, keys, values, prompt_of_row)


def _prompt_pass(decoder, prompt_inputs, batch, first_row, apart: bool):
    """`(last hidden state [U,1,H], keys, values)` of the distinct prompts `[U,P,H]` (one
    `[U,heads,P,d]` per layer); with `apart`, cut from the graph (`backward_apart`)."""
    p = prompt_inputs.shape[1]
    leaf = prompt_inputs.detach().requires_grad_() if apart else prompt_inputs
    prompt_cache = _prefix_cache()
    hidden = decoder(
        inputs_embeds=leaf,
        attention_mask=batch.attention_mask[first_row, :p],
        position_ids=batch.position_ids[first_row, :p],
        use_cache=False,  # the given cache is still filled; True warns under checkpointing
        **{cache_argument(decoder): prompt_cache},
    ).last_hidden_state
    outputs = [hidden[:, p - 1 :]]
    outputs += [layer.keys for layer in prompt_cache.layers]
    outputs += [layer.values for layer in prompt_cache.layers]
    if apart:
        outputs = backward_apart(outputs, [leaf], [prompt_inputs])
    n = len(prompt_cache.layers)
    return outputs[0], outputs[1 : 1 + n], outputs[1 + n :]


def _fed_pass(decoder, inputs, batch, last_prompt, keys, values, prompt_of_row):
    """`[N,T,H]`: the last prompt state and every row's fed-back actions run on its
    prompt's keys and values (gathered per layer as the layer runs)."""
    p = batch.prompt_length
    layer_class = prefix_layer_class()
    row_cache = _prefix_cache(
        [layer_class(k, v, rows=prompt_of_row, keep=False) for k, v in zip(keys, values)]
    )
    fed_hidden = decoder(
        inputs_embeds=inputs[:, p:],
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids[:, p:],
        use_cache=False,  # the given cache is still filled; True warns under checkpointing
        **{cache_argument(decoder): row_cache},
    ).last_hidden_state
    return torch.cat([last_prompt, fed_hidden], dim=1)
