"""The engine's argument checks: one-line `ValueError`s before any forward runs."""

from __future__ import annotations

import torch

from ..kernels import MixtureSpec
from ..kernels.spec import check_k


def as_id_list(value) -> list[int]:
    """`None`, one id or a sequence of ids as a list of ints."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def check_length(max_new_tokens) -> int:
    """`max_new_tokens` if it is an integer >= 1."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return max_new_tokens


def resolve_eos(eos_token_ids, tokenizer, model, vocab_size: int) -> list[int]:
    """The sorted stop ids: `eos_token_ids` if given, else the tokenizer's and the model's
    generation config's, each inside the vocabulary."""
    if eos_token_ids is not None:
        ids = as_id_list(eos_token_ids)
    else:
        ids = as_id_list(getattr(tokenizer, "eos_token_id", None))
        generation_config = getattr(model, "generation_config", None)
        ids += as_id_list(getattr(generation_config, "eos_token_id", None))
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"eos token ids {bad} lie outside the vocabulary [0, {vocab_size})")
    return sorted(set(ids))


def resolve_pad(tokenizer, eos_token_ids: list[int], vocab_size: int) -> int:
    """The padding id: the tokenizer's, else the first stop id, else 0."""
    for value in (getattr(tokenizer, "pad_token_id", None), *eos_token_ids, 0):
        if value is not None and 0 <= value < vocab_size:
            return int(value)
    return 0


def check_prompts(
    prompt_ids, max_new_tokens: int, vocab_size: int, max_positions: int | None
) -> list[list[int]]:
    """The prompts as lists of ints, each non-empty, inside the vocabulary and fitting the
    context with `max_new_tokens` more."""
    if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: pass a non-empty list of token-id lists")
    prompts = []
    for index, prompt in enumerate(prompt_ids):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty: every prompt needs at least one token")
        ids = [int(t) for t in prompt]
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(
                f"prompt {index} holds token ids outside the vocabulary [0, {vocab_size})"
            )
        check_context(index, len(ids), max_new_tokens, max_positions)
        prompts.append(ids)
    return prompts


def check_context(index: int, length: int, max_new_tokens: int, limit: int | None) -> None:
    """Prompt `index` of `length` tokens fits the model's `limit` positions (None: any)."""
    if limit is None:
        return
    if length > limit:
        raise ValueError(
            f"prompt {index} has {length} tokens, more than the model's context of {limit} "
            "positions (max_position_embeddings)"
        )
    if length + max_new_tokens > limit:
        raise ValueError(
            f"prompt {index} ({length} tokens) plus max_new_tokens={max_new_tokens} exceeds "
            f"the model's context of {limit} positions (max_position_embeddings)"
        )


def check_run(group_size: int, spec: MixtureSpec, vocab_size: int) -> None:
    """A group size >= 1 and a spec whose k fits the vocabulary."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    if not isinstance(spec, MixtureSpec):
        raise TypeError(f"spec must be a MixtureSpec, got {type(spec).__name__}")
    check_k(spec.k, vocab_size)
