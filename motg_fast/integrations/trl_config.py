"""`MixtureGRPOConfig` (TRL's `GRPOConfig` plus the mixture of a thinking step) and the
checks of the options `MixtureGRPOTrainer` cannot honour (see `motg_fast.integrations.trl`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from transformers import ProcessorMixin
from trl import GRPOConfig

from ..kernels import LIKELIHOODS, MixtureSpec
from ..tasks.prompting import THINK_END, THINK_START

_SPEC_PREFIX = "mixture_"
_SHARED_SPEC_FIELDS = ("temperature",)  # GRPOConfig's own field is τ


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def _with_mixture_fields(**defaults: Any):
    """Class decorator (before `@dataclass`): add a `mixture_<name>` field for every
    `MixtureSpec` field but τ, with the spec's type, help and choices; `defaults` override
    the spec's defaults."""

    def add(cls):
        hints = typing.get_type_hints(MixtureSpec)
        annotations = dict(cls.__annotations__)
        for f in dataclasses.fields(MixtureSpec):
            if f.name in _SHARED_SPEC_FIELDS:
                continue
            name = _SPEC_PREFIX + f.name
            annotations[name] = hints[f.name]
            default = defaults.get(f.name, f.default)
            setattr(cls, name, field(default=default, metadata=dict(f.metadata)))
        cls.__annotations__ = annotations
        return cls

    return add


@dataclass
@_with_mixture_fields(k=2)
class MixtureGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus the mixture of a thinking step.

    Added fields: `mixture_k`, `mixture_selection`, `mixture_weighting`, `mixture_top_p`,
    `mixture_min_p`, `mixture_concentration`, `mixture_gumbel_temperature`,
    `mixture_representative` (the `MixtureSpec` fields; τ is `temperature`),
    `mixture_likelihood`, `think_start`, `think_end`. Defaults: k = 2, top-k selection,
    probability weights, the exact likelihood (as `python -m motg_fast.train`).
    """

    mixture_likelihood: str = field(
        default="exact",
        metadata={"help": "log-likelihood of a mixture action", "choices": LIKELIHOODS},
    )
    think_start: str | None = field(
        default=THINK_START,
        metadata={"help": "appended to every prompt not ending with it (None: leave prompts)"},
    )
    think_end: str | None = field(
        default=THINK_END,
        metadata={"help": "ends the thinking phase (None: mixtures for the whole completion)"},
    )

    def __post_init__(self):
        super().__post_init__()
        check_trainable(self.mixture_spec, self.mixture_likelihood)

    @property
    def mixture_spec(self) -> MixtureSpec:
        """The `MixtureSpec` of a thinking step (τ = `temperature`)."""
        return MixtureSpec(
            temperature=self.temperature,
            **{
                name: getattr(self, _SPEC_PREFIX + name)
                for name in MixtureSpec.field_names()
                if name not in _SHARED_SPEC_FIELDS
            },
        )

    @classmethod
    def from_spec(cls, spec: MixtureSpec, **fields: Any) -> MixtureGRPOConfig:
        """A config whose mixture (and `temperature`) is `spec`; `fields` are the others."""
        clash = sorted(set(fields) & {"temperature", *spec_field_names()})
        if clash:
            raise ValueError(f"from_spec takes the mixture from the spec; remove {clash}")
        mixture = {_SPEC_PREFIX + k: v for k, v in spec.to_dict().items() if k != "temperature"}
        return cls(temperature=spec.temperature, **mixture, **fields)


def spec_field_names() -> tuple[str, ...]:
    """The `MixtureGRPOConfig` fields that hold `MixtureSpec` fields (τ aside)."""
    return tuple(
        _SPEC_PREFIX + name for name in MixtureSpec.field_names() if name not in _SHARED_SPEC_FIELDS
    )


# Spec fields whose methods need more than the stored actions in TRL's batch, with why.
_UNSUPPORTED_SPEC_FIELDS = {
    "noise_std": "Gaussian soft tokens need the rollout's noise seeds and embedding rows "
    "in the batch",
    "cold_stop_entropy": "cold stop writes end-of-thinking tokens that TRL's loss would score",
}


def check_trainable(spec: MixtureSpec, likelihood: str) -> None:
    """One-line errors for a likelihood the spec does not define, for greedy decoding, and
    for spec options the TRL integration does not carry yet."""
    spec.check_likelihood(likelihood)
    for f in dataclasses.fields(spec):
        if f.name in _UNSUPPORTED_SPEC_FIELDS and getattr(spec, f.name) != f.default:
            raise ValueError(
                f"{_SPEC_PREFIX}{f.name} is not supported by MixtureGRPOTrainer yet: "
                f"{_UNSUPPORTED_SPEC_FIELDS[f.name]}"
            )
    if spec.is_deterministic:
        raise ValueError(
            "mixture_selection=topk, mixture_weighting=prob with a deterministic token (k=1 or "
            "representative=argmax) is greedy decoding: every completion of a group is the "
            "same; use a sampled selection, a random weighting or a sampled representative"
        )


def mixture_settings(args: GRPOConfig) -> tuple[MixtureSpec, str, str | None, str | None]:
    """`(spec, likelihood, think_start, think_end)` of `args`; a plain `GRPOConfig` gets
    `MixtureGRPOConfig`'s defaults with its own `temperature`."""
    if isinstance(args, MixtureGRPOConfig):
        return args.mixture_spec, args.mixture_likelihood, args.think_start, args.think_end
    defaults = {f.name: f.default for f in dataclasses.fields(MixtureGRPOConfig)}
    spec = MixtureSpec(
        temperature=args.temperature,
        **{name[len(_SPEC_PREFIX) :]: defaults[name] for name in spec_field_names()},
    )
    likelihood = defaults["mixture_likelihood"]
    check_trainable(spec, likelihood)
    return spec, likelihood, defaults["think_start"], defaults["think_end"]


