"""Training forward: per-position log-likelihoods of stored trajectories under a policy.

A trajectory is a prompt (token ids) and T completion actions, each in one representation
(see `kernels/likelihood.py`): `ids [k]`, weight logits `[k]` (the weights are their
softmax over the valid slots), `mask [k]`, the slot of the representative token, and a
phase (thinking mixture or discrete answer).

The training sequence of trajectory n is its prompt followed by the inputs its actions fed
back: `[prompt_0 … prompt_{P−1}, a_0 … a_{T−2}]`, every element an (ids, weights) pair
(a prompt token is `ids = [t, …]`, `w = [1, 0, …]`). Inputs are rebuilt with
`mixture_embed` from the *current* embedding, so gradients reach it exactly as for a
discrete lookup. Gaussian soft tokens are the exception: their action is the input vector
`x` itself, so at thinking positions the sequence feeds exactly the `x` the rollout fed
(rebuilt from the embedding rows frozen at rollout time, `FrozenEmbedding`), also after
updates (μ > 1), and no gradient flows through it. The hidden state before action t (the
last prompt position for t = 0) scores it: `mixture_logprobs` gives `log p'` at the
action's k ids (and, where the likelihood needs it, the log-mass outside them) without ever
materialising `[N, T, V]` logits; `action_logprob` turns those into the chosen likelihood.

Batch layout: prompts are left padded to the longest prompt P, completions right padded to
the longest completion T, so every action t sits at sequence position `P − 1 + t`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import (
    MixtureSpec,
    action_logprob,
    mixture_embed,
    mixture_logprobs,
    renormalised_logprobs,
)
from ..kernels.gaussian import gaussian_input_noise, gaussian_log_density
from ..types import Phase, Trajectories, left_pad
from .backward_apart import backward_apart, can_cut
from .shared_prompt import can_share_prompt, distinct_prompts, shared_prompt_forward


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
    weights = traj.weights
    prompt_weights = torch.zeros(n, prompt_len, k, dtype=weights.dtype, device=device)
    prompt_weights[..., 0] = prompt_mask.to(weights.dtype)
    fed_back = traj.completion_mask[:, 1:].long()  # a_t is fed only if a_{t+1} exists
    attention_mask = torch.cat([prompt_mask, fed_back], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return SequenceBatch(
        input_ids=torch.cat([prompt_slots, traj.ids[:, : t - 1]], dim=1),
        input_weights=torch.cat([prompt_weights, weights[:, : t - 1]], dim=1),
        attention_mask=attention_mask,
        position_ids=position_ids,
        prompt_length=prompt_len,
    )


# Config fields of model families whose logits are not plain `h Wᵀ` (scaled or soft-capped
# after the LM head): the fused log-probs would disagree with the model's own logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor]:
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
    rest_logprob: torch.Tensor | None  # [N,T] log p' mass outside the ids (spec.needs_rest)
    action_logprob: torch.Tensor  # [N,T] log-likelihood of each action (differentiable)
    embed_norm: torch.Tensor  # [N,T] norm of the fed-back input embedding (detached)
    hidden: torch.Tensor  # [N,T,H] final hidden states scoring the actions (differentiable)


@dataclass
class FrozenEmbedding:
    """The input-embedding rows a batch's actions use, as they were at rollout time.

    A Gaussian soft token's action is `x = Σ_j w_j E_old[S_j] + σ ε`; after an optimizer
    step `E` has moved, so the μ > 1 passes rebuild `x` from these frozen rows, taken once
    per step before any update (`[U,H]` for the U distinct ids, not the whole `[V,H]`).
    """

    rows: torch.Tensor  # [U,H] detached copy of E at the ids in use
    index: torch.Tensor  # [V] int64: row of each id in `rows` (0 for ids not in use)

    @classmethod
    def of(cls, embedding: torch.Tensor, ids: torch.Tensor) -> FrozenEmbedding:
        """Freeze the rows of `embedding [V,H]` that `ids [...]` use."""
        used = torch.unique(ids)
        index = torch.zeros(embedding.shape[0], dtype=torch.int64, device=ids.device)
        index[used] = torch.arange(used.numel(), device=ids.device)
        return cls(rows=embedding.detach()[used].clone(), index=index)

    def mix(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`Σ_j w_j E_old[ids_j]`: `[..., k]` × 2 → `[..., H]`."""
        return mixture_embed(self.rows, self.index[ids], weights)


