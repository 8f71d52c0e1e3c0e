"""Rollout engine: G trajectories per prompt for a batch of prompts, MoT-G or discrete.

    engine = RolloutEngine(model, tokenizer, max_new_tokens=512)
    rollout = engine.generate(prompt_ids, group_size=10, k=2, temperature=0.9,
                              selection="topk", weighting="dirichlet", seed=0)

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
   marker's token ids: a character automaton of the marker is advanced by each token's text
   (`MarkerMatcher`, a `[m+1, V]` transition table on the device), so any tokenization of
   the marker, e.g. a merged `">\\n"` token, is caught, and it costs one gather per step with
   no host sync. Discrete positions use k = 1, `sample`, temperature τ, except in a k = 1
   run, where the run's own selection applies throughout (greedy stays greedy). A discrete
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
   zero (ids 0, weights 0, mask False, phase 0). `Rollout.texts` decode the representative
   tokens, the final EOS token left out.

Randomness: every draw comes from one `torch.Generator` on the model's device seeded with
`seed`, in step order over the active rows, so a rollout is reproducible for fixed inputs
and engine settings; the draws a row sees depend on the batch composition (compaction,
`sync_every`), not only on its own history.

Rollout tensors live on the model's device.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .cache import PreallocatedCache, check_layer_types
from .kernels import REPRESENTATIVES, SELECTIONS, WEIGHTINGS, mixture_step, token_slot
from .kernels._validation import check_choice, check_k, check_positive, check_probability

PHASE_NONE = 0
PHASE_MIXTURE = 1
PHASE_DISCRETE = 2

__all__ = [
    "PHASE_DISCRETE",
    "PHASE_MIXTURE",
    "PHASE_NONE",
    "MarkerMatcher",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "default_attn_implementation",
    "model_load_kwargs",
    "set_attn_implementation",
]


# --------------------------------------------------------------------------------------
# Attention implementation helpers
# --------------------------------------------------------------------------------------


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def default_attn_implementation(device: torch.device | str | None = None) -> str:
    """`"flash_attention_2"` for CUDA when `flash_attn` imports, `"sdpa"` otherwise."""
    device = torch.device(device) if device is not None else None
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return "flash_attention_2" if on_cuda and _flash_attn_available() else "sdpa"


def model_load_kwargs(device: torch.device | str | None = None) -> dict:
    """Keyword arguments for `from_pretrained`/`from_config`: attention and dtype for `device`.

    bf16 with FlashAttention-2 (or SDPA) on CUDA, float32 with SDPA elsewhere.
    """
    device = torch.device(device) if device is not None else None
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    dtype = torch.bfloat16 if on_cuda else torch.float32
    return {"attn_implementation": default_attn_implementation(device), "dtype": dtype}


def set_attn_implementation(model: torch.nn.Module, implementation: str | None = None) -> str:
    """Switch a loaded HF model to `implementation` (default: `default_attn_implementation`)."""
    device = model.get_input_embeddings().weight.device
    implementation = implementation or default_attn_implementation(device)
    model.set_attn_implementation(implementation)
    return implementation


# --------------------------------------------------------------------------------------
# Sampling settings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings of one run (see `RolloutEngine.generate`); validated on creation."""

    k: int = 1
    temperature: float = 1.0
    selection: str = "topk"
    weighting: str = "prob"
    top_p: float | None = None
    min_p: float | None = None
    concentration: float = 1.0
    gumbel_temperature: float = 1.0
    representative: str = "sample"

    def __post_init__(self) -> None:
        check_k(self.k, vocab_size=math.inf)  # the engine checks k against its vocabulary
        check_choice("selection", self.selection, SELECTIONS)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("representative", self.representative, REPRESENTATIVES)
        for name in ("temperature", "concentration", "gumbel_temperature"):
            check_positive(name, getattr(self, name))
        check_probability("top_p", self.top_p, allow_zero=False)
        check_probability("min_p", self.min_p, allow_zero=True)

    @property
    def discrete(self) -> bool:
        """A k = 1 run: ordinary decoding with the run's own selection throughout."""
        return self.k == 1

    def step_kwargs(self) -> dict:
        """Keyword arguments of `mixture_step` for a thinking-phase step."""
        return dict(
            k=self.k,
            temperature=self.temperature,
            selection=self.selection,
            weighting=self.weighting,
            top_p=self.top_p,
            min_p=self.min_p,
            concentration=self.concentration,
            gumbel_temperature=self.gumbel_temperature,
            representative=self.representative,
        )

    def discrete_step_kwargs(self) -> dict:
        """Keyword arguments of `mixture_step` for a discrete-phase step of a mixture run."""
        return dict(
            k=1,
            temperature=self.temperature,
            selection="sample",
            weighting="prob",
            representative="argmax",  # one slot: no draw needed
        )


