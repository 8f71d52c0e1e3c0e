"""One GRPO optimisation phase: old and reference log-likelihoods, then μ passes over
micro-batches, each pass ending in one optimizer step.

    old ℓ (rollout or no-grad forward) → for each pass: for each micro-batch: ℓ_θ (scorer),
    `grpo_loss`, backward of loss × its share of the global batch → clip, AdamW, schedule

The share (`grpo.batch_share`) makes the accumulated gradient that of the global batch for
every aggregation, with any number of micro-batches and processes (DDP averages gradients
over processes). With μ = 1 the old log-likelihoods come from the rollout itself (no extra
forward) unless training under 16-bit autocast (`old_from_rollout`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..types import Phase, Trajectories
from .distributed import full_parameters, plain
from .grpo import SlotTerms, batch_share, grpo_loss, masked_mean
from .policy import FrozenEmbedding, action_loglik, score_trajectories, slot_loglik


class PolicyScorer(torch.nn.Module):
    """The policy as one module whose forward scores trajectories (so DDP sees it)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, traj: Trajectories, config, frozen=None) -> tuple:
        """`(ℓ [N,T], embedding norms [N,T], per-slot (terms, mask) [N,T,k] or None)`."""
        scores = score_trajectories(
            self.model,
            traj,
            config.spec,
            likelihood=config.likelihood,
            frozen=frozen,
            deterministic=config.deterministic,
            share_prompt=config.share_prompt,
            backward_once=True,  # GRPOStep.micro_batch back-propagates the loss once
        )
        slots = slot_loglik(scores.logprobs, traj) if config.clip_per_slot else None
        return scores.action_logprob, scores.embed_norm, slots


@dataclass
class Batch:
    """A rollout batch split for optimisation: its micro-batches' rows and global sizes."""

    chunks: list[list[int]]  # row indices of each micro-batch
    rows_total: float  # trajectories over all processes
    tokens_total: float  # scored positions over all processes


