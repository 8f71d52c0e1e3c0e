"""The rollout engine's per-call state: the plan, what the host knows, the live rows, the
output buffers and one step's actions (see `engine.py` for how a run uses them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import MixtureSpec
from ..kernels.gaussian import gaussian_input_noise
from ..types import Phase, Trajectories


@dataclass
class Plan:
    """One `generate` call's validated inputs."""

    prompts: list[list[int]]  # B prompts
    group_size: int  # G
    spec: MixtureSpec
    steps: int  # T, max new tokens
    generator: torch.Generator | None
    share_prefill: bool
    return_logits: bool
    progress: bool
    noise_seed: torch.Tensor | None = None  # [N] int64 Gaussian-noise seed per row

    @property
    def rows(self) -> int:
        """N = B·G trajectories."""
        return len(self.prompts) * self.group_size

    def row_prompts(self) -> list[list[int]]:
        """The prompt of each of the N trajectories."""
        return [list(p) for p in self.prompts for _ in range(self.group_size)]


@dataclass
class Known:
    """What the host knows of the live rows' phases, refreshed at each sync.

    Thinking rows never come back, so `thinking` (some live row may be thinking) stays
    valid between syncs; `discrete` (some live row is discrete) is exact only right after a
    sync, since rows may switch at any step.
    """

    thinking: bool = True
    discrete: bool = False
    exact: bool = True  # no step since the last sync

    @property
    def need_discrete(self) -> bool:
        return self.discrete or (self.thinking and not self.exact)


@dataclass
class Active:
    """Per-row state of the rows still in the batch (n of them, in cache-row order)."""

    rows: torch.Tensor  # [n] int64 trajectory index
    position: torch.Tensor  # [n] int64 position id of the next input
    phase: torch.Tensor  # [n] int8
    marker: torch.Tensor | None  # [n] int64 automaton state
    alive: torch.Tensor  # [n] bool: still generating
    padding: torch.Tensor | None  # [n, P+T-1] bool attention mask (None: no padding)
    calm: torch.Tensor | None = None  # [n] int64 consecutive low-entropy thinking steps
    forced: torch.Tensor | None = None  # [n] int64 next marker token to write (-1: none)

    def keep(self, index: torch.Tensor) -> None:
        names = ("rows", "position", "phase", "marker", "alive", "padding", "calm", "forced")
        for name in names:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))


class Record:
    """Step-major output buffers `[T, N, …]`, written at the active rows each step."""

    def __init__(self, plan: Plan, vocab: int, device: torch.device):
        steps, rows, k = plan.steps, plan.rows, plan.spec.k
        z = dict(device=device)
        self.ids = torch.zeros(steps, rows, k, dtype=torch.int64, **z)
        self.weight_logits = torch.zeros(steps, rows, k, dtype=torch.float32, **z)
        self.mask = torch.zeros(steps, rows, k, dtype=torch.bool, **z)
        self.logprobs = torch.zeros(steps, rows, k, dtype=torch.float32, **z)
        self.token = torch.zeros(steps, rows, dtype=torch.int64, **z)
        self.token_slot = torch.zeros(steps, rows, dtype=torch.int64, **z)
        self.phase = torch.zeros(steps, rows, dtype=torch.int8, **z)
        self.entropy = torch.zeros(steps, rows, dtype=torch.float32, **z)
        self.alive = torch.zeros(steps, rows, dtype=torch.bool, **z)
        self.rest_logprob = None
        if plan.spec.needs_rest:
            self.rest_logprob = torch.zeros(steps, rows, dtype=torch.float32, **z)
        self.logits = None
        if plan.return_logits:
            self.logits = torch.zeros(steps, rows, vocab, dtype=torch.float32, **z)

    def write(self, t: int, active: Active, step: Step, logits: torch.Tensor) -> None:
        rows = active.rows
        self.ids[t].index_copy_(0, rows, step.ids)
        self.weight_logits[t].index_copy_(0, rows, step.weight_logits.float())
        self.mask[t].index_copy_(0, rows, step.mask)
        self.logprobs[t].index_copy_(0, rows, step.logprobs.float())
        self.token[t].index_copy_(0, rows, step.token)
        self.token_slot[t].index_copy_(0, rows, step.token_slot)
        self.phase[t].index_copy_(0, rows, active.phase)
        self.entropy[t].index_copy_(0, rows, step.entropy.float())
        self.alive[t].index_copy_(0, rows, active.alive)
        if self.rest_logprob is not None and step.rest_logprob is not None:
            self.rest_logprob[t].index_copy_(0, rows, step.rest_logprob.float())
        if self.logits is not None:
            self.logits[t].index_copy_(0, rows, logits.float())

    def trajectories(self, plan: Plan, stats: dict) -> Trajectories:
        """The recorded steps as `Trajectories` `[N,T,…]` (rows first, zero past each row's
        end, T the longest row; texts and stop reasons left to the caller)."""
        alive = self.alive.T  # [N,T] completion mask
        longest = max(int(alive.sum(1).max()), 1)
        alive = alive[:, :longest].contiguous()

        def rows_first(buffer: torch.Tensor | None) -> torch.Tensor | None:
            if buffer is None:
                return None
            out = buffer[:longest].transpose(0, 1)
            keep = alive.view(*alive.shape, *([1] * (out.dim() - 2)))
            return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))

        rows = alive.shape[0]
        return Trajectories(
            prompt_ids=plan.row_prompts(),
            ids=rows_first(self.ids),
            weight_logits=rows_first(self.weight_logits),
            mask=rows_first(self.mask),
            logprobs=rows_first(self.logprobs),
            token_slot=rows_first(self.token_slot),
            phase=rows_first(self.phase),
            group=torch.arange(rows, device=alive.device) // plan.group_size,
            noise_seed=plan.noise_seed,
            entropy=rows_first(self.entropy),
            rest_logprob=rows_first(self.rest_logprob),
            logits=rows_first(self.logits),
            stats=stats,
        )


