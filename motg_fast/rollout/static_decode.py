"""The compiled decode path of the rollout engine (`RolloutEngine(compile_decode=True)`).

One decode step is a pure function of static-shape tensors (:meth:`StaticDecode.static_step`):
the mixture step (its noise given; `mixture_step_compilable`: the Triton kernels as the
custom op ``motg_fast::mixture_step`` where they run, else the PyTorch reference), the
end-of-thinking and EOS bookkeeping, the Gaussian input noise, cold stop, and the model
forward over a transformers ``StaticCache`` of all N rows and capacity P + T − 1, written
at a cache position held in a tensor. No host synchronisation and no data-dependent Python
branch is reachable from it, so ``torch.compile(fullgraph=True)`` captures it whole (tested
on CPU for every method preset but the Dirichlet ones): on CUDA with
``mode="reduce-overhead"`` (CUDA graphs; the shapes never change within a call, so one
graph per (rows, capacity)), elsewhere with the default mode.

What differs from the eager path (`engine.py`):

- **No compaction.** Finished rows stay in the batch, masked (their later outputs are not
  part of the completion), because compaction changes the batch size and with it the graph.
  The host checks every ``sync_every`` steps, outside the step, whether every row has
  finished, and stops then.
- **Noise drawn before the step.** Every random stream of a step (selection, weights,
  token; for the k-slot and the discrete step alike) is drawn from the run's generator
  before the step, eagerly, and handed to it: a ``torch.Generator`` cannot be used inside a
  captured graph. Where rows can reach the answer phase, both the k-slot and the discrete step
  run every step (the eager path skips one when the host knows no row needs it), so the
  draws differ from the eager path's for sampled specs: the same seed gives the same
  rollout compiled or not, but not the eager path's samples. Deterministic specs give the
  eager path's tokens.
- **The whole cache is attended** (masked past each row's end), as transformers'
  ``StaticCache`` does, instead of the filled prefix.
- **Dirichlet weights are not supported**: their Gamma draws depend on the step's
  probabilities, so they cannot be drawn before it (a clear error).
- **The mixture step's path** is the engine's `backend` as in the eager path, but through
  `mixture_step_compilable`: on CUDA the Triton kernels, one opaque custom-op node of the
  graph (its launches captured by CUDA graphs); on a CPU the reference, compiled.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..kernels import MixtureSpec, StepNoise
from ..kernels.mixture_math import gumbel_noise
from ..kernels.mixture_step import selection_noise_shape
from ..kernels.step_op import mixture_step_compilable, noise_streams
from ..types import Phase
from .decode_state import Active, Plan, Step, noisy_inputs


def draw_noise(
    spec: MixtureSpec, rows: int, vocab: int, generator, device: torch.device
) -> StepNoise:
    """Every Gumbel stream a step of ``spec`` reads (`noise_streams`), `[N,V]`/`[N,k,V]`
    and `[N,k]`, drawn in that order."""
    slots = (rows, spec.k)
    shapes = dict(selection=selection_noise_shape(spec, rows, vocab), weight=slots, token=slots)
    draw = functools.partial(gumbel_noise, device=device, generator=generator)
    return StepNoise(**{name: draw(tuple(shapes[name])) for name in noise_streams(spec)})


CAPACITY_BUCKET = 64  # cache capacities round up to a multiple: few distinct graphs


@dataclass
class StaticRun:
    """One compiled-decode call's fixed tensors."""

    cache: object  # transformers StaticCache: N rows, capacity C (a multiple of the bucket)
    attention_mask: torch.Tensor  # [N, C] long: 0 on left padding
    first_column: torch.Tensor  # [1] int64: the cache position of the first decode input
    noise_seed: torch.Tensor | None  # [N] int64 (Gaussian input noise)


def static_cache_from(prefilled, config, capacity: int):
    """A transformers `StaticCache` of `capacity` holding the prefilled rows of a
    `PreallocatedCache` (`[N,heads,C',dim]` per layer, C' ≤ capacity), at the same length."""
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=capacity)
    for source, target in zip(prefilled.layers, cache.layers, strict=True):
        length = source.length
        target.lazy_initialization(source.keys[:, :, :1], source.values[:, :, :1])
        target.keys[:, :, :length].copy_(source.keys[:, :, :length])
        target.values[:, :, :length].copy_(source.values[:, :, :length])
        target.cumulative_length.fill_(length)
    return cache