class GRPOStep:
    """The optimisation phase of one step (see the module docstring).

    Args:
        config: the run's config (training, decoding and task parts are read).
        accelerator: the run's `Accelerator`.
        scorer: the prepared `PolicyScorer` (DDP/FSDP wrapped).
        optimizer: the prepared optimizer.
        scheduler: its (unprepared) LR schedule.
        ref_model: the frozen reference policy (None: no KL term).

    `observers` (a list of callables) each get, for every micro-batch of every pass, a dict
    of detached `[n,T]` tensors: `logp` (current), `old_logp` and `mask` (scored positions).
    """

    def __init__(self, config, accelerator, scorer, optimizer, scheduler, ref_model=None):
        self.config = config
        self.accelerator = accelerator
        self.scorer = scorer
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.ref_model = ref_model
        self.observers: list = []

    @property
    def model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.scorer).model

    def global_sum(self, value: float) -> float:
        """`value` summed over every process (float64)."""
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="sum").item())

    def split(self, traj: Trajectories) -> Batch:
        """`grad_accum` micro-batches of consecutive rows, with the global sizes."""
        n = traj.ids.shape[0]
        size = -(-n // self.config.grad_accum)
        chunks = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
        return Batch(chunks, self.global_sum(n), self.global_sum(float(traj.loss_mask.sum())))

    def __call__(self, traj: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
        """μ passes over the batch; returns averaged loss metrics and the last grad norm."""
        c = self.config
        batch = self.split(traj)
        frozen = None
        with full_parameters(self.scorer):
            if c.spec.noise_std > 0:  # the actions' inputs, before any update moves E
                frozen = FrozenEmbedding.of(self.model.get_input_embeddings().weight, traj.ids)
            old = self.old_logprobs(traj, batch.chunks, frozen)
        ref = None
        if self.ref_model is not None:
            ref = self.policy_logprobs(self.ref_model, traj, batch.chunks, frozen)[0]
        sums: dict[str, torch.Tensor] = {}  # device tensors: one host sync at the end
        grad_norm = 0.0
        for _ in range(c.mu):
            for i, rows in enumerate(batch.chunks):
                last = i == len(batch.chunks) - 1
                metrics = self.micro_batch(traj.select(rows), advantages[rows], batch, old, ref, i,
                                           frozen, sync=last)  # fmt: skip
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value / (len(batch.chunks) * c.mu)
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        sums["grad_norm"] = plain(grad_norm).detach().float()
        keys = list(sums)
        record = dict(zip(keys, torch.stack([sums[k] for k in keys]).tolist()))
        record["lr"] = self.scheduler.get_last_lr()[0]
        return record

    def micro_batch(self, mb, advantages, batch, old, ref, i, frozen, *, sync: bool) -> dict:
        """Forward, loss and backward of micro-batch `i`; its detached metrics."""
        c = self.config
        no_sync = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.scorer)
        with no_sync, self.accelerator.autocast():
            ell, embed_norm, slots = self.scorer(mb, c, frozen)
            t = ell.shape[1]
            seen = dict(logp=ell.detach(), old_logp=old[0][i][:, :t], mask=mb.loss_mask)
            for observer in self.observers:
                observer(seen)
            if slots is not None:  # each slot's own ratio (clip_per_slot)
                slots = SlotTerms(slots[0].float(), old[1][i][:, :t], slots[1])
            loss, metrics = grpo_loss(
                ell.float(),
                old[0][i][:, :t],
                advantages,
                mb.loss_mask,
                eps_low=c.eps_low,
                eps_high=c.eps_high,
                beta=c.beta,
                ref_logp=None if ref is None else ref[i][:, :t],
                aggregation=c.aggregation,
                max_len=c.max_new_tokens,
                slots=slots,
            )
            share = batch_share(
                c.aggregation,
                rows=mb.ids.shape[0],
                tokens=float(mb.loss_mask.sum()),
                rows_total=batch.rows_total,
                tokens_total=batch.tokens_total,
            )
            self.accelerator.backward(loss * share * self.accelerator.num_processes)
        metrics["embed_norm"] = masked_mean(embed_norm, mb.phase == Phase.MIXTURE)
        metrics["loss"] = loss
        return {key: value.detach().float() for key, value in metrics.items()}

    def old_from_rollout(self) -> bool:
        """Whether the old log-likelihoods come from the rollout's own log-probs: only with
        μ = 1, and (`old_logprobs="auto"`) not under 16-bit autocast, where the cached decode
        and the training forward round differently (about 1e-2 in log-prob on a tiny model
        in bf16), which would enter every importance ratio."""
        c = self.config
        if c.mu > 1 or c.old_logprobs == "forward":
            return False
        return c.old_logprobs == "rollout" or self.accelerator.mixed_precision == "no"

    @torch.no_grad()
    def old_logprobs(self, traj: Trajectories, chunks, frozen) -> tuple[list, list]:
        """Per micro-batch `[n,T]` log-likelihoods, and their per-slot terms `[n,T,k]` with
        `clip_per_slot` (else None): from the rollout or a no-grad forward
        (`old_from_rollout`)."""
        c = self.config
        if not self.old_from_rollout():
            return self.policy_logprobs(self.model, traj, chunks, frozen, slots=True)
        embedding = self.model.get_input_embeddings().weight.detach()
        old, old_slots = [], []
        for mb in (traj.select(rows) for rows in chunks):
            ell = action_loglik(
                mb.logprobs,
                mb,
                c.spec,
                likelihood=c.likelihood,
                rest_logprob=mb.rest_logprob,
                embedding=embedding,
                frozen=frozen,
            )
            old.append(ell.float())
            old_slots.append(slot_loglik(mb.logprobs, mb)[0] if c.clip_per_slot else None)
        return old, old_slots

    @torch.no_grad()
    def policy_logprobs(self, model, traj, chunks, frozen, slots: bool = False):
        """Per micro-batch `[n,T]` action log-likelihoods under `model`, and (with `slots`
        and `clip_per_slot`) their per-slot terms `[n,T,k]`, else Nones."""
        c = self.config
        out, out_slots = [], []
        with self.accelerator.autocast():
            for rows in chunks:
                mb = traj.select(rows)
                scores = score_trajectories(
                    model,
                    mb,
                    c.spec,
                    likelihood=c.likelihood,
                    frozen=frozen,
                    share_prompt=c.share_prompt,
                )
                out.append(scores.action_logprob.float())
                per_slot = slots and c.clip_per_slot
                out_slots.append(slot_loglik(scores.logprobs, mb)[0].float() if per_slot else None)
        return out, out_slots