# --------------------------------------------------------------------------------------
# End-of-thinking detection on decoded text
# --------------------------------------------------------------------------------------


def _advance_text(marker: str, state: int, text: str) -> int:
    """Automaton state after reading `text` from `state` (len(marker) once the marker occurred)."""
    full = marker[:state] + text
    if marker in full:
        return len(marker)
    for length in range(min(len(marker) - 1, len(full)), 0, -1):
        if full.endswith(marker[:length]):
            return length
    return 0


def _token_transitions(marker: str, text: str) -> list[int]:
    """Next state from every state 0..m (m = len(marker), absorbing) after one token's text."""
    m = len(marker)
    if marker in text:
        return [m] * (m + 1)
    if text in marker:  # short tokens (and ""): the result depends on the state in general
        return [_advance_text(marker, s, text) for s in range(m)] + [m]
    # `text` is not a substring of the marker, so the longest marker prefix ending the text
    # lies inside `text` (independent of the state); only a match that starts in the
    # already-matched prefix and ends inside `text` depends on the state.
    tail = 0
    if text[-1] in marker:
        tail = next(
            (n for n in range(min(m - 1, len(text)), 0, -1) if text.endswith(marker[:n])), 0
        )
    column = [tail] * m + [m]
    if text[0] in marker:
        for j in range(1, m):
            if text.startswith(marker[j:]):
                for state in range(j, m):
                    if marker[:state].endswith(marker[:j]):
                        column[state] = m
    return column


def build_marker_table(marker: str, token_texts: Sequence[str]) -> torch.Tensor:
    """Transition table `[m+1, V]` int64 of the marker's character automaton over token texts.

    State s < m: the decoded text so far ends with `marker[:s]` (longest such s) and the
    marker has not occurred; state m: the marker occurred (absorbing). Row s, column v is
    the state after token v's text.
    """
    if not marker:
        raise ValueError("the end-of-thinking marker must be a non-empty string")
    columns = [_token_transitions(marker, text) for text in token_texts]
    return torch.tensor(columns, dtype=torch.int64).T.contiguous()


