"""MoT-G inside TRL's `GRPOTrainer`: `MixtureGRPOTrainer` and `MixtureGRPOConfig`.

A TRL GRPO script switches to mixture-of-token generation by changing its trainer class and,
to choose the mixture, its config class; dataset, reward functions, logging, `accelerate
launch` and PEFT stay as they are:

    from motg_fast.integrations.trl import MixtureGRPOConfig, MixtureGRPOTrainer

    args = MixtureGRPOConfig(output_dir="out", num_generations=8, temperature=0.9,
                             mixture_k=2, mixture_weighting="dirichlet",
                             mixture_likelihood="exact")
    trainer = MixtureGRPOTrainer(model=model, reward_funcs=reward, args=args,
                                 train_dataset=dataset)
    trainer.train()

`MixtureGRPOConfig` is `GRPOConfig` plus one flag per `MixtureSpec` field (`mixture_k`,
`mixture_selection`, `mixture_weighting`, …; τ is GRPOConfig's own `temperature`), the
likelihood (`mixture_likelihood`: token, weighted or exact) and the thinking markers
(`think_start`, appended to every prompt that does not already end with it, and
`think_end`). `MixtureGRPOConfig.from_spec(spec, ...)` builds one from a `MixtureSpec`. A
plain `GRPOConfig` also works and gets the defaults of those fields.

What the subclass changes, and why (every other step is TRL's own code):

- `_tokenize_prompts` (override, calls TRL's): appends `think_start`, so completions start
  in the thinking phase.
- `_generate_single_turn` (override, replaces TRL's generate/vLLM call): `RolloutEngine`
  rolls out the prompts (each group's prompt prefilled once, mixtures inside the thinking
  phase, discrete tokens after `think_end`). It returns the representative tokens as
  `completion_ids` (so TRL decodes the texts its reward functions see) and each action's
  rollout log-likelihood as the sampling log-probs, and keeps the stored actions for the
  next step. TRL's `rollout_func` hook cannot carry per-position actions to the loss, hence
  the override.
- `_generate_and_score_completions` (wraps TRL's): adds the actions to the batch as the
  columns `mixture_ids`, `mixture_weight_logits`, `mixture_mask` `[N,T,k]`, `mixture_token_slot`
  and `mixture_phase` `[N,T]`, padded like `completion_ids`, so TRL's shuffling and
  splitting carry them with every other column.
- `_get_per_token_logps_and_entropies` (override): per-position log-likelihoods of the
  stored actions from `motg_fast.policy.score_trajectories` (`mixture_embed` → decoder →
  `mixture_logprobs` → `action_loglik`), for the policy, the old policy and the reference
  model alike, and the entropies TRL logs from that forward's hidden states. It runs
  through `model(mixture_actions=...)` (see `install_mixture_scoring`), so DDP and PEFT
  wrappers see an ordinary forward call.
- `compute_loss` (wraps TRL's): puts the batch's actions in scope for that scoring. TRL's
  loss (loss types, clipping, KL, importance sampling level, entropy masks) does the rest.

Options the trainer cannot honour are refused at construction with a one-line
`ValueError` (`unsupported_option`): vLLM, transformers' continuous batching, the
sampling options of transformers' `generate` (`top_p`, `top_k`, `min_p`,
`repetition_penalty`, `generation_kwargs`, `cache_implementation`), Liger kernels,
`cast_lm_head_to_fp32`, FSDP, DeepSpeed ZeRO-3, tools, environments, `rollout_func`,
vision-language models and MoE router auxiliary losses; and, in `MixtureGRPOConfig`, spec
options whose method needs more than the stored actions (`_UNSUPPORTED_SPEC_FIELDS`).

Tested with TRL 1.16.0 (transformers 5.24, accelerate 1.15). The overridden methods are
private TRL internals: another TRL version may rename them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Any

import torch

try:
    from trl import GRPOTrainer
except ImportError as err:  # pragma: no cover - the optional extra is missing
    raise ImportError('motg_fast.integrations.trl needs TRL: pip install "motg-fast[trl]"') from err
from accelerate.utils import gather, is_peft_model
from trl.trainer.utils import get_config_model_id

from ..kernels import MixtureSpec, mixture_logprobs
from ..rollout.engine import RolloutEngine
from ..seeding import derived_seed
from ..training.policy import action_loglik, decoder_and_head, score_trajectories
from ..types import Phase, Trajectories, pad_time
from .trl_config import MixtureGRPOConfig, mixture_settings, unsupported_option

__all__ = [
    "ACTION_COLUMNS",
    "MixtureGRPOConfig",
    "MixtureGRPOTrainer",
    "actions_to_columns",
    "columns_to_actions",
    "install_mixture_scoring",
    "mixture_settings",
    "prompt_groups",
    "score_actions",
    "unsupported_option",
]

# Batch column -> `Trajectories` field of the stored actions that travel through TRL's batch.
ACTION_COLUMNS: dict[str, str] = {
    "mixture_ids": "ids",  # [N,T,k] int64
    "mixture_weight_logits": "weight_logits",  # [N,T,k] float32 ω (w = softmax over valid)
    "mixture_mask": "mask",  # [N,T,k] bool
    "mixture_token_slot": "token_slot",  # [N,T] int64
    "mixture_phase": "phase",  # [N,T] int8 `Phase`
}

# --------------------------------------------------------------------------------------
# The training forward
# --------------------------------------------------------------------------------------


def score_actions(
    model: torch.nn.Module,
    traj: Trajectories,
    spec: MixtureSpec,
    *,
    likelihood: str,
    return_entropy: bool = False,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(ℓ [N,T], entropy [N,T] or None)` of stored actions under `model`.

    ℓ is `motg_fast.policy.score_trajectories`'s (`mixture_embed` → decoder →
    `mixture_logprobs` → `action_loglik`), differentiable. The entropy of `softmax(z/τ)` at
    each scored position, which TRL logs and may mask or regularise with, comes from the
    hidden states of that same forward (one more LM-head pass, `mixture_logprobs` with
    `return_entropy`), differentiable when `entropy_grad`.
    """
    decoder, head_weight = decoder_and_head(model)
    handle = decoder.register_forward_pre_hook(_inputs_require_grad, with_kwargs=True)
    try:
        scores = score_trajectories(model, traj, spec, likelihood=likelihood)
    finally:
        handle.remove()
    ell = scores.action_logprob
    if not return_entropy:
        return ell, None
    scored = scores.hidden  # the hidden state before each action
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        *_, entropy = mixture_logprobs(
            scored,
            head_weight,
            traj.ids[..., :1],
            temperature=spec.temperature,
            return_entropy=True,
        )
    return ell, entropy


