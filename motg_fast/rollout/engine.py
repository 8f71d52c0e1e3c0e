"""Rollout engine: G trajectories per prompt for a batch of prompts, MoT-G or discrete.

    engine = RolloutEngine(model, tokenizer, max_new_tokens=512)
    spec = MixtureSpec(k=2, temperature=0.9, selection="topk", weighting="dirichlet")
    trajectories = engine.generate(prompt_ids, spec, group_size=10, seed=0)

How a run goes (N = B·G trajectories; trajectory n belongs to prompt n // G):

1. **Prefill once per prompt.** The B prompts are left padded to the longest, P, and run
   through the model in one forward that writes straight into a `PreallocatedCache`
   (motg_fast/cache.py) of N rows and capacity P + T − 1 (T = max_new_tokens), filling rows
   0, G, 2G, …; one broadcast copy then gives each group's other G − 1 rows the same prefix.
   Only the last position's logits are computed (`logits_to_keep=1`), and they are repeated
   to the G rows. Nothing is ever reallocated to grow the cache; attention reads the
   filled prefix (a view) only.
2. **Decode.** Each step feeds `inputs_embeds [n,1,H]` built by
   `motg_fast.kernels.mixture_step` (fused Triton on CUDA, the PyTorch reference on CPU)
   with the input-embedding matrix, at per-row position ids (prompt length + step). With
   SDPA and only full-attention layers the padding mask is handed to the model ready-made
   (`[n,1,1,kv]` bool, a view), so no mask is rebuilt per step.
3. **Phases, per row.** A completion starts in the thinking phase (the prompt ends with
   `<think>`): k mixture slots with the run's selection and weighting. The row switches to
   the discrete phase after the representative token whose decoded text completes the
   end-of-thinking marker (default "</think>"). Detection is on *decoded text*, not on the
   marker's token ids (`motg_fast.marker.MarkerMatcher`: one gather per step, no host sync).
   Discrete positions use `spec.answer_spec()` (k = 1, `sample`, temperature τ), except in a
   k = 1 run, where the run's own spec applies throughout (greedy stays greedy). A discrete
   position is stored as ids `[y, y, …]`, weights `[1, 0, …]`, mask `[True, False, …]`,
   log-probs `[log p(y), …]` (the log-prob at each stored id), token slot 0. A step whose
   live rows are all in one phase runs one `mixture_step`; a mixed batch runs both (the
   k-slot and the k = 1 step) and picks per row. Between host syncs (on CUDA) the host
   cannot know whether a row switched, so both run there while any row may still think.
4. **Stops and compaction.** A row stops after emitting any EOS id (in either phase; the EOS
   position is part of the completion) or after T tokens. Every `sync_every` steps (1 on a
   CPU, 8 on CUDA: one host sync each) the engine counts live rows; when at least
   `compact_fraction` of the batch has finished, the live rows are compacted to the front of
   the cache buffers (`index_select` of the filled prefix, same buffers) and all per-row
   state follows, so finished rows stop costing compute. Positions past a row's end are
   zero (ids 0, weights 0, mask False, `Phase.PAD`). `Trajectories.texts` decode the
   representative tokens, the final EOS token left out.

Randomness: every draw comes from one `torch.Generator` on the model's device seeded with
`seed`, in step order over the active rows, so a rollout is reproducible for fixed inputs
and engine settings; the draws a row sees depend on the batch composition (compaction,
`sync_every`), not only on its own history.

Trajectory tensors live on the model's device.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..kernels import MixtureSpec, mixture_step
from ..kernels.step_op import check_compilable
from ..models import cache_argument
from ..types import Phase, Trajectories, left_pad
from .cache import PreallocatedCache, check_layer_types
from .checks import check_length, check_prompts, check_run, resolve_eos, resolve_pad
from .decode_state import Active, Known, Plan, Record, Step, noisy_inputs
from .marker import MarkerMatcher, decode_token_texts
from .static_decode import StaticDecode

__all__ = ["RolloutEngine"]


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


class RolloutEngine(StaticDecode):
    """Generates G trajectories per prompt with a shared, preallocated KV cache.

    Args:
        model: an HF causal LM (or a module with the same forward and
            `get_input_embeddings()`); its attention implementation is used as configured
            (`motg_fast.models.load_model` picks FlashAttention-2 or SDPA).
        tokenizer: the model's tokenizer (decodes texts and the marker automaton's tokens).
        max_new_tokens: default completion length limit T.
        think_end: end-of-thinking marker text; None keeps every row in the thinking phase.
        eos_token_ids: stop ids; default: the tokenizer's EOS and the model's
            `generation_config.eos_token_id`.
        compact_fraction: compact the batch once this fraction of its rows has finished
            (0 < f ≤ 1); None never compacts (finished rows ride along, their outputs unused).
        sync_every: steps between host syncs (stop check, compaction); default 1 on a CPU,
            8 on CUDA.
        backend: `mixture_step` path: None (Triton on CUDA, the reference elsewhere),
            `"reference"` or `"triton"`.
        compile_decode: decode with one `torch.compile(fullgraph=True)` step over a static
            cache (CUDA graphs on CUDA; `motg_fast.rollout.static_decode`); False: eager.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_new_tokens: int = 512,
        think_end: str | None = "</think>",
        eos_token_ids: int | Sequence[int] | None = None,
        compact_fraction: float | None = 0.25,
        sync_every: int | None = None,
        backend: str | None = None,
        compile_decode: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = check_length(max_new_tokens)
        self.think_end = think_end
        self.device = self.embedding.device
        self.vocab_size = self.embedding.shape[0]
        self.config = model.config.get_text_config(decoder=True)
        check_layer_types(self.config)
        self.max_positions = getattr(self.config, "max_position_embeddings", None)
        self.eos_token_ids = resolve_eos(eos_token_ids, tokenizer, model, self.vocab_size)
        self._eos = torch.tensor(self.eos_token_ids, dtype=torch.int64, device=self.device)
        if compact_fraction is not None and not 0 < compact_fraction <= 1:
            raise ValueError(
                f"compact_fraction must lie in (0, 1] or be None, got {compact_fraction}"
            )
        self.compact_fraction = compact_fraction
        if sync_every is None:
            sync_every = 8 if self.device.type == "cuda" else 1
        if not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
        self.sync_every = sync_every
        self.backend = backend
        self.pad_token_id = resolve_pad(tokenizer, self.eos_token_ids, self.vocab_size)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_kwarg = cache_argument(model)
        self._matcher: MarkerMatcher | None = None
        self._marker_ids: torch.Tensor | None = None
        self.compile_decode = compile_decode
        self._compiled_step = None

    # ---- construction helpers ---------------------------------------------------------

    @property
    def embedding(self) -> torch.Tensor:
        """The input embedding `[V,H]`, read on each use: FSDP2 swaps the parameter object
        when it gathers the full weights (see `motg_fast.distributed`)."""
        return self.model.get_input_embeddings().weight

    @property
    def marker_ids(self) -> torch.Tensor:
        """Token ids `[m]` of the end-of-thinking marker (what a cold stop writes)."""
        if self._marker_ids is None:
            ids = self.tokenizer.encode(self.think_end, add_special_tokens=False)
            self._marker_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        return self._marker_ids

    @property
    def matcher(self) -> MarkerMatcher | None:
        """The end-of-thinking detector (built on first use: decodes the whole vocabulary)."""
        if self.think_end is not None and self._matcher is None:
            texts = decode_token_texts(self.tokenizer, self.vocab_size)
            self._matcher = MarkerMatcher(self.think_end, texts, self.device)
        return self._matcher

    # ---- public API -------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        spec: MixtureSpec = MixtureSpec(),  # noqa: B008 - frozen: greedy decoding
        *,
        group_size: int = 1,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
        share_prefill: bool = True,
        return_logits: bool = False,
    ) -> Trajectories:
        """Roll out `group_size` trajectories for each of the B prompts.

        Args:
            prompt_ids: B lists of token ids (mixed lengths; left padded internally). Each
                should end with the thinking opener (e.g. "<think>").
            spec: the `MixtureSpec` of a thinking step (see `motg_fast.kernels.mixture_step`);
                k = 1 is ordinary decoding (`topk` greedy, `sample` multinomial). Default:
                greedy decoding.
            group_size: G ≥ 1; trajectory n belongs to prompt n // G.
            seed: seeds the run's generator on the model's device (None: global RNG).
            max_new_tokens: completion limit T (default: the engine's).
            progress: show a tqdm bar over decode steps.
            share_prefill: prefill each prompt once and share its cache across its G rows
                (default); False prefills all N rows (the baseline behaviour).
            return_logits: also return the raw logits of every step, `[N,T,V]` float32.

        Returns:
            `Trajectories` with texts, stop reasons, entropy, group index and engine stats.
        """
        steps = check_length(self.max_new_tokens if max_new_tokens is None else max_new_tokens)
        prompts = check_prompts(prompt_ids, steps, self.vocab_size, self.max_positions)
        check_run(group_size, spec, self.vocab_size)
        if self.compile_decode:
            check_compilable(spec)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        plan = Plan(
            prompts=prompts,
            group_size=group_size,
            spec=spec,
            steps=steps,
            generator=generator,
            share_prefill=share_prefill,
            return_logits=return_logits,
            progress=progress,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self._run(plan)
        finally:
            self.model.train(was_training)

    # ---- the run ----------------------------------------------------------------------

    def _run(self, plan: Plan) -> Trajectories:
        width = max(len(p) for p in plan.prompts)
        cache = PreallocatedCache(
            self.model.config,
            rows=plan.rows,
            capacity=width + plan.steps - 1,
            group_size=plan.group_size if plan.share_prefill else 1,
        )
        logits = self._prefill(plan, cache)
        active = self._initial_state(plan, width)
        if plan.spec.noise_std > 0:
            plan.noise_seed = torch.randint(
                0, 2**62, (plan.rows,), generator=plan.generator, device=self.device
            )
        record = Record(plan, self.vocab_size, self.device)
        stats = {
            "prefill_rows": len(plan.prompts) if plan.share_prefill else plan.rows,
            "decode_steps": 0,
            "forward_rows": 0,
            "compactions": 0,
        }
        if self.compile_decode:
            run = self.static_run(plan, cache, width, active)
            del cache  # the static cache holds the prefix now
            self._static_decode(plan, run, width, logits, active, record, stats)
        else:
            self._decode(plan, cache, logits, active, record, stats)
        return self._finish(plan, record, stats)

    def _prefill(self, plan: Plan, cache: PreallocatedCache) -> torch.Tensor:
        """One forward over the left-padded prompts into `cache`; last logits `[N,V]`."""
        group = plan.group_size
        rows = plan.prompts if plan.share_prefill else plan.row_prompts()
        ids, mask = left_pad(rows, self.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            **{self._cache_kwarg: cache},
            use_cache=True,
            **extra,
        )
        logits = out.logits[:, -1]
        if plan.share_prefill and group > 1:
            cache.share_prefix()
            logits = logits.repeat_interleave(group, dim=0)
        return logits

    def _initial_state(self, plan: Plan, width: int) -> Active:
        dev = self.device
        lengths = torch.tensor([len(p) for p in plan.prompts]).repeat_interleave(plan.group_size)
        padding = None
        if int(lengths.min()) < width:
            columns = torch.arange(width + plan.steps - 1)
            padding = (columns >= (width - lengths).unsqueeze(1)).to(dev)
        matcher = self.matcher
        cold_stop = plan.spec.cold_stop_entropy is not None and matcher is not None
        zeros = torch.zeros(plan.rows, dtype=torch.int64, device=dev)
        return Active(
            rows=torch.arange(plan.rows, device=dev),
            position=lengths.to(dev),
            phase=torch.full((plan.rows,), Phase.MIXTURE, dtype=torch.int8, device=dev),
            marker=matcher.start(plan.rows) if matcher is not None else None,
            alive=torch.ones(plan.rows, dtype=torch.bool, device=dev),
            padding=padding,
            calm=zeros if cold_stop else None,
            forced=zeros - 1 if cold_stop else None,
        )

    def _decode(self, plan: Plan, cache, logits, active: Active, record, stats) -> None:
        """The decode loop: choose, record, update phases and stops, sync/compact, forward."""
        known = Known()
        bar = tqdm(total=plan.steps, disable=not plan.progress, desc="rollout", leave=False)
        try:
            for t in range(plan.steps):
                step = self._choose(logits, plan, active, known, t)
                record.write(t, active, step, logits)
                self._update_rows(active, step, plan.spec)
                bar.update(1)
                if t == plan.steps - 1:
                    break
                known.exact = False
                embeds = step.embeds
                if (t + 1) % self.sync_every == 0:
                    done, keep = self._sync(active, known)
                    if done:
                        break
                    if keep is not None:
                        cache.keep_rows(keep)
                        active.keep(keep)
                        embeds = embeds.index_select(0, keep)
                        stats["compactions"] += 1
                    bar.set_postfix(rows=active.rows.numel(), refresh=False)
                logits = self._forward(cache, active, embeds)
                stats["decode_steps"] += 1
                stats["forward_rows"] += active.rows.numel()
        finally:
            bar.close()

    def _choose(self, logits, plan: Plan, active: Active, known: Known, t: int) -> Step:
        """The step's actions for every active row, by phase (see the module docstring)."""
        spec = plan.spec
        run = dict(generator=plan.generator, backend=self.backend, validate=False)
        if spec.is_discrete or self.think_end is None:
            step = Step.of(mixture_step(logits, self.embedding, spec, **run))
        else:
            discrete = mixture = None
            if known.need_discrete:
                raw = mixture_step(logits, self.embedding, spec.answer_spec(), **run)
                discrete = Step.discrete(raw, spec.k)
            if known.thinking:
                mixture = Step.of(mixture_step(logits, self.embedding, spec, **run))
            step = discrete if mixture is None else mixture
            if discrete is not None and mixture is not None:
                step = Step.blend(mixture, discrete, active.phase == Phase.DISCRETE)
        if active.forced is not None:
            step = self._force_marker(step, logits, active, spec)
        if spec.noise_std > 0:
            seeds = plan.noise_seed.index_select(0, active.rows)
            steps = torch.full_like(seeds, t)
            step.embeds = noisy_inputs(step.embeds, seeds, steps, active.phase, spec.noise_std)
        return step

    def _force_marker(self, step: Step, logits, active: Active, spec: MixtureSpec) -> Step:
        """Rows ending their thinking by a cold stop write the marker's tokens, one a step."""
        marker = self.marker_ids
        index = active.forced.clamp(0, len(marker) - 1)
        token = marker.index_select(0, index)
        scaled = logits.float() / spec.temperature
        logprob = scaled.gather(-1, token.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1)
        embeds = self.embedding.index_select(0, token).to(step.embeds.dtype)
        forced = Step.token_action(token, logprob, step.entropy, embeds, spec.k)
        return Step.blend(step, forced, active.forced >= 0)

    def _update_rows(self, active: Active, step: Step, spec: MixtureSpec) -> None:
        """After recording a token: EOS stops the row; a completed marker ends thinking; a
        cold stop starts writing the marker."""
        if self._eos.numel():
            active.alive &= ~torch.isin(step.token, self._eos)
        matcher = self.matcher
        if matcher is None:
            return
        writing = (active.phase == int(Phase.MIXTURE)) | (active.phase == int(Phase.FORCED))
        active.marker = torch.where(
            writing, matcher.advance(active.marker, step.token), active.marker
        )
        done = writing & matcher.matched(active.marker)
        if active.forced is not None:
            active.forced = torch.where(active.forced >= 0, active.forced + 1, active.forced)
            done |= active.forced >= len(self.marker_ids)
            self._cold_stop(active, step, spec)
        active.phase = torch.where(done, int(Phase.DISCRETE), active.phase).to(torch.int8)
        if active.forced is not None:
            active.forced = torch.where(done, -1, active.forced)

    def _cold_stop(self, active: Active, step: Step, spec: MixtureSpec) -> None:
        """Count thinking rows' consecutive steps below the entropy threshold; a row that
        reaches `cold_stop_steps` starts writing the end-of-thinking marker."""
        thinking = active.phase == int(Phase.MIXTURE)
        calm = thinking & (step.entropy < spec.cold_stop_entropy)
        active.calm = torch.where(calm, active.calm + 1, 0)
        start = thinking & (active.calm >= spec.cold_stop_steps)
        start &= ~self.matcher.matched(active.marker)
        active.forced = torch.where(start, 0, active.forced)
        active.phase = torch.where(start, int(Phase.FORCED), active.phase).to(torch.int8)

    def _sync(self, active: Active, known: Known) -> tuple[bool, torch.Tensor | None]:
        """Host check of the live rows (the only sync of the loop): `(done, keep)`, where
        `keep` lists the rows to compact to (None: leave the batch as it is)."""
        alive = active.alive
        n_alive, n_thinking, n_discrete = torch.stack(
            [
                alive.sum(),
                (alive & (active.phase != Phase.DISCRETE)).sum(),
                (alive & (active.phase == Phase.DISCRETE)).sum(),
            ]
        ).tolist()
        known.thinking, known.discrete, known.exact = n_thinking > 0, n_discrete > 0, True
        if n_alive == 0:
            return True, None
        finished = alive.numel() - n_alive
        fraction = self.compact_fraction
        if fraction is None or finished < max(1, fraction * alive.numel()):
            return False, None
        return False, alive.nonzero().squeeze(-1)

    def _forward(self, cache, active: Active, embeds: torch.Tensor) -> torch.Tensor:
        """Feed `embeds [n,H]` at each row's next position; logits `[n,V]` of that position."""
        out = self.model(
            inputs_embeds=embeds.unsqueeze(1),
            attention_mask=self._decode_mask(active, cache.length + 1),
            position_ids=active.position.unsqueeze(1),
            **{self._cache_kwarg: cache},
            use_cache=True,
        )
        active.position = active.position + 1
        return out.logits[:, -1]

    def _decode_mask(self, active: Active, kv_length: int) -> torch.Tensor | None:
        """Padding mask of one decode step: None without padding; `[n,1,1,kv]` bool (used as
        is by the model) for SDPA with only full-attention layers; else the 2-D mask."""
        if active.padding is None:
            return None
        mask = active.padding[:, :kv_length]
        layer_types = set(getattr(self.config, "layer_types", None) or ["full_attention"])
        if self.config._attn_implementation == "sdpa" and layer_types == {"full_attention"}:
            return mask[:, None, None, :]
        return mask.long()

    # ---- result -----------------------------------------------------------------------

    def _finish(self, plan: Plan, record: Record, stats: dict) -> Trajectories:
        """The recorded steps as trajectories, with texts and stop reasons (EOS or length)."""
        traj = record.trajectories(plan, stats)
        eos = set(self.eos_token_ids)
        for row, length in zip(traj.token.tolist(), traj.lengths.tolist(), strict=True):
            stopped = length > 0 and row[length - 1] in eos
            traj.stop_reasons.append("eos" if stopped else "length")
            text = self.tokenizer.decode(row[: length - int(stopped)], skip_special_tokens=False)
            traj.texts.append(text)
        return traj