class MarkerMatcher:
    """Tracks, per row and on the device, whether the decoded text has produced `marker`.

    Args:
        marker: the end-of-thinking text, e.g. "</think>".
        token_texts: each vocabulary id decoded alone (`V` strings; ids the tokenizer does
            not know decode to ""). A marker starting with whitespace is not supported by
            tokenizers that drop a token's leading space when decoding it alone.
        device: where the `[m+1, V]` table lives.
    """

    def __init__(self, marker: str, token_texts: Sequence[str], device: torch.device):
        self.marker = marker
        self.table = build_marker_table(marker, token_texts).to(device)
        self.done_state = len(marker)
        self._flat = self.table.view(-1)
        self._vocab = self.table.shape[1]

    def start(self, rows: int) -> torch.Tensor:
        """Initial states `[rows]` int64 (nothing matched)."""
        return torch.zeros(rows, dtype=torch.int64, device=self.table.device)

    def advance(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """States `[n]` after tokens `[n]` (no host sync)."""
        return self._flat[state * self._vocab + token]

    def matched(self, state: torch.Tensor) -> torch.Tensor:
        """`[n]` bool: the marker has occurred."""
        return state == self.done_state


def decode_token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Each id in `range(vocab_size)` decoded alone (ids unknown to the tokenizer give "")."""
    texts = tokenizer.batch_decode([[i] for i in range(vocab_size)], skip_special_tokens=False)
    return [t if isinstance(t, str) else "" for t in texts]


# --------------------------------------------------------------------------------------
# Rollout (the result)
# --------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """N = B·G trajectories, T = longest completion, k slots (tensors on the model's device).

    Every completion position holds one action: ids/weights/mask `[k]` (the mixture, or a
    discrete token as `[y, …]`, `[1, 0, …]`, `[True, False, …]`), the representative token
    and its slot, the phase, and the rollout log-probs at the ids (temperature τ). Positions
    past a row's end are zero / False / phase 0.
    """

    prompt_ids: list[list[int]]  # N prompts (prompt n // G for trajectory n)
    ids: torch.Tensor  # [N,T,k] int64 candidate ids
    weights: torch.Tensor  # [N,T,k] float32 mixture weights
    mask: torch.Tensor  # [N,T,k] bool slot validity
    logprobs: torch.Tensor  # [N,T,k] float32 log p(ids) at temperature τ
    token: torch.Tensor  # [N,T] int64 representative token
    token_slot: torch.Tensor  # [N,T] int64 slot of `token` in `ids`
    phase: torch.Tensor  # [N,T] int8 PHASE_MIXTURE / PHASE_DISCRETE / PHASE_NONE
    completion_mask: torch.Tensor  # [N,T] bool
    lengths: torch.Tensor  # [N] int64
    texts: list[str]  # decoded representative tokens (the final EOS token left out)
    stop_reasons: list[str]  # "eos" | "length"
    group: torch.Tensor  # [N] int64 prompt index
    entropy: torch.Tensor  # [N,T] float32 entropy of p at each step (0 past the end)
    logits: torch.Tensor | None = None  # [N,T,V] float32 raw logits seen (return_logits=True)
    stats: dict = field(default_factory=dict)  # counters: steps, forward rows, compactions

    @property
    def num_tokens(self) -> int:
        """Generated tokens (completion positions) over all trajectories."""
        return int(self.lengths.sum())


# --------------------------------------------------------------------------------------
# Decode-loop state
# --------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """One `generate` call's validated inputs."""

    prompts: list[list[int]]  # B prompts
    group_size: int  # G
    sampling: SamplingConfig
    steps: int  # T, max new tokens
    generator: torch.Generator | None
    share_prefill: bool
    return_logits: bool
    progress: bool

    @property
    def rows(self) -> int:
        """N = B·G trajectories."""
        return len(self.prompts) * self.group_size

    def row_prompts(self) -> list[list[int]]:
        """The prompt of each of the N trajectories."""
        return [list(p) for p in self.prompts for _ in range(self.group_size)]


@dataclass
class _Known:
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
class _Active:
    """Per-row state of the rows still in the batch (n of them, in cache-row order)."""

    rows: torch.Tensor  # [n] int64 trajectory index
    position: torch.Tensor  # [n] int64 position id of the next input
    phase: torch.Tensor  # [n] int8
    marker: torch.Tensor | None  # [n] int64 automaton state
    alive: torch.Tensor  # [n] bool: still generating
    padding: torch.Tensor | None  # [n, P+T-1] bool attention mask (None: no padding)

    def keep(self, index: torch.Tensor) -> None:
        for name in ("rows", "position", "phase", "marker", "alive", "padding"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))


class _Record:
    """Step-major output buffers `[T, N, …]`, written at the active rows each step."""

    def __init__(self, plan: _Plan, vocab: int, device: torch.device):
        steps, rows, k = plan.steps, plan.rows, plan.sampling.k
        z = dict(device=device)
        self.ids = torch.zeros(steps, rows, k, dtype=torch.int64, **z)
        self.weights = torch.zeros(steps, rows, k, dtype=torch.float32, **z)
        self.mask = torch.zeros(steps, rows, k, dtype=torch.bool, **z)
        self.logprobs = torch.zeros(steps, rows, k, dtype=torch.float32, **z)
        self.token = torch.zeros(steps, rows, dtype=torch.int64, **z)
        self.phase = torch.zeros(steps, rows, dtype=torch.int8, **z)
        self.entropy = torch.zeros(steps, rows, dtype=torch.float32, **z)
        self.alive = torch.zeros(steps, rows, dtype=torch.bool, **z)
        self.logits = None
        if plan.return_logits:
            self.logits = torch.zeros(steps, rows, vocab, dtype=torch.float32, **z)

    def write(self, t: int, active: _Active, step: _Step, logits: torch.Tensor) -> None:
        rows = active.rows
        self.ids[t].index_copy_(0, rows, step.ids)
        self.weights[t].index_copy_(0, rows, step.weights.float())
        self.mask[t].index_copy_(0, rows, step.mask)
        self.logprobs[t].index_copy_(0, rows, step.logprobs.float())
        self.token[t].index_copy_(0, rows, step.token)
        self.phase[t].index_copy_(0, rows, active.phase)
        self.entropy[t].index_copy_(0, rows, step.entropy.float())
        self.alive[t].index_copy_(0, rows, active.alive)
        if self.logits is not None:
            self.logits[t].index_copy_(0, rows, logits.float())


@dataclass
class _Step:
    """One decode step's actions for the active rows (k slots)."""

    ids: torch.Tensor  # [n,k]
    weights: torch.Tensor  # [n,k]
    mask: torch.Tensor  # [n,k]
    token: torch.Tensor  # [n]
    logprobs: torch.Tensor  # [n,k]
    entropy: torch.Tensor  # [n]
    embeds: torch.Tensor  # [n,H]

    @classmethod
    def discrete(cls, step, k: int) -> _Step:
        """A k = 1 `MixtureStep` stored in k slots: ids `[y]*k`, weights `[1,0,…]`."""
        n = step.ids.shape[0]
        first = torch.zeros(n, k, dtype=torch.bool, device=step.ids.device)
        first[:, 0] = True
        return cls(
            ids=step.ids.expand(n, k),
            weights=first.float(),
            mask=first,
            token=step.token,
            logprobs=step.logprobs.expand(n, k),
            entropy=step.entropy,
            embeds=step.embeds,
        )

    @classmethod
    def of(cls, step) -> _Step:
        return cls(
            step.ids, step.weights, step.mask, step.token, step.logprobs, step.entropy, step.embeds
        )

    @classmethod
    def blend(cls, mixture: _Step, discrete: _Step, use_discrete: torch.Tensor) -> _Step:
        """Row-wise choice: `discrete` where `use_discrete [n]` is True, else `mixture`."""
        row = use_discrete.unsqueeze(-1)
        return cls(
            ids=torch.where(row, discrete.ids, mixture.ids),
            weights=torch.where(row, discrete.weights, mixture.weights),
            mask=torch.where(row, discrete.mask, mixture.mask),
            token=torch.where(use_discrete, discrete.token, mixture.token),
            logprobs=torch.where(row, discrete.logprobs, mixture.logprobs),
            entropy=mixture.entropy,
            embeds=torch.where(row, discrete.embeds, mixture.embeds),
        )


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class RolloutEngine:
    """Generates G trajectories per prompt with a shared, preallocated KV cache.

    Args:
        model: an HF causal LM (or a module with the same forward and
            `get_input_embeddings()`); its attention implementation is used as configured
            (see `set_attn_implementation`).
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
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = self._check_length(max_new_tokens)
        self.think_end = think_end
        self.embedding = model.get_input_embeddings().weight
        self.device = self.embedding.device
        self.vocab_size = self.embedding.shape[0]
        self.config = model.config.get_text_config(decoder=True)
        check_layer_types(self.config)
        self.max_positions = getattr(self.config, "max_position_embeddings", None)
        self.eos_token_ids = self._resolve_eos(eos_token_ids)
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
        self.pad_token_id = self._resolve_pad()
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._matcher: MarkerMatcher | None = None

    # ---- construction helpers ---------------------------------------------------------

    @staticmethod
    def _check_length(max_new_tokens) -> int:
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        return max_new_tokens

    def _resolve_eos(self, eos_token_ids) -> list[int]:
        if eos_token_ids is not None:
            ids = _as_id_list(eos_token_ids)
        else:
            ids = _as_id_list(getattr(self.tokenizer, "eos_token_id", None))
            generation_config = getattr(self.model, "generation_config", None)
            ids += _as_id_list(getattr(generation_config, "eos_token_id", None))
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"eos token ids {bad} lie outside the vocabulary [0, {self.vocab_size})"
            )
        return sorted(set(ids))

    def _resolve_pad(self) -> int:
        for value in (getattr(self.tokenizer, "pad_token_id", None), *self.eos_token_ids, 0):
            if value is not None and 0 <= value < self.vocab_size:
                return int(value)
        return 0

    @property
    def matcher(self) -> MarkerMatcher | None:
        """The end-of-thinking detector (built on first use: decodes the whole vocabulary)."""
        if self.think_end is not None and self._matcher is None:
            texts = decode_token_texts(self.tokenizer, self.vocab_size)
            self._matcher = MarkerMatcher(self.think_end, texts, self.device)
        return self._matcher

    # ---- input checks -----------------------------------------------------------------

    def _check_prompts(self, prompt_ids, max_new_tokens: int) -> list[list[int]]:
        if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty: pass a non-empty list of token-id lists")
        prompts = []
        for index, prompt in enumerate(prompt_ids):
            if isinstance(prompt, torch.Tensor):
                prompt = prompt.tolist()
            if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
                raise ValueError(f"prompt {index} is empty: every prompt needs at least one token")
            ids = [int(t) for t in prompt]
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise ValueError(
                    f"prompt {index} holds token ids outside the vocabulary [0, {self.vocab_size})"
                )
            self._check_context(index, len(ids), max_new_tokens)
            prompts.append(ids)
        return prompts

    def _check_context(self, index: int, length: int, max_new_tokens: int) -> None:
        limit = self.max_positions
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

    def _check_run(self, group_size: int, sampling: SamplingConfig) -> None:
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
        check_k(sampling.k, self.vocab_size)

    # ---- public API -------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        group_size: int = 1,
        k: int = 1,
        temperature: float = 1.0,
        selection: str = "topk",
        weighting: str = "prob",
        top_p: float | None = None,
        min_p: float | None = None,
        concentration: float = 1.0,
        gumbel_temperature: float = 1.0,
        representative: str = "sample",
        seed: int | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
        share_prefill: bool = True,
        return_logits: bool = False,
    ) -> Rollout:
        """Roll out `group_size` trajectories for each of the B prompts.

        Args:
            prompt_ids: B lists of token ids (mixed lengths; left padded internally). Each
                should end with the thinking opener (e.g. "<think>").
            group_size: G ≥ 1; trajectory n belongs to prompt n // G.
            k, temperature, selection, weighting, top_p, min_p, concentration,
                gumbel_temperature, representative: the MoT-G step (see
                `motg_fast.kernels.mixture_step`); k = 1 is ordinary decoding (`topk`
                greedy, `sample` multinomial).
            seed: seeds the run's generator on the model's device (None: global RNG).
            max_new_tokens: completion limit T (default: the engine's).
            progress: show a tqdm bar over decode steps.
            share_prefill: prefill each prompt once and share its cache across its G rows
                (default); False prefills all N rows (the baseline behaviour).
            return_logits: also return the raw logits of every step, `[N,T,V]` float32.

        Returns:
            A `Rollout` (see its fields).
        """
        sampling = SamplingConfig(
            k=k,
            temperature=temperature,
            selection=selection,
            weighting=weighting,
            top_p=top_p,
            min_p=min_p,
            concentration=concentration,
            gumbel_temperature=gumbel_temperature,
            representative=representative,
        )
        steps = self._check_length(
            self.max_new_tokens if max_new_tokens is None else max_new_tokens
        )
        prompts = self._check_prompts(prompt_ids, steps)
        self._check_run(group_size, sampling)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        plan = _Plan(
            prompts=prompts,
            group_size=group_size,
            sampling=sampling,
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

    def _run(self, plan: _Plan) -> Rollout:
        width = max(len(p) for p in plan.prompts)
        cache = PreallocatedCache(
            self.model.config,
            rows=plan.rows,
            capacity=width + plan.steps - 1,
            group_size=plan.group_size if plan.share_prefill else 1,
        )
        logits = self._prefill(plan, cache)
        active = self._initial_state(plan, width)
        record = _Record(plan, self.vocab_size, self.device)
        stats = {
            "prefill_rows": len(plan.prompts) if plan.share_prefill else plan.rows,
            "decode_steps": 0,
            "forward_rows": 0,
            "compactions": 0,
        }
        self._decode(plan, cache, logits, active, record, stats)
        return self._finish(plan, record, stats)

    def _prefill(self, plan: _Plan, cache: PreallocatedCache) -> torch.Tensor:
        """One forward over the left-padded prompts into `cache`; last logits `[N,V]`."""
        group = plan.group_size
        rows = plan.prompts if plan.share_prefill else plan.row_prompts()
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, prompt in enumerate(rows):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
        logits = out.logits[:, -1]
        if plan.share_prefill and group > 1:
            cache.share_prefix()
            logits = logits.repeat_interleave(group, dim=0)
        return logits

    def _initial_state(self, plan: _Plan, width: int) -> _Active:
        dev = self.device
        lengths = torch.tensor([len(p) for p in plan.prompts]).repeat_interleave(plan.group_size)
        padding = None
        if int(lengths.min()) < width:
            columns = torch.arange(width + plan.steps - 1)
            padding = (columns >= (width - lengths).unsqueeze(1)).to(dev)
        matcher = self.matcher
        return _Active(
            rows=torch.arange(plan.rows, device=dev),
            position=lengths.to(dev),
            phase=torch.full((plan.rows,), PHASE_MIXTURE, dtype=torch.int8, device=dev),
            marker=matcher.start(plan.rows) if matcher is not None else None,
            alive=torch.ones(plan.rows, dtype=torch.bool, device=dev),
            padding=padding,
        )

    def _decode(self, plan: _Plan, cache, logits, active: _Active, record, stats) -> None:
        """The decode loop: choose, record, update phases and stops, sync/compact, forward."""
        known = _Known()
        bar = tqdm(total=plan.steps, disable=not plan.progress, desc="rollout", leave=False)
        try:
            for t in range(plan.steps):
                step = self._choose(logits, plan, active, known)
                record.write(t, active, step, logits)
                self._update_rows(active, step.token)
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

    def _choose(self, logits, plan: _Plan, active: _Active, known: _Known) -> _Step:
        """The step's actions for every active row, by phase (see the module docstring)."""
        sampling = plan.sampling
        run = dict(generator=plan.generator, backend=self.backend, validate=False)
        if sampling.discrete or self.think_end is None:
            return _Step.of(mixture_step(logits, self.embedding, **sampling.step_kwargs(), **run))
        discrete = mixture = None
        if known.need_discrete:
            raw = mixture_step(logits, self.embedding, **sampling.discrete_step_kwargs(), **run)
            discrete = _Step.discrete(raw, sampling.k)
        if known.thinking:
            mixture = _Step.of(
                mixture_step(logits, self.embedding, **sampling.step_kwargs(), **run)
            )
        if discrete is None or mixture is None:
            return discrete if mixture is None else mixture
        return _Step.blend(mixture, discrete, active.phase == PHASE_DISCRETE)

    def _update_rows(self, active: _Active, token: torch.Tensor) -> None:
        """After recording a token: EOS stops the row; a completed marker ends thinking."""
        if self._eos.numel():
            active.alive &= ~torch.isin(token, self._eos)
        matcher = self.matcher
        if matcher is not None:
            thinking = active.phase == PHASE_MIXTURE
            active.marker = torch.where(
                thinking, matcher.advance(active.marker, token), active.marker
            )
            switch = thinking & matcher.matched(active.marker)
            active.phase = torch.where(switch, PHASE_DISCRETE, active.phase).to(torch.int8)

    def _sync(self, active: _Active, known: _Known) -> tuple[bool, torch.Tensor | None]:
        """Host check of the live rows (the only sync of the loop): `(done, keep)`, where
        `keep` lists the rows to compact to (None: leave the batch as it is)."""
        alive = active.alive
        n_alive, n_thinking, n_discrete = torch.stack(
            [
                alive.sum(),
                (alive & (active.phase == PHASE_MIXTURE)).sum(),
                (alive & (active.phase == PHASE_DISCRETE)).sum(),
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

    def _forward(self, cache, active: _Active, embeds: torch.Tensor) -> torch.Tensor:
        """Feed `embeds [n,H]` at each row's next position; logits `[n,V]` of that position."""
        out = self.model(
            inputs_embeds=embeds.unsqueeze(1),
            attention_mask=self._decode_mask(active, cache.length + 1),
            position_ids=active.position.unsqueeze(1),
            past_key_values=cache,
            use_cache=True,
        )
        active.position = active.position + 1
        return out.logits[:, -1]

    def _decode_mask(self, active: _Active, kv_length: int) -> torch.Tensor | None:
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

    def _finish(self, plan: _Plan, record: _Record, stats: dict) -> Rollout:
        alive = record.alive.T  # [N,T] completion mask
        lengths = alive.sum(1)
        longest = max(int(lengths.max()), 1)
        alive = alive[:, :longest].contiguous()

        def rows_first(buffer: torch.Tensor) -> torch.Tensor:
            out = buffer[:longest].transpose(0, 1)
            keep = alive.view(*alive.shape, *([1] * (out.dim() - 2)))
            return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))

        ids, token = rows_first(record.ids), rows_first(record.token)
        tokens = token.tolist()
        lengths_list = lengths.tolist()
        eos = set(self.eos_token_ids)
        reasons, texts = [], []
        for row, length in zip(tokens, lengths_list, strict=True):
            stopped = length > 0 and row[length - 1] in eos
            reasons.append("eos" if stopped else "length")
            texts.append(
                self.tokenizer.decode(row[: length - int(stopped)], skip_special_tokens=False)
            )
        n_rows = len(tokens)
        return Rollout(
            prompt_ids=plan.row_prompts(),
            ids=ids,
            weights=rows_first(record.weights),
            mask=rows_first(record.mask),
            logprobs=rows_first(record.logprobs),
            token=token,
            token_slot=token_slot(ids, token),
            phase=rows_first(record.phase),
            completion_mask=alive,
            lengths=lengths,
            texts=texts,
            stop_reasons=reasons,
            group=torch.arange(n_rows, device=self.device) // plan.group_size,
            entropy=rows_first(record.entropy),
            logits=rows_first(record.logits) if record.logits is not None else None,
            stats=stats,
        )