def _inputs_require_grad(module, args, kwargs):
    """Decoder pre-hook: mixture inputs built from a frozen embedding (PEFT) still require
    grad, so reentrant gradient checkpointing reaches the adapters (what transformers'
    `enable_input_require_grads` does for the embedding layer, which `mixture_embed` skips)."""
    embeds = kwargs.get("inputs_embeds")
    if torch.is_grad_enabled() and embeds is not None and not embeds.requires_grad:
        kwargs["inputs_embeds"] = embeds.detach().requires_grad_(True)
    return args, kwargs


def install_mixture_scoring(model: torch.nn.Module, spec: MixtureSpec, likelihood: str) -> None:
    """Let `model(mixture_actions=traj, mixture_entropy=..., mixture_entropy_grad=...)`
    return `score_actions(model, traj, spec, ...)`.

    Wraps the instance's `forward` (as TRL's own fused LM head does): any other call runs
    the previous forward unchanged. Scoring through the model's call, rather than its
    submodules, keeps DDP's gradient hooks and PEFT's adapter switches in the loop. Raises
    at once for a model whose logits the mixture forward cannot reproduce.
    """
    decoder_and_head(model)
    previous = model.forward

    @functools.wraps(previous)  # keeps the signature that `generate` and the engine read
    def forward(
        *args,
        mixture_actions: Trajectories | None = None,
        mixture_entropy: bool = False,
        mixture_entropy_grad: bool = True,
        **kw,
    ):
        if mixture_actions is None:
            return previous(*args, **kw)
        extra = sorted(name for name, value in kw.items() if value is not None)
        if args or extra:
            raise TypeError(f"a mixture scoring call takes no model inputs, got {extra}")
        return score_actions(
            model,
            mixture_actions,
            spec,
            likelihood=likelihood,
            return_entropy=mixture_entropy,
            entropy_grad=mixture_entropy_grad,
        )

    model.forward = forward


# --------------------------------------------------------------------------------------
# Actions as batch columns
# --------------------------------------------------------------------------------------


