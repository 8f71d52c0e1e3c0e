"""The Triton rollout step as a torch custom op, `motg_fast::mixture_step`, for compiled decoding.

`torch.compile(fullgraph=True)` cannot trace the launchers of `mixture_step_triton` (host
Python: launch plans, grids, a Philox seed drawn from a generator). Registered as a custom
op with a fake (shape-only) implementation, the step is one node of the compiled graph:
the compiler neither breaks the graph there nor looks inside, and CUDA graphs capture the
op's kernel launches with the rest of the step. The op takes every random stream as given
noise (a captured graph cannot draw from a `torch.Generator`); a spec whose weights need
the generator (`dirichlet`) or a stream left out is refused with a one-line error.

`mixture_step_compilable` is the step a compiled decode calls: the op where the Triton path
runs (CUDA tensors, or CPU tensors under Triton's interpreter with `backend="triton"`) and
supports the spec, else `mixture_step_ref`, which the compiler traces and fuses itself.
"""

import ast
import dataclasses
import functools

import torch

from ._backend import resolve_backend
from ._philox import StepNoise
from .mixture_step import MixtureStep, mixture_step_ref, mixture_step_triton, triton_unsupported
from .spec import RANDOM_SELECTIONS, MixtureSpec

OP_NAME = "motg_fast::mixture_step"


def spec_key(spec: MixtureSpec) -> str:
    """The spec as the op's string argument: the repr of its field values in order (equal
    specs, equal strings; plain Python that the compiler traces)."""
    values = (getattr(spec, field.name) for field in dataclasses.fields(spec))
    # a float subclass (numpy's float64) would repr as a call literal_eval cannot read
    return repr(tuple(float(v) if isinstance(v, float) else v for v in values))


@functools.lru_cache(maxsize=64)
def spec_from_key(key: str) -> MixtureSpec:
    """The spec whose `spec_key` is `key`."""
    return MixtureSpec(**dict(zip(MixtureSpec.field_names(), ast.literal_eval(key))))


def noise_streams(spec: MixtureSpec) -> tuple[str, ...]:
    """The `StepNoise` fields a step of `spec` reads, in draw order: its Gumbel streams
    (Dirichlet's Gamma draws are not among them: see `check_compilable`)."""
    streams = ("selection",) if spec.selection in RANDOM_SELECTIONS else ()
    streams += ("weight",) if spec.weighting == "gumbel" else ()
    return streams + (("token",) if spec.representative == "sample" else ())


def missing_noise(spec: MixtureSpec, noise: StepNoise) -> str | None:
    """The random stream of `spec` that `noise` does not give (None when all are given)."""
    return next((name for name in noise_streams(spec) if getattr(noise, name) is None), None)


@torch.library.custom_op(OP_NAME, mutates_args=())
def _mixture_step_op(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    spec: str,
    selection_noise: torch.Tensor | None,
    weight_noise: torch.Tensor | None,
    token_noise: torch.Tensor | None,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """`MixtureStep`'s fields in order; `rest_logprob` `[0]` when the spec needs none."""
    noise = StepNoise(selection_noise, weight_noise, token_noise)
    step = mixture_step_triton(logits, embedding, spec_from_key(spec), noise=noise)
    rest = step.rest_logprob
    if rest is None:
        rest = torch.empty(0, dtype=torch.float32, device=logits.device)
    return (*step[:-1], rest)


@_mixture_step_op.register_fake
def _mixture_step_fake(logits, embedding, spec, selection_noise, weight_noise, token_noise):
    """Outputs' shapes and dtypes (`MixtureStep`) without running the step."""
    parsed = spec_from_key(spec)
    rows, k, width = logits.shape[0], parsed.k, embedding.shape[1]

    def new(*shape, dtype=torch.float32):
        return logits.new_empty(shape, dtype=dtype)

    long, flag = torch.int64, torch.bool
    rest = new(rows if parsed.needs_rest else 0)
    embeds = embedding.new_empty((rows, width))
    return (
        new(rows, k, dtype=long),  # ids
        new(rows, k),  # weights
        new(rows, k, dtype=flag),  # mask
        new(rows, dtype=long),  # token
        new(rows, k),  # logprobs
        new(rows),  # logsumexp
        new(rows),  # entropy
        embeds,
        new(rows, dtype=long),  # token_slot
        new(rows, k),  # weight_logits
        rest,
    )


def check_compilable(spec: MixtureSpec, noise: StepNoise | None = None) -> None:
    """One-line error for a step a captured graph cannot run (`noise` None: the spec only)."""
    if spec.weighting == "dirichlet":
        raise ValueError(
            "a compiled step cannot draw weighting='dirichlet' (its Gamma draws depend on "
            "the step's probabilities, so they cannot be drawn before it); decode eagerly"
        )
    stream = None if noise is None else missing_noise(spec, noise)
    if stream is not None:
        raise ValueError(f"a compiled step needs its {stream} noise given (StepNoise.{stream})")


def uses_step_op(spec: MixtureSpec, device: torch.device, backend: str | None = None) -> bool:
    """Whether `mixture_step_compilable` runs the Triton op (else the reference)."""
    path = resolve_backend("mixture_step", backend, device)
    return path == "triton" and triton_unsupported(spec) is None


def mixture_step_compilable(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    spec: MixtureSpec,
    noise: StepNoise,
    backend: str | None = None,
) -> MixtureStep:
    """`mixture_step` for a compiled graph: logits `[B,V]`, embedding `[V,H]`, every random
    stream of `spec` in `noise` (`selection_noise_shape`, `[B,k]`); no host sync, no draw.
    `backend` as `mixture_step`'s (None: the op on CUDA, the reference elsewhere)."""
    check_compilable(spec, noise)
    if not uses_step_op(spec, logits.device, backend):
        return mixture_step_ref(logits, embedding, spec, noise=noise)
    outputs = _mixture_step_op(
        logits, embedding, spec_key(spec), noise.selection, noise.weight, noise.token
    )
    rest = outputs[-1] if spec.needs_rest else None
    return MixtureStep(*outputs[:-1], rest)


__all__ = [
    "OP_NAME",
    "check_compilable",
    "mixture_step_compilable",
    "missing_noise",
    "noise_streams",
    "spec_from_key",
    "spec_key",
    "uses_step_op",
]