# --------------------------------------------------------------------------------------
# Refused options
# --------------------------------------------------------------------------------------

_ENGINE = "completions come from motg_fast's RolloutEngine (mixture inputs)"
_WHOLE_WEIGHTS = "the mixture forward reads the whole embedding and LM-head weights"


def unsupported_option(args: GRPOConfig, call: dict[str, Any]) -> str | None:
    """The first option `MixtureGRPOTrainer` cannot honour, as a one-line reason (None: all
    supported). `call` holds the trainer's other constructor arguments by name."""
    plugin = getattr(args, "deepspeed_plugin", None)
    checks = (
        (args.use_vllm, f"use_vllm=True is not supported: {_ENGINE}, not vLLM"),
        (
            args.use_transformers_continuous_batching,
            f"use_transformers_continuous_batching=True is not supported: {_ENGINE}",
        ),
        (args.generation_kwargs, f"generation_kwargs are not supported: {_ENGINE}"),
        (args.cache_implementation, f"cache_implementation is not supported: {_ENGINE}"),
        (args.top_p != 1.0, _sampling_reason("top_p")),
        (args.top_k not in (0, None), _sampling_reason("top_k")),
        (args.min_p not in (0.0, None), _sampling_reason("min_p")),
        (args.repetition_penalty != 1.0, _sampling_reason("repetition_penalty")),
        (
            args.max_completion_length is None,
            "max_completion_length=None is not supported: the rollout needs a length limit",
        ),
        (
            args.use_liger_kernel,
            "use_liger_kernel=True is not supported: the mixture forward is untested with "
            "Liger's patched modules",
        ),
        (
            args.cast_lm_head_to_fp32,
            "cast_lm_head_to_fp32=True is not supported: mixture_logprobs reads the LM head "
            "weight in the autocast dtype",
        ),
        (bool(args.fsdp), f"FSDP is not supported: {_WHOLE_WEIGHTS}"),
        (
            plugin is not None and getattr(plugin, "zero_stage", 0) == 3,
            f"DeepSpeed ZeRO-3 is not supported: {_WHOLE_WEIGHTS}",
        ),
        (call.get("tools"), "tools are not supported: the rollout is single-turn"),
        (
            call.get("environment_factory"),
            "environment_factory is not supported: the rollout is single-turn",
        ),
        (call.get("rollout_func"), f"rollout_func is not supported: {_ENGINE}"),
        (
            isinstance(call.get("processing_class"), ProcessorMixin),
            "vision-language models (a ProcessorMixin processing_class) are not supported",
        ),
    )
    return next((reason for failed, reason in checks if failed), None)


def _sampling_reason(name: str) -> str:
    return (
        f"{name} is not supported: the rollout samples the full distribution at "
        "`temperature` (filter the mixture slots with mixture_top_p / mixture_min_p)"
    )