@dataclass
class Step:
    """One decode step's actions for the active rows (k slots)."""

    ids: torch.Tensor  # [n,k]
    weight_logits: torch.Tensor  # [n,k] ω: the weights are softmax(ω) over the valid slots
    mask: torch.Tensor  # [n,k]
    token: torch.Tensor  # [n]
    logprobs: torch.Tensor  # [n,k]
    entropy: torch.Tensor  # [n]
    embeds: torch.Tensor  # [n,H]
    token_slot: torch.Tensor  # [n] int64 slot of `token` (the drawn slot)
    rest_logprob: torch.Tensor | None = None  # [n] log-mass outside the ids (needs_rest)

    @classmethod
    def discrete(cls, step, k: int) -> Step:
        """A k = 1 `MixtureStep` stored in k slots: ids `[y]*k`, weights `[1,0,…]`."""
        return cls.token_action(step.token, step.logprobs[:, 0], step.entropy, step.embeds, k)

    @classmethod
    def token_action(cls, token, logprob, entropy, embeds, k: int) -> Step:
        """One token per row `[n]` (its log-prob `[n]`) stored in k slots: `[y, y, …]`,
        weights `[1, 0, …]` (weight logits 0, one valid slot), slot 0."""
        n = token.shape[0]
        first = torch.zeros(n, k, dtype=torch.bool, device=token.device)
        first[:, 0] = True
        return cls(
            ids=token.unsqueeze(-1).expand(n, k),
            weight_logits=torch.zeros(n, k, dtype=torch.float32, device=token.device),
            mask=first,
            token=token,
            logprobs=logprob.unsqueeze(-1).expand(n, k),
            entropy=entropy,
            embeds=embeds,
            token_slot=torch.zeros_like(token),
        )

    @classmethod
    def of(cls, step) -> Step:
        return cls(
            step.ids,
            step.weight_logits,
            step.mask,
            step.token,
            step.logprobs,
            step.entropy,
            step.embeds,
            step.token_slot,
            step.rest_logprob,
        )

    @classmethod
    def blend(cls, mixture: Step, discrete: Step, use_discrete: torch.Tensor) -> Step:
        """Row-wise choice: `discrete` where `use_discrete [n]` is True, else `mixture`."""
        row = use_discrete.unsqueeze(-1)
        rest = mixture.rest_logprob
        if rest is not None:  # discrete positions are scored by their token alone
            rest = torch.where(use_discrete, torch.zeros_like(rest), rest)
        return cls(
            ids=torch.where(row, discrete.ids, mixture.ids),
            weight_logits=torch.where(row, discrete.weight_logits, mixture.weight_logits),
            mask=torch.where(row, discrete.mask, mixture.mask),
            token=torch.where(use_discrete, discrete.token, mixture.token),
            logprobs=torch.where(row, discrete.logprobs, mixture.logprobs),
            entropy=mixture.entropy,
            embeds=torch.where(row, discrete.embeds, mixture.embeds),
            token_slot=torch.where(use_discrete, discrete.token_slot, mixture.token_slot),
            rest_logprob=rest,
        )


def noisy_inputs(
    embeds: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, phase: torch.Tensor, std: float
) -> torch.Tensor:
    """Thinking rows' inputs `[n,H]` plus `std · ε(seed, step)` (Gaussian soft tokens; seeds
    and steps `[n]` int64, phase `[n]`); other rows unchanged."""
    noise = gaussian_input_noise(seeds, steps, embeds.shape[-1])
    thinking = (phase == int(Phase.MIXTURE)).unsqueeze(-1)
    return (embeds.float() + std * noise * thinking).to(embeds.dtype)
