"""The one run configuration of motg_fast: model, tasks, decoding, evaluation and training.

Every command line (``python -m motg_fast.evaluate``, the trainer's) is generated from
:class:`Config` by :func:`motg_fast.cli.parse_config` (transformers' ``HfArgumentParser``): one
``--flag`` per field with the field's type, default and help text. ``--config FILE`` (YAML or
JSON) and ``--preset NAME`` (one of :data:`PRESETS`) apply before the explicit flags. Every run
writes its resolved config (:meth:`Config.save`).

The sampling settings of a thinking step are the fields of
:class:`~motg_fast.kernels.MixtureSpec`, added to :class:`Config` from the spec itself (flat, so
the flags are ``--k``, ``--temperature``, …); :attr:`Config.spec` builds the spec. A new spec
field is a new flag, a saved value and a check with no change here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .grpo import ADVANTAGE_SCALINGS, AGGREGATIONS
from .kernels import LIKELIHOODS, MixtureSpec
from .kernels.spec import METHODS
from .models import DEFAULT_MODEL
from .prompting import ARITHMETIC_SYSTEM_PROMPT, SYSTEM_PROMPT

DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")


def _f(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with its CLI help text."""
    if isinstance(default, (list, dict, tuple)):
        value = default
        return field(default_factory=lambda: value, metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


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
@_with_spec_fields(after="system_prompt", k=2, temperature=0.9)
class Config:
    """All options of a run. Defaults: the embedded SmolLM2-135M on easy ``basic_arithmetic``."""

    # --- model -------------------------------------------------------------------------
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

    # --- tasks -------------------------------------------------------------------------
    tasks: str = _f(
        "basic_arithmetic",
        "Reasoning Gym tasks with optional weights, e.g. "
        "'acre:2,syllogism', or a preset name: 'paper' (its ten tasks)",
    )
    task_options: str = _f(
        '{"*": {"difficulty": 0}}',
        "JSON of per-task dataset options, e.g. "
        '\'{"leg_counting": {"max_animals": 3}}\'; "*" applies to every task; '
        '"difficulty" is a curriculum level (0 = easiest)',
    )
    dataset_size: int = _f(10_000, "items generated per task (train + held out)")
    heldout_fraction: float = _f(0.01, "fraction of each task's items held out for evaluation")
    seed: int = _f(42, "seed of the datasets, of prompt sampling and of decoding")
    system_prompt: str = _f(
        ARITHMETIC_SYSTEM_PROMPT,
        "system prompt asking for <think>/<answer> (the default shows three worked examples of "
        "the default task: give other tasks a prompt of their own)",
    )

    # --- decoding: the MixtureSpec fields (k = 2, τ = 0.9, ...) are inserted here --------
    method: str | None = _f(
        None,
        "a published method, setting the spec fields and the likelihood before explicit "
        f"flags: {', '.join(METHODS)}",
    )
    max_prompt_tokens: int = _f(512, "prompt length limit (longer questions are cut in the middle)")
    max_new_tokens: int = _f(32, "completion length limit (the default task needs few)")

    # --- evaluation --------------------------------------------------------------------
    eval_samples: int = _f(4, "sampled completions per question (pass@k uses all of them)")
    eval_questions: int = _f(64, "held-out questions per task (at most the held-out count)")
    eval_batch_size: int = _f(64, "questions per generation batch")
    eval_output: str | None = _f(None, "evaluation JSON path (default: <run_dir>/eval.json)")
    eval_save_completions: bool = _f(
        True, "store the text of every completion in the evaluation JSON (scores always are)"
    )

    # --- training ----------------------------------------------------------------------
    group_size: int = _f(8, "G: trajectories per prompt")
    prompts_per_step: int = _f(4, "prompts per step (per process)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    rollout_batch_prompts: int = _f(
        0, "prompts per generation call (0: all of a step's prompts at once)"
    )
    steps: int = _f(10, "training steps (the default job fits 10 minutes on 2 CPU cores)")
    token_budget: int = _f(
        0,
        "stop once the rollouts have generated this many tokens in all (0: no limit; "
        "steps stays the cap); python -m motg_fast.compare matches arms with it",
    )
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
        choices=("auto", "rollout", "forward"),
    )
    likelihood: str = _f("exact", "log-likelihood of a mixture action", choices=LIKELIHOODS)
    aggregation: str = _f("grpo", "loss aggregation", choices=AGGREGATIONS)
    advantage_scaling: str = _f("group", "advantage std scaling", choices=ADVANTAGE_SCALINGS)
    reward_correctness: float = _f(2.0, "weight of the answer's score in the reward")
    reward_think: float = _f(
        0.0, "reward for closing </think> exactly once (a run can collect it with no answer)"
    )
    reward_format: float = _f(
        0.25,
        "reward for exactly one <answer>…</answer> ending the text (kept below a correct "
        "answer's, so format alone never pays most)",
    )
    reward_partial_credit: bool = _f(True, "use Reasoning Gym's partial scores (else only 1/0)")
    run_dir: str = _f("runs/motg", "directory of the run's config, metrics and checkpoints")
    save_every: int = _f(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept (older ones are deleted; 0 keeps all)")
    eval_every: int = _f(0, "held-out evaluation every N steps (0: never)")
    final_eval: str = _f(
        "before_after",
        "held-out evaluation around training: before_after (the base model first, then the "
        "trained policy, with the gain's 95-percent interval), after (only the trained "
        "policy), or none",
        choices=("before_after", "after", "none"),
    )
    resume: bool = _f(False, "resume from the latest checkpoint in run_dir")
    overwrite: bool = _f(
        False, "start over in a run_dir that holds a previous run (deletes its outputs)"
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (saves memory)")
    share_prompt: bool = _f(
        True,
        "training forward: run each distinct prompt once and its G completions on copies of "
        "its KV cache (same outputs, G× less prompt compute; off with gradient checkpointing)",
    )
    deterministic: bool = _f(
        True,
        "bit-identical mixture-embedding gradients on CUDA (sorted segment sums, no atomics)",
    )
    log_every: int = _f(1, "without the progress bar, print a metrics line every N steps")
    progress: bool = _f(True, "show progress bars")
    report_to: str = _f(
        "none", "metrics trackers of accelerate, comma-separated: tensorboard, wandb, ... (none)"
    )

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # a list from the command line or a file

    # ------------------------------------------------------------------ validation
    def validate(self, *, training: bool = True) -> Config:
        """Check every field; raise ``ValueError`` naming the first bad one. Returns ``self``.

        ``training=False`` skips the checks that only matter to the trainer.
        """
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name}={value!r} is not one of {', '.join(choices)}")
        _positive_ints(
            self,
            "dataset_size",
            "max_prompt_tokens",
            "max_new_tokens",
            "eval_samples",
            "eval_questions",
            "eval_batch_size",
            "group_size",
            "prompts_per_step",
            "grad_accum",
            "steps",
            "mu",
            "log_every",
        )
        _non_negative_ints(
            self,
            "save_every",
            "eval_every",
            "keep_checkpoints",
            "rollout_batch_prompts",
            "token_budget",
        )
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.dataset_size < 2:
            raise ValueError(f"dataset_size must be >= 2, got {self.dataset_size}")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; methods: {', '.join(METHODS)}")
        MixtureSpec.from_mapping(self)  # the spec checks its own fields
        from .tasks import check_tasks  # local: reasoning_gym loads only when needed

        check_tasks(self.tasks, self.task_options)
        if training:
            self._validate_training()
        return self

    def _validate_training(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("weight_decay", "beta", "eps_low", "eps_high"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2 for GRPO, got {self.group_size}: advantages compare "
                "the trajectories of one prompt, so a group of one never learns"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: choose one")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.spec.is_deterministic and self.spec.is_discrete:
            raise ValueError(
                "k=1 with selection=topk is greedy decoding: there is nothing to learn from "
                "(and no exact likelihood); use selection=sample"
            )
        self.spec.check_likelihood(self.likelihood)
        if self.clip_per_slot:
            _check_per_slot(self.spec, self.likelihood)

    # ------------------------------------------------------------------ helpers
    def reward_weights(self):
        """The :class:`~motg_fast.rewards.RewardWeights` of this config."""
        from .rewards import RewardWeights

        return RewardWeights(
            correctness=self.reward_correctness,
            think=self.reward_think,
            format=self.reward_format,
            partial_credit=self.reward_partial_credit,
        )

    def experiment_changes(self, saved: dict[str, Any]) -> list[str]:
        """Fields whose value differs from a saved config's and that alter the experiment
        (anything outside :data:`RESUMABLE_CHANGES`); a resume refuses them."""
        current = self.to_dict()
        return sorted(
            name
            for name, value in saved.items()
            if name in current and name not in RESUMABLE_CHANGES and current[name] != value
        )

    @property
    def spec(self) -> MixtureSpec:
        """The :class:`MixtureSpec` of this config's thinking steps (validated on creation)."""
        return MixtureSpec.from_mapping(self)

    def eval_output_path(self) -> Path:
        """Where evaluation writes its JSON."""
        return Path(self.eval_output) if self.eval_output else Path(self.run_dir) / "eval.json"

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (names checked)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out

    def to_json(self) -> str:
        """The config as indented JSON."""
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        """Write the config JSON to ``path`` (a directory gets ``config.json``)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json() + "\n")
        os.replace(tmp, path)  # atomic: a kill never leaves half a config
        return path

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """A config from a dict such as :meth:`to_dict` gives (unknown keys are an error)."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a config file: YAML or JSON (a directory means its ``config.json``)."""
        return cls.from_dict(read_config_file(path))


def _yaml_loader():
    """PyYAML's safe loader, reading ``1e-5`` as a float (YAML 1.2, JSON) and not a string."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    number = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", number, list("-+0123456789."))
    return Loader


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON config file (a directory: its ``config.json``)."""
    import yaml

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        values = yaml.load(path.read_text(), Loader=_yaml_loader())  # noqa: S506 - safe loader
    except OSError:
        raise ValueError(f"config file {str(path)!r} cannot be read") from None
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"config file {str(path)!r} is not valid YAML or JSON: {reason}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value")
    return values


# Fields a resumed run may change: its length, evaluation and checkpoint cadence, outputs,
# progress display, device placement and memory knobs (micro-batches, activation
# checkpointing, attention kernel, gradient summation order) — none changes what is trained or
# how it is sampled.
RESUMABLE_CHANGES = frozenset(
    {
        "steps",
        "token_budget",
        "eval_every",
        "final_eval",
        "eval_questions",
        "eval_samples",
        "eval_batch_size",
        "eval_output",
        "eval_save_completions",
        "save_every",
        "keep_checkpoints",
        "resume",
        "overwrite",
        "progress",
        "log_every",
        "report_to",
        "run_dir",
        "device",
        "attn_implementation",
        "grad_accum",
        "gradient_checkpointing",
        "deterministic",
        "share_prompt",
    }
)


def _positive_ints(config: Config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _non_negative_ints(config: Config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


_PAPER: dict[str, Any] = dict(
    model="Qwen/Qwen2.5-1.5B-Instruct",
    tasks="paper",
    task_options="",
    dataset_size=10_000,
    heldout_fraction=0.01,
    seed=42,
    k=2,
    temperature=0.9,
    selection="sample",
    weighting="prob",
    representative="sample",
    likelihood="weighted",
    max_prompt_tokens=1024,
    max_new_tokens=1024,
    group_size=10,
    prompts_per_step=1,
    grad_accum=4,
    steps=1000,
    lr=5e-6,
    betas=(0.9, 0.99),
    weight_decay=0.1,
    grad_clip=0.1,
    warmup_ratio=0.18,
    beta=0.1,
    mu=1,
    reward_correctness=2.0,
    reward_think=0.5,
    reward_format=0.5,
    reward_partial_credit=True,
    eval_questions=100,
    eval_samples=4,
    eval_every=50,
    save_every=200,
    run_dir="runs/paper",
    system_prompt=SYSTEM_PROMPT,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's runs. The paper trained one task per run: add --tasks NAME.
    "paper": _PAPER,
    # "MoT-G with G = 5 matches standard GRPO with G = 10".
    "paper_g5": {**_PAPER, "group_size": 5, "run_dir": "runs/paper_g5"},
    # The standard-decoding GRPO baseline of the paper's comparisons.
    "paper_discrete": {**_PAPER, "k": 1, "likelihood": "token", "run_dir": "runs/paper_discrete"},
    # A seconds-long check of the whole pipeline on a CPU.
    "smoke": dict(
        max_new_tokens=32,
        eval_questions=2,
        eval_samples=2,
        group_size=2,
        prompts_per_step=1,
        steps=2,
        run_dir="runs/smoke",
    ),
}
"""Named sets of field values, applied before explicit flags."""


def _check_per_slot(spec, likelihood: str) -> None:
    """clip_per_slot needs a likelihood that is a sum of slot terms: independent draws
    (`iid`) with weights and token fixed by them, scored `exact`."""
    fixed = spec.weighting in ("prob", "uniform") and spec.representative != "sample"
    if spec.selection != "iid" or not fixed or likelihood != "exact" or spec.noise_std > 0:
        raise ValueError(
            "clip_per_slot clips each slot's ratio, which needs a likelihood that is a sum of "
            "slot terms: selection=iid, weighting=prob or uniform, representative=first or "
            "argmax, noise_std=0 and likelihood=exact"
        )


def method_values(name: str) -> dict[str, Any]:
    """The config values of `--method NAME`: its spec fields, likelihood, training settings
    and name."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    method = METHODS[name]
    return {**method.fields, "likelihood": method.likelihood, **method.training, "method": name}


def preset(name: str) -> dict[str, Any]:
    """The values of preset ``name`` (``ValueError`` listing the presets if unknown)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])
