"""motg_fast kernels: mixture-of-token generation ops with a PyTorch reference twin each.

Standalone (imports only torch and triton): copy this folder into any codebase.

    from motg_fast.kernels import MixtureSpec, mixture_step, mixture_embed, mixture_logprobs
    spec = MixtureSpec(k=2, temperature=0.9, selection="sample", weighting="dirichlet")
    step = mixture_step(logits, embedding, spec, generator=gen)
    ell = action_logprob(step.logprobs, step.mask, step.token_slot, spec, likelihood="exact",
                         weight_logits=step.weight_logits, rest_logprob=step.rest_logprob)

Every op picks its path with `backend=None|"reference"|"triton"` or, globally, the
environment variable `MOTG_BACKEND`.
"""

from ._backend import BACKENDS, HAS_TRITON, resolve_backend, triton_interpreter_on
from ._philox import StepNoise, philox_step_noise, philox_step_seed
from .likelihood import (
    action_logprob,
    concrete_log_density,
    dirichlet_log_density,
    plackett_luce_logprob,
)
from .mixture_embed import mixture_embed, mixture_embed_ref
from .mixture_logprobs import (
    mixture_logprobs,
    mixture_logprobs_entropy_ref,
    mixture_logprobs_ref,
    mixture_logprobs_rest_ref,
)
from .mixture_math import (
    gumbel_noise,
    log_weights_from_logits,
    ordering_keys,
    renormalised_logprobs,
    token_slot,
    weights_from_logits,
)
from .mixture_step import MixtureStep, mixture_step, mixture_step_ref, mixture_step_triton
from .spec import LIKELIHOODS, REPRESENTATIVES, SELECTIONS, WEIGHTINGS, MixtureSpec

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "LIKELIHOODS",
    "REPRESENTATIVES",
    "SELECTIONS",
    "WEIGHTINGS",
    "MixtureSpec",
    "MixtureStep",
    "StepNoise",
    "action_logprob",
    "concrete_log_density",
    "dirichlet_log_density",
    "gumbel_noise",
    "log_weights_from_logits",
    "mixture_embed",
    "mixture_embed_ref",
    "mixture_logprobs",
    "mixture_logprobs_entropy_ref",
    "mixture_logprobs_ref",
    "mixture_logprobs_rest_ref",
    "mixture_step",
    "mixture_step_ref",
    "mixture_step_triton",
    "ordering_keys",
    "philox_step_noise",
    "philox_step_seed",
    "plackett_luce_logprob",
    "renormalised_logprobs",
    "resolve_backend",
    "token_slot",
    "triton_interpreter_on",
    "weights_from_logits",
]