class StaticDecode:
    """Mixin of :class:`~motg_fast.rollout.engine.RolloutEngine`: the compiled decode path
    (see the module docstring)."""

    def compiled_step(self, **compile_options):
        """The step, compiled on first use (`fullgraph=True`: a graph break is an error;
        `mode="reduce-overhead"`, CUDA graphs, on CUDA); `compile_options` go to
        `torch.compile` on that first call (e.g. `backend="eager"` to trace only)."""
        if self._compiled_step is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            options = dict(fullgraph=True, mode=mode, dynamic=False, **compile_options)
            self._compiled_step = torch.compile(self.static_step, **options)
        return self._compiled_step

    def static_step(
        self,
        logits: torch.Tensor,
        state: tuple[torch.Tensor, ...],
        noise: tuple[StepNoise, StepNoise],
        column: torch.Tensor,
        run: StaticRun,
        spec: MixtureSpec,
    ) -> tuple[Step, tuple[torch.Tensor, ...], torch.Tensor]:
        """One decode step over all N rows: `(step, next state, next logits [N,V])`.

        `state` is `(position, phase, marker, alive, calm, forced)` `[N]` each (marker, calm
        and forced may be None); `column` `[1]` int64 the cache position of this step's input.
        """
        position, phase, marker, alive, calm, forced = state
        rows = torch.arange(logits.shape[0], device=logits.device)
        active = Active(rows, position, phase, marker, alive.clone(), None, calm, forced)
        step = self._static_choose(logits, active, noise, spec)
        if spec.noise_std > 0:
            steps = (column - run.first_column).expand_as(run.noise_seed)
            step.embeds = noisy_inputs(
                step.embeds, run.noise_seed, steps, active.phase, spec.noise_std
            )
        self._update_rows(active, step, spec)
        out = self.model(
            inputs_embeds=step.embeds.unsqueeze(1),
            attention_mask=run.attention_mask,
            position_ids=active.position.unsqueeze(1),
            cache_position=column,
            use_cache=True,
            **{self._cache_kwarg: run.cache},
        )
        state = (active.position + 1, active.phase, active.marker, active.alive)
        return step, (*state, active.calm, active.forced), out.logits[:, -1]

    def _static_choose(self, logits, active: Active, noise, spec: MixtureSpec) -> Step:
        """Both the k-slot and the discrete step, picked per row by phase."""
        step = functools.partial(mixture_step_compilable, backend=self.backend)
        mixture = Step.of(step(logits, self.embedding, spec, noise[0]))
        if self._static_needs_answer_step(spec):
            raw = step(logits, self.embedding, spec.answer_spec(), noise[1])
            discrete = Step.discrete(raw, spec.k)
            mixture = Step.blend(mixture, discrete, active.phase == int(Phase.DISCRETE))
        if active.forced is not None:
            mixture = self._force_marker(mixture, logits, active, spec)
        return mixture

    # ---- the loop (eager, around the compiled step) -----------------------------------

    def static_run(self, plan: Plan, prefilled, width: int, active: Active) -> StaticRun:
        """The fixed tensors of a compiled-decode call, the prefilled cache copied into a
        `StaticCache` (drop `prefilled` afterwards)."""
        if self.think_end is not None:  # built now, on the host: the step only reads them
            self.marker_ids, self.matcher  # noqa: B018
        needed = width + plan.steps  # the last step's input too (its logits go unused)
        capacity = -(-needed // CAPACITY_BUCKET) * CAPACITY_BUCKET
        mask = torch.ones(plan.rows, capacity, dtype=torch.int64, device=self.device)
        if active.padding is not None:
            mask[:, : active.padding.shape[1]] = active.padding.long()
        return StaticRun(
            cache=static_cache_from(prefilled, self.model.config, capacity),
            attention_mask=mask,
            first_column=torch.tensor([width], device=self.device),
            noise_seed=plan.noise_seed,
        )

    def _static_decode(
        self, plan: Plan, run: StaticRun, width: int, logits, active: Active, record, stats
    ) -> None:
        """Prefilled `logits [N,V]` → up to T steps, recorded; stops once every row has
        (checked every `sync_every` steps, outside the step)."""
        step_fn = self.compiled_step() if self.compile_decode else self.static_step
        state = (active.position, active.phase, active.marker, active.alive)
        state = (*state, active.calm, active.forced)
        for t in range(plan.steps):
            noise = self._static_draws(plan)
            column = torch.tensor([width + t], device=self.device)
            step, next_state, next_logits = step_fn(logits, state, noise, column, run, plan.spec)
            active.phase, active.alive = state[1], state[3]
            record.write(t, active, step, logits)
            state, logits = next_state, next_logits
            stats["decode_steps"] += 1
            stats["forward_rows"] += plan.rows
            if (t + 1) % self.sync_every == 0 and not bool(state[3].any()):
                break

    def _static_needs_answer_step(self, spec: MixtureSpec) -> bool:
        """Whether rows can reach the answer phase, whose step is `spec.answer_spec()`."""
        return not (spec.is_discrete or self.think_end is None)

    def _static_draws(self, plan: Plan) -> tuple[StepNoise, StepNoise | None]:
        """The step's noise: the k-slot step's, and the answer step's when it runs."""
        spec, rows = plan.spec, plan.rows
        mixture = draw_noise(spec, rows, self.vocab_size, plan.generator, self.device)
        if not self._static_needs_answer_step(spec):
            return mixture, None
        answer = draw_noise(spec.answer_spec(), rows, self.vocab_size, plan.generator, self.device)
        return mixture, answer
