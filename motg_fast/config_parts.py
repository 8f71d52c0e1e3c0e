"""The parts of a run's configuration: model, task, decoding, evaluation, training and run.

Each part is a dataclass whose fields carry their command-line help (``metadata["help"]``)
and, where bounded, their choices or minimum (:data:`MINIMUMS`); each is validated when it
is built, with a one-line ``ValueError`` naming the field. :class:`motg_fast.config.Config`
holds the parts of one job.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from .kernels import LIKELIHOODS, MixtureSpec
from .kernels.spec import METHODS, check_choice
from .models import DEFAULT_MODEL
from .tasks.prompting import DEFAULT_SYSTEM_PROMPT
from .tasks.rewards import RewardWeights
from .training.grpo import ADVANTAGE_SCALINGS, AGGREGATIONS

_REWARD = RewardWeights()  # the reward's defaults, said once
DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")
FINAL_EVALS = ("before_after", "after", "none")
OLD_LOGPROBS = ("auto", "rollout", "forward")


def _f(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with its CLI help text."""
    if isinstance(default, (list, dict, tuple)):
        value = default
        return field(default_factory=lambda: value, metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


# The smallest value of each bounded field (integers unless the field is a float).
MINIMUMS: dict[str, int] = {
    **dict.fromkeys(("max_new_tokens", "max_prompt_tokens", "eval_samples", "steps", "mu"), 1),
    **dict.fromkeys(("eval_questions", "eval_batch_size", "prompts_per_step", "grad_accum"), 1),
    **dict.fromkeys(("log_every",), 1),
    **dict.fromkeys(("weight_decay", "beta", "eps_low", "eps_high", "eval_every"), 0),
    **dict.fromkeys(("save_every", "keep_checkpoints", "rollout_batch_prompts", "token_budget"), 0),
    "dataset_size": 2,
    "group_size": 2,
}


def _check_fields(part: Any) -> None:
    """Choices of every field, then the bounds of :data:`MINIMUMS`."""
    for f in dataclasses.fields(part):
        value = getattr(part, f.name)
        if "choices" in f.metadata:
            check_choice(f.name, value, tuple(f.metadata["choices"]))
        low = MINIMUMS.get(f.name)
        if low is not None:
            integer = f.type in ("int", int)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low
            if not ok or (integer and not isinstance(value, int)):
                kind = "an integer" if integer else "a number"
                raise ValueError(f"{f.name} must be {kind} >= {low}, got {value!r}")


@dataclass
class ModelConfig:
    """Which model, in which dtype, on which device."""

    model: str = _f(
        DEFAULT_MODEL,
        "model: the embedded default, a local dir/checkpoint, or a cached Hugging Face id",
    )
    dtype: str = _f(
        "auto",
        "weights dtype (auto: bf16 on CUDA and fp32 on CPU for evaluation; training keeps "
        "fp32 weights and runs under bf16 autocast on CUDA)",
        choices=DTYPES,
    )
    device: str = _f("auto", "device: auto (CUDA if present), cpu, cuda, cuda:1, ...")
    attn_implementation: str | None = _f(
        None, "attention (default: flash_attention_2 on CUDA when installed, else sdpa)"
    )

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass
class TaskConfig:
    """The tasks, their split, the prompt and the reward."""

    tasks: str = _f(
        "basic_arithmetic",
        "Reasoning Gym tasks and data files with optional weights, e.g. 'acre:2,syllogism', "
        "'basic_arithmetic,data/mine.jsonl:2', or a preset name: 'paper' (its ten tasks)",
    )
    task_options: str = _f(
        '{"*": {"difficulty": 0}}',
        'JSON of per-task dataset options, e.g. \'{"leg_counting": {"max_animals": 3}}\'; '
        '"*" applies to every Reasoning Gym task; "difficulty" is a curriculum level (0 = '
        "easiest); a data file takes question, answer, verifier and split",
    )
    dataset_size: int = _f(10_000, "items generated per task (train + held out)")
    heldout_fraction: float = _f(
        0.01, "fraction of each task's items held out for evaluation (a file's own test part wins)"
    )
    seed: int = _f(42, "seed of the datasets, of prompt sampling and of decoding")
    system_prompt: str = _f(
        DEFAULT_SYSTEM_PROMPT,
        "system prompt asking for <think>/<answer> (the default shows three worked examples of "
        "the default task: give other tasks a prompt of their own)",
    )
    max_prompt_tokens: int = _f(512, "prompt length limit (longer questions are cut in the middle)")
    reward_correctness: float = _f(
        _REWARD.correctness, "weight of the answer's score in the reward"
    )
    reward_think: float = _f(
        _REWARD.think,
        "reward for closing </think> exactly once (a run can collect it with no answer)",
    )
    reward_format: float = _f(
        _REWARD.format,
        "reward for exactly one <answer>…</answer> ending the text (kept below a correct "
        "answer's, so format alone never pays most)",
    )
    reward_partial_credit: bool = _f(
        _REWARD.partial_credit, "use the verifier's partial scores (else only 1/0)"
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        from .tasks.spec import check_tasks

        check_tasks(self.tasks, self.task_options)

    def reward_weights(self):
        """The :class:`~motg_fast.tasks.rewards.RewardWeights` of this part."""
        from .tasks.rewards import RewardWeights

        return RewardWeights(
            correctness=self.reward_correctness,
            think=self.reward_think,
            format=self.reward_format,
            partial_credit=self.reward_partial_credit,
        )


def _with_spec_fields(after: str, **defaults: Any):
    """Class decorator (applied before ``@dataclass``): insert every :class:`MixtureSpec`
    field, with its type and help, after the field ``after``; ``defaults`` override the
    spec's defaults."""

    def add(cls):
        hints = typing.get_type_hints(MixtureSpec)
        annotations = {}
        for name, annotation in cls.__annotations__.items():
            annotations[name] = annotation
            if name != after:
                continue
            for f in dataclasses.fields(MixtureSpec):
                annotations[f.name] = hints[f.name]
                default = defaults.get(f.name, f.default)
                setattr(cls, f.name, field(default=default, metadata=f.metadata))
        cls.__annotations__ = annotations
        return cls

    return add


@dataclass
@_with_spec_fields(after="method", k=2, temperature=0.9)
class DecodingConfig:
    """How a thinking step samples (the `MixtureSpec` fields) and how long completions run."""

    method: str | None = _f(
        None,
        "a published method, setting the spec fields, the likelihood and its training settings "
        f"before explicit flags: {', '.join(METHODS)}",
        choices=(None, *METHODS),
    )
    max_new_tokens: int = _f(32, "completion length limit (the default task needs few)")
    compile_decode: bool = _f(
        False,
        "decode with one torch.compile(fullgraph) step over a static cache (CUDA graphs on "
        "CUDA; untested on a GPU, off until measured there; not for Dirichlet weights)",
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        spec = self.spec  # the spec checks its own fields
        if self.compile_decode:
            from .kernels.step_op import check_compilable

            check_compilable(spec)

    @property
    def spec(self) -> MixtureSpec:
        """The :class:`MixtureSpec` of a thinking step."""
        return MixtureSpec.from_mapping(self)


@dataclass
class EvalConfig:
    """Held-out evaluation: how many questions and samples, how they are batched and kept."""

    eval_samples: int = _f(4, "sampled completions per question (pass@k uses all of them)")
    eval_questions: int = _f(64, "held-out questions per task (at most the held-out count)")
    eval_batch_size: int = _f(
        16, "questions per generation batch (rows: questions x samples; bounds the memory)"
    )
    eval_save_completions: bool = _f(
        True, "store the text of every completion in the evaluation JSON (scores always are)"
    )
    progress: bool = _f(True, "show progress bars")

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass
class TrainingConfig:
    """GRPO: groups, optimisation, the likelihood and the loss."""

    group_size: int = _f(8, "G: trajectories per prompt")
    prompts_per_step: int = _f(4, "prompts per step (per process)")
    grad_accum: int = _f(
        4, "micro-batches per optimizer step (more: less activation memory, same gradient)"
    )
    rollout_batch_prompts: int = _f(
        0, "prompts per generation call (0: all of a step's prompts at once)"
    )
    steps: int = _f(10, "training steps (the default job fits 10 minutes on 2 CPU cores)")
    lr: float = _f(2e-5, "AdamW learning rate")
    betas: list[float] = _f((0.9, 0.99), "AdamW betas (two numbers)")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    grad_clip: float = _f(1.0, "gradient-norm clip")
    warmup_ratio: float = _f(0.0, "fraction of updates with linear warm-up (then constant)")
    beta: float = _f(0.0, "KL weight β to the frozen reference (0: no reference model)")
    eps_low: float = _f(0.2, "clip ε_low of the ratio")
    eps_high: float = _f(0.2, "clip ε_high of the ratio")
    clip_per_slot: bool = _f(
        False,
        "clip each slot's ratio on its own and sum the slots' surrogates (Multiplex Thinking's "
        "loss; selection=iid with fixed weights and token, likelihood=exact)",
    )
    mu: int = _f(1, "optimisation passes per rollout batch")
    old_logprobs: str = _f(
        "auto",
        "old log-likelihoods with mu = 1: from the rollout (no extra forward), from a no-grad "
        "training forward (the loss's own arithmetic), or auto (forward under bf16/fp16 "
        "autocast, rollout otherwise)",
        choices=OLD_LOGPROBS,
    )
    likelihood: str = _f("exact", "log-likelihood of a mixture action", choices=LIKELIHOODS)
    aggregation: str = _f("grpo", "loss aggregation", choices=AGGREGATIONS)
    advantage_scaling: str = _f("group", "advantage std scaling", choices=ADVANTAGE_SCALINGS)
    eval_every: int = _f(0, "held-out evaluation every N steps (0: never)")
    gradient_checkpointing: bool = _f(
        True, "recompute each layer's activations in backward (less memory, more compute)"
    )
    share_prompt: bool = _f(
        True,
        "training forward: run each distinct prompt once and its G completions on copies of "
        "its KV cache (same outputs, G× less prompt compute; off with gradient checkpointing)",
    )
    deterministic: bool = _f(
        True,
        "bit-identical mixture-embedding gradients on CUDA (sorted segment sums, no atomics)",
    )

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # a list from the command line or a file
        _check_fields(self)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")


@dataclass
class RunConfig:
    """Where a run writes, how it checkpoints, resumes, evaluates around training and logs."""

    run_dir: str = _f("runs/motg", "directory of the run's config, metrics and checkpoints")
    resume: bool = _f(False, "resume from the latest checkpoint in run_dir")
    overwrite: bool = _f(
        False, "start over in a run_dir that holds a previous run (deletes its outputs)"
    )
    save_every: int = _f(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept (older ones are deleted; 0 keeps all)")
    final_eval: str = _f(
        "before_after",
        "held-out evaluation around training: before_after (the base model first, then the "
        "trained policy, with the gain's 95-percent interval), after (only the trained "
        "policy), or none",
        choices=FINAL_EVALS,
    )
    token_budget: int = _f(
        0,
        "stop once the rollouts have generated this many tokens in all (0: no limit; steps "
        "stays the cap); python -m motg_fast.compare matches arms with it",
    )
    log_every: int = _f(1, "without the progress bar, print a metrics line every N steps")
    report_to: str = _f(
        "none", "metrics trackers of accelerate, comma-separated: tensorboard, wandb, ... (none)"
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: choose one")


PARTS: dict[str, type] = {
    "model": ModelConfig,
    "task": TaskConfig,
    "decoding": DecodingConfig,
    "evaluation": EvalConfig,
    "training": TrainingConfig,
    "run": RunConfig,
}
"""Every part, by attribute name on :class:`Config`, in command-line order."""

FIELD_PART: dict[str, str] = {
    f.name: part for part, cls in PARTS.items() for f in dataclasses.fields(cls)
}
"""The part of every field."""
