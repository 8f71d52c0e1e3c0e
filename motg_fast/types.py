"""The data that flows through motg_fast: the phase of a position and a batch of trajectories.

The rollout engine returns `Trajectories`; rewards are attached to them; the training
forward and the loss read them. One container from generation to the optimizer step.

Every completion position holds one action in one representation (see
`kernels/likelihood.py`): ids, weight logits and validity `[k]` (a mixture, or a discrete
token as ids `[y, y, …]`, validity `[True, False, …]`: weights `[1, 0, …]`), the slot of
the representative token, and the rollout's log-probs at the ids (plus, for `sample` with
k ≥ 2, its log-mass outside the ids). The weights are `softmax(ω)` over the valid slots:
ω keeps the logarithm of weights too small for float32, which the exact likelihoods read.
Positions past a row's end are zero, `Phase.PAD`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .kernels import weights_from_logits


class Phase(enum.IntEnum):
    """The phase of a completion position (stored as int8)."""

    PAD = 0  # past the row's end
    MIXTURE = 1  # thinking: a mixture of k slots
    DISCRETE = 2  # after the end of thinking: one sampled token
    FORCED = 3  # a token the engine wrote (the end-of-thinking marker of a cold stop)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists to the longest: `(ids [N,P], attention_mask [N,P])` int64."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.int64)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def pad_time(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad dimension 1 (time) of `tensor [N,T,...]` with zeros to `length`."""
    extra = length - tensor.shape[1]
    if extra <= 0:
        return tensor
    pad = torch.zeros(
        (tensor.shape[0], extra, *tensor.shape[2:]), dtype=tensor.dtype, device=tensor.device
    )
    return torch.cat([tensor, pad], dim=1)


def _per_time(**kw):
    """A field indexed `[N, T, ...]` (sliced in time by `select`, padded by `concat`)."""
    return field(metadata={"axis": "time"}, **kw)


def _per_row(**kw):
    """A field indexed `[N, ...]` (a tensor or a list with one entry per trajectory)."""
    return field(metadata={"axis": "row"}, **kw)


@dataclass
class Trajectories:
    """N trajectories, T completion positions (the longest), k slots.

    Required: the prompts and the actions. Optional (the engine fills them; tests may
    build bare batches): texts, stop reasons, entropy, raw logits, group index, and the
    rewards and correctness the trainer attaches.
    """

    prompt_ids: list[list[int]] = _per_row()  # N prompts (trajectory n: prompt n // G)
    ids: torch.Tensor = _per_time()  # [N,T,k] int64 candidate ids
    weight_logits: torch.Tensor = _per_time()  # [N,T,k] float32 ω: w = softmax(ω) over valid
    mask: torch.Tensor = _per_time()  # [N,T,k] bool slot validity
    token_slot: torch.Tensor = _per_time()  # [N,T] int64 slot of the representative token
    phase: torch.Tensor = _per_time()  # [N,T] int8 `Phase`
    logprobs: torch.Tensor = _per_time()  # [N,T,k] float32 rollout log p(ids) at τ
    entropy: torch.Tensor | None = _per_time(default=None)  # [N,T] entropy of p per step
    rest_logprob: torch.Tensor | None = _per_time(default=None)  # [N,T] log-mass outside ids
    logits: torch.Tensor | None = _per_time(default=None)  # [N,T,V] raw logits (on request)
    texts: list[str] = _per_row(default_factory=list)  # decoded tokens, final EOS left out
    stop_reasons: list[str] = _per_row(default_factory=list)  # "eos" | "length"
    group: torch.Tensor | None = _per_row(default=None)  # [N] int64 prompt index
    noise_seed: torch.Tensor | None = _per_row(default=None)  # [N] int64 Gaussian-noise seed
    rewards: torch.Tensor | None = _per_row(default=None)  # [N] float32 (the trainer's)
    correct: torch.Tensor | None = _per_row(default=None)  # [N] float32 0/1
    format_only: torch.Tensor | None = _per_row(default=None)  # [N] bool format reward only
    stats: dict = field(default_factory=dict)  # engine counters: steps, rows, compactions

    # ---- derived --------------------------------------------------------------------

    @property
    def completion_mask(self) -> torch.Tensor:
        """`[N,T]` bool: real completion positions."""
        return self.phase != Phase.PAD

    @property
    def weights(self) -> torch.Tensor:
        """`[N,T,k]` float32 mixture weights, `softmax(ω)` over the valid slots (0 elsewhere)."""
        return weights_from_logits(self.weight_logits, self.mask)

    @property
    def loss_mask(self) -> torch.Tensor:
        """`[N,T]` bool: positions the policy chose (forced tokens are fed back, not scored)."""
        return (self.phase == Phase.MIXTURE) | (self.phase == Phase.DISCRETE)

    @property
    def lengths(self) -> torch.Tensor:
        """`[N]` int64 completion lengths."""
        return self.completion_mask.sum(-1)

    @property
    def token(self) -> torch.Tensor:
        """`[N,T]` int64 representative tokens (0 past the end)."""
        return self.ids.gather(-1, self.token_slot.unsqueeze(-1)).squeeze(-1)

    @property
    def num_tokens(self) -> int:
        """Generated tokens (completion positions) over all trajectories."""
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return self.ids.shape[0]

    # ---- batching -------------------------------------------------------------------

    def select(self, rows: torch.Tensor | Sequence[int]) -> Trajectories:
        """The sub-batch of the given trajectory indices (trailing padding trimmed)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        keep = (self.phase[index.to(self.phase.device)] != Phase.PAD).sum(-1)
        length = max(int(keep.max()) if len(index) else 0, 1)
        positions = index.tolist()

        def take(f: dataclasses.Field, value):
            if value is None or (isinstance(value, list) and not value):
                return value
            if isinstance(value, list):
                return [value[i] for i in positions]
            picked = value[index.to(value.device)]
            return picked[:, :length] if f.metadata["axis"] == "time" else picked

        return self._map(take)

    @classmethod
    def concat(cls, parts: Sequence[Trajectories]) -> Trajectories:
        """Stack batches along N, right-padding their time dimension to the longest."""
        length = max(p.ids.shape[1] for p in parts)

        def join(f: dataclasses.Field, values: list):
            if any(v is None for v in values):
                return None
            if isinstance(values[0], list):
                return [x for v in values for x in v]
            if f.metadata["axis"] == "time":
                values = [pad_time(v, length) for v in values]
            return torch.cat(values)

        fields = {
            f.name: join(f, [getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(cls)
            if "axis" in f.metadata
        }
        stats = {}
        for part in parts:
            for key, value in part.stats.items():
                stats[key] = stats.get(key, 0) + value
        return cls(**fields, stats=stats)

    def _map(self, fn) -> Trajectories:
        values = {
            f.name: fn(f, getattr(self, f.name))
            for f in dataclasses.fields(self)
            if "axis" in f.metadata
        }
        return Trajectories(**values, stats=dict(self.stats))
