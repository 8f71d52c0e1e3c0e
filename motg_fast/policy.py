"""Training forward: per-position log-likelihoods of stored trajectories under a policy.

A trajectory is a prompt (token ids) and T completion actions, each in one representation
(see `kernels/likelihood.py`): `ids [k]`, `weights [k]`, `mask [k]`, the slot of the
representative token, and a phase (thinking mixture or discrete answer).

The training sequence of trajectory n is its prompt followed by the inputs its actions fed
back: `[prompt_0 … prompt_{P−1}, a_0 … a_{T−2}]`, every element an (ids, weights) pair
(a prompt token is `ids = [t, …]`, `w = [1, 0, …]`). Inputs are rebuilt with
`mixture_embed` from the *current* embedding, so gradients reach it exactly as for a
discrete lookup. The hidden state before action t (the last prompt position for t = 0)
scores it: `mixture_logprobs` gives `log p'` at the action's k ids without ever
materialising `[N, T, V]` logits; `action_logprob` turns those into the chosen likelihood.

Batch layout: prompts are left padded to the longest prompt P, completions right padded to
the longest completion T, so every action t sits at sequence position `P − 1 + t`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import MixtureSpec, action_logprob, mixture_embed, mixture_logprobs
from .types import Phase, Trajectories, left_pad


@dataclass
class SequenceBatch:
    """Model inputs of a `Trajectories` batch: L = P + T − 1 sequence positions."""

    input_ids: torch.Tensor  # [N,L,k] int64
    input_weights: torch.Tensor  # [N,L,k] float32
    attention_mask: torch.Tensor  # [N,L] int64
    position_ids: torch.Tensor  # [N,L] int64
    prompt_length: int  # P: action t is scored by the hidden state at P − 1 + t


def build_sequence_batch(traj: Trajectories) -> SequenceBatch:
    """Lay out prompts (left padded) and fed-back actions (right padded) as model inputs.

    Padding positions are masked out of attention and never scored, so their token (0)
    cannot change any output.
    """
    n, t, k = traj.ids.shape
    device = traj.ids.device
    if min(len(p) for p in traj.prompt_ids) < 1:
        raise ValueError("every trajectory needs a prompt of at least one token")
    prompt_ids, prompt_mask = left_pad(traj.prompt_ids, pad_id=0)
    prompt_len = prompt_ids.shape[1]
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    prompt_slots = torch.zeros(n, prompt_len, k, dtype=torch.long, device=device)
    prompt_slots[..., 0] = prompt_ids
    prompt_weights = torch.zeros(n, prompt_len, k, dtype=traj.weights.dtype, device=device)
    prompt_weights[..., 0] = prompt_mask.to(traj.weights.dtype)
    fed_back = traj.completion_mask[:, 1:].long()  # a_t is fed only if a_{t+1} exists
    attention_mask = torch.cat([prompt_mask, fed_back], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return SequenceBatch(
        input_ids=torch.cat([prompt_slots, traj.ids[:, : t - 1]], dim=1),
        input_weights=torch.cat([prompt_weights, traj.weights[:, : t - 1]], dim=1),
        attention_mask=attention_mask,
        position_ids=position_ids,
        prompt_length=prompt_len,
    )


# Config fields of model families whose logits are not plain `h Wᵀ` (scaled or soft-capped
# after the LM head): the fused log-probs would disagree with the model's own logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor]:
    """The base decoder (returns final-normed hidden states) and the LM-head weight `[V,H]`."""
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} transforms its logits ({name}={value}); training "
                "log-probs are computed as softmax(h Wᵀ/τ) and would not match its rollouts"
            )
    decoder = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(model).__name__} is not a causal LM with a base model and head")
    return decoder, head.weight


@dataclass
class PolicyScores:
    """Per-position outputs of `score_trajectories` for a batch of N trajectories."""

    logprobs: torch.Tensor  # [N,T,k] log p' at the action ids (differentiable)
    action_logprob: torch.Tensor  # [N,T] log-likelihood of each action (differentiable)
    embed_norm: torch.Tensor  # [N,T] norm of the fed-back input embedding (detached)


def action_loglik(
    logprobs: torch.Tensor, traj: Trajectories, spec: MixtureSpec, *, likelihood: str
) -> torch.Tensor:
    """`[N,T]` likelihood of each action from log-probs `[N,T,k]` at its ids.

    Thinking (mixture) positions use `likelihood` under `spec`; discrete positions and
    padding use the log-prob of the representative token (a discrete sample's exact
    likelihood).
    """
    token_lp = logprobs.gather(-1, traj.token_slot.unsqueeze(-1)).squeeze(-1)
    if likelihood == "token":
        return token_lp
    # Outside the thinking phase only slot 0 was drawn: hide the filler slots.
    is_mixture = (traj.phase == Phase.MIXTURE).unsqueeze(-1)
    first_slot = torch.zeros_like(traj.mask)
    first_slot[..., 0] = True
    safe_lp = torch.where(is_mixture | first_slot, logprobs, float("-inf"))
    mixture_lp = action_logprob(
        safe_lp,
        traj.weights.to(logprobs.dtype),
        (traj.mask & is_mixture) | first_slot,  # padding too: slot 0, replaced below
        torch.where(traj.phase == Phase.MIXTURE, traj.token_slot, 0),
        spec,
        likelihood=likelihood,
    )
    return torch.where(traj.phase == Phase.MIXTURE, mixture_lp, token_lp)


def score_trajectories(
    model: torch.nn.Module, traj: Trajectories, spec: MixtureSpec, *, likelihood: str
) -> PolicyScores:
    """Run the policy over stored trajectories; differentiable in the model's parameters.

    `spec` is the one that produced the trajectories (its temperature scores them);
    `likelihood` one of `spec.likelihoods`.
    """
    batch = build_sequence_batch(traj)
    decoder, head_weight = _decoder_and_head(model)
    embedding = model.get_input_embeddings().weight
    inputs = mixture_embed(embedding, batch.input_ids, batch.input_weights)
    hidden = decoder(
        inputs_embeds=inputs,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    t = traj.ids.shape[1]
    start = batch.prompt_length - 1
    logprobs, _ = mixture_logprobs(
        hidden[:, start : start + t], head_weight, traj.ids, temperature=spec.temperature
    )
    ell = action_loglik(logprobs, traj, spec, likelihood=likelihood)
    fed = inputs[:, start + 1 : start + t].detach().float().norm(dim=-1)
    embed_norm = torch.nn.functional.pad(fed, (0, 1))
    return PolicyScores(logprobs=logprobs, action_logprob=ell, embed_norm=embed_norm)