def input_noise(traj: Trajectories, spec: MixtureSpec, hidden: int) -> torch.Tensor:
    """`σ ε(seed, t) [N,T,H]` on thinking positions (0 elsewhere): the Gaussian part of the
    inputs the rollout fed back (float32)."""
    n, t = traj.phase.shape
    seeds = traj.noise_seed.repeat_interleave(t)
    positions = torch.arange(t, device=seeds.device).repeat(n)
    noise = gaussian_input_noise(seeds, positions, hidden).view(n, t, hidden)
    return spec.noise_std * noise * (traj.phase == Phase.MIXTURE).unsqueeze(-1)


def rollout_inputs(traj: Trajectories, spec: MixtureSpec, frozen: FrozenEmbedding) -> torch.Tensor:
    """`x [N,T,H]` (float32, no grad): the inputs the rollout fed at thinking positions of a
    Gaussian soft-token run, `Σ_j w_j E_old[S_j] + σ ε` from the `frozen` rows."""
    with torch.no_grad():
        mixed = frozen.mix(traj.ids, traj.weights).float()
        return mixed + input_noise(traj, spec, frozen.rows.shape[1])


def with_rollout_inputs(
    inputs: torch.Tensor, traj: Trajectories, spec: MixtureSpec, frozen, start: int
) -> torch.Tensor:
    """`inputs [N,L,H]` with each fed-back thinking position (from `start + 1`) replaced by
    the `x` the rollout fed (`rollout_inputs`): Gaussian soft tokens' actions."""
    t = traj.ids.shape[1]
    fed = rollout_inputs(traj, spec, frozen)[:, : t - 1].to(inputs.dtype)
    thinking = (traj.phase[:, : t - 1] == Phase.MIXTURE).unsqueeze(-1)
    fed = torch.where(thinking, fed, inputs[:, start + 1 :])
    return torch.cat([inputs[:, : start + 1], fed], dim=1)


def gaussian_loglik(
    logprobs: torch.Tensor,
    traj: Trajectories,
    spec: MixtureSpec,
    embedding: torch.Tensor,
    frozen: FrozenEmbedding,
) -> torch.Tensor:
    """`[N,T]` Gaussian soft-token term `log N(x_t; μ_θ,t, σ² I)` of thinking positions (0
    elsewhere): `x_t` the input the rollout fed (`frozen` rows and the stored weights, plus
    σε), `μ_θ,t = Σ_j p̃'_j E_θ[S_j]` with the current policy's renormalised probabilities
    (differentiable through `logprobs [N,T,k]` and `embedding [V,H]`)."""
    thinking = traj.phase == Phase.MIXTURE
    mask = traj.mask & thinking.unsqueeze(-1)
    mask[..., 0] = True  # keep every row normalisable; non-thinking rows are dropped below
    p_tilde = renormalised_logprobs(logprobs, mask).exp().masked_fill(~mask, 0.0)
    mean = mixture_embed(embedding, traj.ids, p_tilde)
    x = rollout_inputs(traj, spec, frozen)
    ell = gaussian_log_density(x, mean, spec.noise_std)
    return torch.where(thinking, ell, torch.zeros_like(ell))


def action_loglik(
    logprobs: torch.Tensor,
    traj: Trajectories,
    spec: MixtureSpec,
    *,
    likelihood: str,
    rest_logprob: torch.Tensor | None = None,
    embedding: torch.Tensor | None = None,
    frozen: FrozenEmbedding | None = None,
) -> torch.Tensor:
    """`[N,T]` likelihood of each action from log-probs `[N,T,k]` at its ids.

    Thinking (mixture) positions use `likelihood` under `spec` (with `rest_logprob [N,T]`,
    the log-mass outside the ids, where `spec.needs_rest`); discrete positions, forced
    tokens and padding use the log-prob of the representative token (a discrete sample's
    exact likelihood). Gaussian soft tokens (`spec.noise_std > 0`) add, for `exact`, the
    Gaussian term (`gaussian_loglik`), which needs the input `embedding [V,H]` and the
    rows frozen at rollout time (`frozen`; default: `embedding` itself, right when nothing
    has been updated since the rollout).
    """
    token_lp = logprobs.gather(-1, traj.token_slot.unsqueeze(-1)).squeeze(-1)
    if likelihood == "token":
        return token_lp
    # Outside the thinking phase only slot 0 was drawn: hide the filler slots.
    thinking = traj.phase == Phase.MIXTURE
    is_mixture = thinking.unsqueeze(-1)
    first_slot = torch.zeros_like(traj.mask)
    first_slot[..., 0] = True
    safe_lp = torch.where(is_mixture | first_slot, logprobs, float("-inf"))
    rest = None
    if rest_logprob is not None and likelihood == "exact" and spec.needs_rest:
        rest = torch.where(thinking, rest_logprob, torch.zeros_like(rest_logprob))
    mixture_lp = action_logprob(
        safe_lp,
        (traj.mask & is_mixture) | first_slot,  # padding too: slot 0, replaced below
        torch.where(thinking, traj.token_slot, 0),
        spec,
        likelihood=likelihood,
        weight_logits=traj.weight_logits,
        rest_logprob=rest,
    )
    if likelihood == "exact" and spec.noise_std > 0:
        if embedding is None:
            raise ValueError("Gaussian soft tokens need the input embedding for their likelihood")
        frozen = frozen or FrozenEmbedding.of(embedding, traj.ids)
        mixture_lp = mixture_lp + gaussian_loglik(logprobs, traj, spec, embedding, frozen)
    return torch.where(thinking, mixture_lp, token_lp)


