"""`MixtureSpec`: every sampling setting of one MoT-G thinking step, in one validated object.

    spec = MixtureSpec(k=2, temperature=0.9, selection="sample", weighting="dirichlet")
    step = mixture_step(logits, embedding, spec, generator=gen)
    ell = action_logprob(step.logprobs, step.weights, step.mask, slot, spec, likelihood="exact")

The fields are the math of `mixture_step.py` (selection S, weights w, representative y):
- `k` candidate slots (k = 1: ordinary decoding; `topk` greedy, `sample` multinomial);
- `temperature` τ of `p = softmax(z/τ)`;
- `selection`: `topk` (the k largest logits), `sample` (Gumbel-top-k, k draws from p
  without replacement), `iid` (k independent draws from p, duplicates allowed: Multiplex
  Thinking) or `sample_topk` (slot 0 is one draw y ~ p, slots 1…k−1 the k−1 most probable
  other tokens: Mixture of Inputs);
- `weighting`: `prob` (p renormalised over the slots, p̃), `dirichlet` (Dir(c·p̃), c =
  `concentration`), `gumbel` (softmax((log p̃ + g)/λ), λ = `gumbel_temperature`, the
  noise g optionally clamped to [`gumbel_noise_min`, `gumbel_noise_max`] as SofT-GRPO
  does), `uniform` (1/m over the m valid slots; a token drawn twice counts twice) or
  `blend` (Mixture of Inputs: `H_n (q + β e_0)/(1 + β) + (1 − H_n) e_0`, slot 0 the
  sampled token, q the probabilities over the slots at `blend_temperature`, H_n their
  entropy over log m, β = `blend_beta` the weight of the observed token);
- `top_p`, `min_p`: filters on the k slots of a thinking step (a slot stays while the mass
  of the slots before it is below `top_p`, the mass under the full distribution or, with
  `top_p_mass="slots"`, renormalised over the k slots; `p_j ≥ min_p · max p`); they
  filter *mixture slots*, so they need k ≥ 2, and the discrete answer phase of a run
  samples from the full distribution (`answer_spec`);
- `representative`: `sample` (y ~ Cat(w)), `argmax` (the heaviest slot) or `first` (slot 0);
- `noise_std`: σ of Gaussian noise added to the mixture embedding of a thinking step,
  `x = Σ_j w_j E[S_j] + σ ε`, ε ~ N(0, I_H) from a counter-based seed (Soft Tokens, Hard
  Truths; needs `weighting="prob"`; 0 = off);
- `cold_stop_entropy`, `cold_stop_steps`: end the thinking phase once the step's entropy
  stays below the threshold for that many consecutive steps (Soft Thinking's Cold Stop;
  the engine then writes the end-of-thinking marker; None = off).

A spec is frozen and checked once, on creation, with one-line errors; the ops trust it.
Imports nothing but the standard library (the kernels folder stays torch + triton only).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

SELECTIONS = ("topk", "sample", "iid", "sample_topk")
WEIGHTINGS = ("prob", "dirichlet", "gumbel", "uniform", "blend")
REPRESENTATIVES = ("sample", "argmax", "first")
LIKELIHOODS = ("token", "weighted", "exact", "clamped_gumbel")
TOP_P_MASSES = ("vocab", "slots")
RANDOM_SELECTIONS = ("sample", "iid", "sample_topk")  # S is drawn, not fixed by the logits
RANDOM_WEIGHTINGS = ("dirichlet", "gumbel")  # w is drawn given S


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(name: str, value: float) -> None:
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_probability(name: str, value: float | None, *, allow_zero: bool) -> None:
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    low_ok = number and (value >= 0 if allow_zero else value > 0)
    if not (low_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def check_k(k: int, vocab_size: float = math.inf) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > vocab_size:
        raise ValueError(f"k={k} exceeds the vocabulary size {vocab_size}")


def _field(default: Any, help: str, **metadata: Any) -> Any:
    """A field with its command-line help (and choices) in its metadata."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class MixtureSpec:
    """How one thinking step samples its mixture action (see the module docstring)."""

    k: int = _field(1, "tokens mixed per thinking step (1 = ordinary decoding)")
    temperature: float = _field(1.0, "sampling temperature τ")
    selection: str = _field("topk", "candidate selection", choices=SELECTIONS)
    weighting: str = _field("prob", "mixture weights", choices=WEIGHTINGS)
    top_p: float | None = _field(None, "nucleus filter on the k mixture slots (needs k >= 2)")
    top_p_mass: str = _field(
        "vocab",
        "top_p's mass: under the full distribution or renormalised over the k slots",
        choices=TOP_P_MASSES,
    )
    min_p: float | None = _field(None, "min-p filter on the k mixture slots (needs k >= 2)")
    concentration: float = _field(1.0, "Dirichlet concentration c (weighting=dirichlet)")
    gumbel_temperature: float = _field(1.0, "Gumbel-softmax temperature λ (weighting=gumbel)")
    gumbel_noise_min: float | None = _field(
        None, "clamp the Gumbel weight noise from below (SofT-GRPO: -1.5; none: off)"
    )
    gumbel_noise_max: float | None = _field(
        None, "clamp the Gumbel weight noise from above (SofT-GRPO: 3; none: off)"
    )
    representative: str = _field(
        "sample",
        "representative token: sample from w, argmax of w, or first (slot 0)",
        choices=REPRESENTATIVES,
    )
    blend_beta: float = _field(
        1.0, "Mixture of Inputs' β, the weight of the observed token (weighting=blend)"
    )
    blend_temperature: float | None = _field(
        None, "temperature of Mixture of Inputs' prior over the slots (none: the step's τ)"
    )
    noise_std: float = _field(
        0.0, "σ of Gaussian noise on the thinking-step input embedding (0: off)"
    )
    cold_stop_entropy: float | None = _field(
        None, "end thinking once the step entropy stays below this (none: off)"
    )
    cold_stop_steps: int = _field(4, "consecutive low-entropy steps that end thinking")

    def __post_init__(self) -> None:
        check_k(self.k)
        check_positive("temperature", self.temperature)
        check_choice("selection", self.selection, SELECTIONS)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("representative", self.representative, REPRESENTATIVES)
        check_choice("top_p_mass", self.top_p_mass, TOP_P_MASSES)
        check_probability("top_p", self.top_p, allow_zero=False)
        check_probability("min_p", self.min_p, allow_zero=True)
        check_positive("concentration", self.concentration)
        check_positive("gumbel_temperature", self.gumbel_temperature)
        check_positive("blend_beta", self.blend_beta)
        if self.blend_temperature is not None:
            check_positive("blend_temperature", self.blend_temperature)
        self._check_gumbel_clamp()
        if not (
            _is_number(self.noise_std) and math.isfinite(self.noise_std) and self.noise_std >= 0
        ):
            raise ValueError(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")
        if self.noise_std > 0 and self.weighting != "prob":
            raise ValueError(
                "noise_std > 0 (Gaussian soft tokens) needs weighting='prob': the noise is "
                f"added around the probability-weighted embedding, got {self.weighting!r}"
            )
        if self.weighting == "blend" and self.representative == "sample":
            raise ValueError(
                "weighting='blend' (Mixture of Inputs) feeds back slot 0, the sampled token: "
                "use representative='first' (or 'argmax')"
            )
        if self.cold_stop_entropy is not None:
            check_positive("cold_stop_entropy", self.cold_stop_entropy)
        check_k(self.cold_stop_steps)
        if self.k == 1 and self.has_filters:
            raise ValueError(
                "top_p and min_p filter the k mixture slots of a thinking step; with k=1 there "
                "is one slot and they would do nothing: use k >= 2 or leave them unset"
            )

    def _check_gumbel_clamp(self) -> None:
        bounds = (self.gumbel_noise_min, self.gumbel_noise_max)
        for name, value in zip(("gumbel_noise_min", "gumbel_noise_max"), bounds):
            if value is not None and not (_is_number(value) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number or none, got {value!r}")
        if None not in bounds and bounds[0] >= bounds[1]:
            raise ValueError(f"gumbel_noise_min must be below gumbel_noise_max, got {bounds}")
        if bounds != (None, None) and self.weighting != "gumbel":
            raise ValueError("gumbel_noise_min/max clamp the noise of weighting='gumbel' only")

    # ---- derived properties -----------------------------------------------------------

    @property
    def gumbel_clamp(self) -> tuple[float, float] | None:
        """`(low, high)` bounds of the Gumbel weight noise (±inf where unset); None: off."""
        if self.gumbel_noise_min is None and self.gumbel_noise_max is None:
            return None
        low = -math.inf if self.gumbel_noise_min is None else float(self.gumbel_noise_min)
        high = math.inf if self.gumbel_noise_max is None else float(self.gumbel_noise_max)
        return low, high

    @property
    def blend_prior_scale(self) -> float:
        """τ / τ_prior: turns log-probs at τ into the blend prior's temperature."""
        prior = self.temperature if self.blend_temperature is None else self.blend_temperature
        return float(self.temperature) / float(prior)

    @property
    def needs_rest(self) -> bool:
        """Whether the exact likelihood needs the probability mass outside the ids
        (Plackett–Luce of `sample` with k ≥ 2): `mixture_logprobs(..., return_rest=True)`."""
        return self.selection == "sample" and self.k > 1

    @property
    def is_discrete(self) -> bool:
        """k = 1: ordinary decoding (`topk` greedy, `sample` multinomial)."""
        return self.k == 1

    @property
    def is_deterministic(self) -> bool:
        """No random draw at all: `topk`, deterministic weights, a deterministic token (k = 1,
        argmax or first) and no Gaussian noise."""
        fixed_token = self.k == 1 or self.representative != "sample"
        return self._fixed_mixture and fixed_token

    @property
    def _fixed_mixture(self) -> bool:
        """S and w are functions of the logits (no draw, no noise)."""
        return (
            self.selection == "topk"
            and self.weighting not in RANDOM_WEIGHTINGS
            and self.noise_std == 0
        )

    @property
    def needs_noise(self) -> bool:
        """Whether a step draws random numbers (and so advances the generator): a sampled
        selection, random weights or a sampled token; the outcome may still be fixed (k = 1)."""
        return (
            self.selection in RANDOM_SELECTIONS
            or self.weighting in RANDOM_WEIGHTINGS
            or self.representative == "sample"
        )

    @property
    def has_filters(self) -> bool:
        """Whether `top_p` or a non-zero `min_p` can mask slots."""
        return self.top_p is not None or bool(self.min_p)

    @property
    def likelihoods(self) -> tuple[str, ...]:
        """The `action_logprob` likelihoods defined for actions of this spec.

        `exact` needs a random part (`topk` + `prob` with an argmax token has none) and a
        density (clamped Gumbel noise has none); `clamped_gumbel`, SofT-GRPO's proxy, needs
        `weighting="gumbel"`.
        """
        names = ["token", "weighted"]
        fixed = self._fixed_mixture and self.representative != "sample"
        if not fixed and self.gumbel_clamp is None:
            names.append("exact")
        if self.weighting == "gumbel":
            names.append("clamped_gumbel")
        return tuple(names)

    def check_likelihood(self, likelihood: str) -> None:
        """Raise a one-line error when `likelihood` is unknown or undefined for this spec."""
        check_choice("likelihood", likelihood, LIKELIHOODS)
        if likelihood in self.likelihoods:
            return
        if likelihood == "clamped_gumbel":
            raise ValueError(
                "likelihood='clamped_gumbel' (SofT-GRPO's proxy) scores Gumbel weight noise: "
                f"it needs weighting='gumbel', got {self.weighting!r}"
            )
        if self.gumbel_clamp is not None:
            raise ValueError(
                "likelihood='exact' is undefined with clamped Gumbel noise (the weights then "
                "have no density): unset gumbel_noise_min/max, or use "
                "likelihood='clamped_gumbel' (SofT-GRPO's proxy)"
            )
        raise ValueError(
            f"likelihood='exact' is undefined for selection='{self.selection}', "
            f"weighting='{self.weighting}' and representative='{self.representative}': "
            "the action is a deterministic function of the logits. Use a random "
            "selection, weighting or representative, or likelihood='token'/'weighted'."
        )

    def answer_spec(self) -> MixtureSpec:
        """The spec of a discrete answer-phase step of a mixture run: one token sampled from
        the full distribution at the same τ (k = 1 runs keep their own spec throughout)."""
        if self.is_discrete:
            return self
        return MixtureSpec(
            k=1, temperature=self.temperature, selection="sample", representative="argmax"
        )

    # ---- construction and (de)serialisation -------------------------------------------

    @classmethod
    def preset(cls, method: str) -> MixtureSpec:
        """The spec of a published method (`METHODS`: discrete, soft_thinking, …)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
        return METHODS[method].spec

    def replace(self, **changes: Any) -> MixtureSpec:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of the spec's fields, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Any) -> MixtureSpec:
        """The spec made of the spec-named keys (or attributes) of `values`; others ignored."""
        get = values.get if isinstance(values, dict) else lambda n, d: getattr(values, n, d)
        missing = object()
        found = {name: get(name, missing) for name in cls.field_names()}
        return cls(**{name: v for name, v in found.items() if v is not missing})


@dataclass(frozen=True)
class Method:
    """A published mixture-of-tokens method: the spec values its authors ran, the likelihood
    we train it with, and training settings of its own (docs/methods.md cites each value)."""

    fields: dict  # MixtureSpec fields (the rest keep their defaults)
    likelihood: str
    source: str  # the paper
    training: dict = dataclasses.field(default_factory=dict)  # trainer settings it implies

    @property
    def spec(self) -> MixtureSpec:
        return MixtureSpec(**self.fields)


METHODS: dict[str, Method] = {
    "discrete": Method(
        dict(k=1, temperature=0.9, selection="sample"),
        "token",
        "standard GRPO (one token), the baseline of Jain & Rappazzo (arXiv 2509.21482)",
    ),
    "soft_thinking": Method(
        dict(
            k=10,
            temperature=0.6,
            selection="topk",
            weighting="prob",
            top_p=0.95,
            min_p=0.001,
            representative="argmax",
            cold_stop_entropy=0.01,
            cold_stop_steps=256,
        ),
        "token",  # deterministic thinking steps: no exact likelihood exists
        "Soft Thinking (Zhang et al., arXiv 2505.15778)",
    ),
    "paper_dirichlet": Method(
        dict(k=2, temperature=0.9, selection="topk", weighting="dirichlet", concentration=1.0),
        "exact",
        "MoT-G, Dirichlet (Jain & Rappazzo, arXiv 2509.21482)",
    ),
    "paper_different_tokens": Method(
        dict(k=2, temperature=0.9, selection="sample", weighting="prob"),
        "exact",
        "MoT-G, different tokens (Jain & Rappazzo, arXiv 2509.21482)",
    ),
    "softgrpo": Method(
        dict(
            k=5,
            temperature=1.0,
            selection="topk",
            weighting="gumbel",
            gumbel_temperature=0.1,
            gumbel_noise_min=-1.5,
            gumbel_noise_max=3.0,
            top_p=0.95,
            top_p_mass="slots",
            representative="argmax",
        ),
        "clamped_gumbel",  # its own proxy: clamped noise has no density
        "SofT-GRPO (Zheng & Lee, arXiv 2511.06411)",
    ),
    "multiplex": Method(
        dict(k=3, temperature=1.0, selection="iid", weighting="prob", representative="first"),
        "exact",
        "Multiplex Thinking (Tang et al., arXiv 2601.08808)",
        training=dict(clip_per_slot=True),
    ),
    "moi": Method(
        dict(
            k=20,
            temperature=0.6,
            selection="sample_topk",
            weighting="blend",
            blend_beta=1.0,
            blend_temperature=1.0,
            representative="first",
        ),
        "exact",
        "Mixture of Inputs (Zhuang et al., arXiv 2505.14827)",
    ),
    "soft_tokens": Method(
        dict(
            k=64,
            temperature=0.5,
            selection="topk",
            weighting="prob",
            noise_std=0.05,
            representative="argmax",
        ),
        "exact",
        "Soft Tokens, Hard Truths (Butt et al., arXiv 2509.19170)",
    ),
}
"""`--method NAME`: each sets the spec fields above, the likelihood and its training settings
before explicit flags. docs/methods.md gives each value's source and every difference."""


def spec_from_keywords(op: str, spec: MixtureSpec | None, legacy: dict) -> MixtureSpec:
    """The spec of a call: `spec`, or one built from the deprecated keyword form
    (`op(..., k=2, selection=...)`, kept for one release with a `DeprecationWarning`)."""
    if not legacy:
        if spec is None:
            raise TypeError(f"{op}() needs a MixtureSpec: {op}(..., MixtureSpec(k=2, ...))")
        return spec
    unknown = sorted(set(legacy) - set(MixtureSpec.field_names()))
    if unknown:
        raise TypeError(f"{op}() got unexpected keyword argument(s) {unknown}")
    if spec is not None:
        raise TypeError(
            f"{op}() takes a MixtureSpec or the old keywords, not both: {sorted(legacy)}"
        )
    warnings.warn(
        f"{op}(..., k=..., selection=..., ...) is deprecated and will be removed in the next "
        f"release; pass a MixtureSpec: {op}(..., MixtureSpec(k=..., selection=...))",
        DeprecationWarning,
        stacklevel=3,
    )
    return MixtureSpec(**legacy)