def actions_to_columns(traj: Trajectories, length: int) -> dict[str, torch.Tensor]:
    """The stored actions of `traj` as batch columns, right-padded in time to `length`."""
    if traj.ids.shape[1] > length:
        raise ValueError(f"{traj.ids.shape[1]} positions do not fit in {length} columns")
    return {column: pad_time(getattr(traj, f), length) for column, f in ACTION_COLUMNS.items()}


def columns_to_actions(batch: dict[str, Any]) -> Trajectories:
    """The stored actions of a batch (prompts are filled in when scoring)."""
    values = {name: batch[column] for column, name in ACTION_COLUMNS.items()}
    rows = values["ids"].shape[0]
    # The rollout's log-probs are not carried: the training forward rescores the ids.
    nan = torch.full_like(values["weight_logits"], float("nan"))
    return Trajectories(prompt_ids=[[] for _ in range(rows)], logprobs=nan, **values)


def prompt_lists(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The unpadded prompts of `ids [N,P]` under `mask [N,P]`."""
    keep = mask.bool()
    return [row[m].tolist() for row, m in zip(ids, keep, strict=True)]


def prompt_groups(prompt_ids: list[list[int]]) -> tuple[list[list[int]], int]:
    """`(distinct prompts, G)` when the rows are runs of G equal prompts (TRL's sampler
    repeats each prompt `num_generations` times in a row); else every row, G = 1."""
    runs: list[list] = []
    for prompt in prompt_ids:
        prompt = list(prompt)
        if runs and runs[-1][0] == prompt:
            runs[-1][1] += 1
        else:
            runs.append([prompt, 1])
    sizes = {count for _, count in runs}
    if len(sizes) == 1:
        return [prompt for prompt, _ in runs], sizes.pop()
    return [list(p) for p in prompt_ids], 1


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------


class MixtureGRPOTrainer(GRPOTrainer):
    """TRL's `GRPOTrainer` with MoT-G rollouts and mixture log-likelihoods.

    Takes `GRPOTrainer`'s arguments. `args` is a `MixtureGRPOConfig` (or a plain
    `GRPOConfig`: default mixture). See the module docstring for what changes.
    """

    _tag_names = ["trl", "grpo", "motg"]

    def __init__(self, model, reward_funcs=None, args=None, *positional, **kwargs):
        call = inspect.signature(GRPOTrainer.__init__).bind(
            self, model, reward_funcs, args, *positional, **kwargs
        )
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = MixtureGRPOConfig(f"{name.split('/')[-1]}-MixtureGRPO")
            call.arguments["args"] = args
        reason = unsupported_option(args, call.arguments)
        if reason is not None:
            raise ValueError(f"MixtureGRPOTrainer: {reason}")
        self.mixture_spec, self.mixture_likelihood, think_start, think_end = mixture_settings(args)
        self._actions_in_scope: Trajectories | None = None
        self._rollouts = 0
        super().__init__(*call.args[1:], **call.kwargs)
        if self.aux_loss_enabled:
            raise ValueError(
                "MixtureGRPOTrainer: the MoE router auxiliary loss is not supported; set "
                "router_aux_loss_coef=0.0"
            )
        install_mixture_scoring(self._policy(), self.mixture_spec, self.mixture_likelihood)
        if self.ref_model is not None:
            reference = self.accelerator.unwrap_model(self.ref_model)
            install_mixture_scoring(reference, self.mixture_spec, self.mixture_likelihood)
        self._think_end = think_end
        self._engine: RolloutEngine | None = None
        encode = functools.partial(self._tokenizer.encode, add_special_tokens=False)
        self._think_start_ids: list[int] = list(encode(think_start)) if think_start else []

    def _policy(self) -> torch.nn.Module:
        """The transformers model being trained (under PEFT: with its adapters)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    @property
    def engine(self) -> RolloutEngine:
        """The rollout engine of the policy, (re)built when the policy moves device."""
        policy = self._policy()
        device = policy.get_input_embeddings().weight.device
        if self._engine is None or self._engine.device != device:
            self._engine = RolloutEngine(
                policy,
                self._tokenizer,
                max_new_tokens=self.max_completion_length,
                think_end=self._think_end,
                eos_token_ids=self.eos_token_ids,
            )
        return self._engine

    # ---- rollout -----------------------------------------------------------------------

    def _tokenize_prompts(self, prompts: list):
        """TRL's tokenisation, then `think_start` appended to every prompt lacking it."""
        prompt_ids, images, fields = super()._tokenize_prompts(prompts)
        opener = self._think_start_ids
        if opener:
            prompt_ids = [
                list(p) if list(p[-len(opener) :]) == opener else [*p, *opener] for p in prompt_ids
            ]
        return prompt_ids, images, fields

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        """Roll out the N prompt rows with the engine: `(completion_ids, sampling logps)`,
        N lists of the representative tokens and of each action's rollout log-likelihood."""
        prompts, group_size = prompt_groups(prompt_ids)
        seed = derived_seed(
            self.args.seed,
            "trl-rollout",
            self.accelerator.process_index,
            self.state.global_step,
            self._step,
            self._rollouts,
        )
        self._rollouts += 1
        traj = self.engine.generate(prompts, self.mixture_spec, group_size=group_size, seed=seed)
        self._actions_in_scope = traj
        self._log_phases(traj)
        rollout_ll = action_loglik(
            traj.logprobs,
            traj,
            self.mixture_spec,
            likelihood=self.mixture_likelihood,
            rest_logprob=traj.rest_logprob,
        )
        lengths = traj.lengths.tolist()
        tokens, ells = traj.token.tolist(), rollout_ll.tolist()
        completion_ids = [row[:n] for row, n in zip(tokens, lengths, strict=True)]
        logprobs = [row[:n] for row, n in zip(ells, lengths, strict=True)]
        return completion_ids, logprobs

    def _log_phases(self, traj: Trajectories) -> None:
        """Metrics: the fraction of completion tokens inside the thinking phase, and of
        completions that closed it."""
        mode = "train" if self.model.training else "eval"
        thinking = (traj.phase == Phase.MIXTURE).sum().float()
        closed = (traj.phase == Phase.DISCRETE).any(-1).sum().float()
        stats = gather(torch.stack([thinking, traj.lengths.sum().float(), closed])[None])
        tokens, total, closed_rows = stats.sum(0).tolist()
        rows = stats.shape[0] * len(traj)
        self._metrics[mode]["mixture/thinking_token_fraction"].append(tokens / max(total, 1.0))
        self._metrics[mode]["mixture/closed_think_fraction"].append(closed_rows / max(rows, 1))

    def _generate_and_score_completions(self, inputs):
        """TRL's generation and scoring, with the stored actions added as batch columns."""
        try:
            output = super()._generate_and_score_completions(inputs)
            actions = self._actions_in_scope
        finally:
            self._actions_in_scope = None
        output.update(actions_to_columns(actions, output["completion_ids"].shape[1]))
        return output

    # ---- scoring -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _scoring(self, actions: Trajectories):
        """Make `actions` the rows that `_get_per_token_logps_and_entropies` scores."""
        self._actions_in_scope = actions
        try:
            yield
        finally:
            self._actions_in_scope = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's GRPO loss, the per-token log-likelihoods being those of the stored actions."""
        with self._scoring(columns_to_actions(inputs)):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        """`(ℓ [N,T], entropy [N,T] or None, None)` of the actions in scope, T =
        `logits_to_keep`, prompts read from `input_ids`/`attention_mask` `[N,P+T]`."""
        actions = self._actions_in_scope
        if actions is None or len(actions) != input_ids.shape[0]:
            raise RuntimeError("MixtureGRPOTrainer: no stored actions match the rows to score")
        prompts = prompt_lists(input_ids[:, :-logits_to_keep], attention_mask[:, :-logits_to_keep])
        actions = dataclasses.replace(actions, prompt_ids=prompts)
        step = batch_size or len(prompts)
        logps, entropies = [], []
        for start in range(0, len(prompts), step):
            rows = list(range(start, min(start + step, len(prompts))))
            with self.accelerator.autocast():
                ell, entropy = model(
                    mixture_actions=actions.select(rows),
                    mixture_entropy=compute_entropy,
                    mixture_entropy_grad=getattr(self, "_entropy_bonus_enabled", True),
                )
            logps.append(pad_time(ell, logits_to_keep))
            if compute_entropy:
                entropies.append(pad_time(entropy, logits_to_keep))
        entropy = torch.cat(entropies) if compute_entropy else None
        return torch.cat(logps), entropy, None