def slot_loglik(logprobs: torch.Tensor, traj: Trajectories) -> tuple[torch.Tensor, torch.Tensor]:
    """`(terms [N,T,k], mask [N,T,k])`: per-slot log-likelihood terms, for per-slot ratio
    clipping (Multiplex Thinking's loss). At thinking positions each drawn slot's
    `log p'(S_j)` (the exact likelihood of `iid` draws with fixed weights and token is their
    sum); elsewhere slot 0's, the token's. Terms are 0 where the mask is False."""
    thinking = (traj.phase == Phase.MIXTURE).unsqueeze(-1)
    first = torch.zeros_like(traj.mask)
    first[..., 0] = True
    mask = torch.where(thinking, torch.isfinite(logprobs), first)
    return torch.where(mask, logprobs, torch.zeros_like(logprobs)), mask


def score_trajectories(
    model: torch.nn.Module,
    traj: Trajectories,
    spec: MixtureSpec,
    *,
    likelihood: str,
    frozen: FrozenEmbedding | None = None,
    deterministic: bool = False,
    share_prompt: bool = True,
    backward_once: bool = False,
) -> PolicyScores:
    """Run the policy over stored trajectories; differentiable in the model's parameters.

    `spec` is the one that produced the trajectories (its temperature scores them);
    `likelihood` one of `spec.likelihoods`; `frozen` the embedding rows of the rollout's
    policy (Gaussian soft tokens after an update, see `FrozenEmbedding`); `deterministic`
    the summation mode of the embedding gradient (`mixture_embed`); `share_prompt` runs
    each distinct prompt once and its rows' completions on copies of its KV cache
    (`shared_prompt_forward`: the same function, G× less prompt compute for G rows);
    `backward_once` says the caller back-propagates the scores once with `.backward()`, in
    which case the pieces of the forward that use a weight twice are back-propagated apart
    (`backward_apart`: less memory, the same gradients).
    """
    batch = build_sequence_batch(traj)
    decoder, head_weight = decoder_and_head(model)
    embedding = model.get_input_embeddings().weight
    inputs = mixture_embed(
        embedding, batch.input_ids, batch.input_weights, deterministic=deterministic
    )
    t = traj.ids.shape[1]
    start = batch.prompt_length - 1
    if spec.noise_std > 0:  # thinking positions feed the rollout's own x (see the docstring)
        frozen = frozen or FrozenEmbedding.of(embedding, traj.ids)
        inputs = with_rollout_inputs(inputs, traj, spec, frozen, start)
    shared = distinct_prompts(traj.prompt_ids) if share_prompt else None
    if shared is not None and can_share_prompt(model):
        hidden = shared_prompt_forward(decoder, inputs, batch, shared, apart=backward_once)
    else:
        hidden = decoder(
            inputs_embeds=inputs,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state[:, start:]
    if backward_once and head_weight is embedding and can_cut(hidden):  # a tied head
        (hidden,) = backward_apart([hidden])
    need_rest = likelihood == "exact" and spec.needs_rest
    logprobs, _, *rest = mixture_logprobs(
        hidden, head_weight, traj.ids, temperature=spec.temperature, return_rest=need_rest
    )
    rest = rest[0] if rest else None
    options = dict(likelihood=likelihood, rest_logprob=rest, embedding=embedding, frozen=frozen)
    ell = action_loglik(logprobs, traj, spec, **options)
    fed = inputs[:, start + 1 : start + t].detach().float().norm(dim=-1)
    embed_norm = torch.nn.functional.pad(fed, (0, 1))
    return PolicyScores(logprobs, rest, ell, embed_norm, hidden)
