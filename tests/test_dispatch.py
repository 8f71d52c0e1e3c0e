"""Which path each op takes: `backend=`, then `MOTG_BACKEND`, then Triton for CUDA tensors
and the reference elsewhere; every path gives the reference's result."""

import importlib

import pytest
import torch

from motg_fast.kernels import (
    MixtureSpec,
    mixture_embed,
    mixture_embed_ref,
    mixture_logprobs,
    mixture_logprobs_ref,
    mixture_step,
    mixture_step_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPEC = MixtureSpec(k=2, temperature=0.7, selection="topk", weighting="prob")


def _inputs():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(37, 50, generator=gen).to(DEVICE)
    hidden = torch.randn(4, 50, generator=gen).to(DEVICE)
    ids = torch.randint(0, 37, (4, 2), generator=gen).to(DEVICE)
    weights = torch.softmax(torch.randn(4, 2, generator=gen), -1).to(DEVICE)
    return table, hidden, ids, weights


def _embed(backend):
    table, _, ids, weights = _inputs()
    return mixture_embed(table, ids, weights, backend=backend), mixture_embed_ref(
        table, ids, weights
    )


def _logprobs(backend):
    table, hidden, ids, _ = _inputs()
    got = mixture_logprobs(hidden, table, ids, temperature=0.7, backend=backend)
    return torch.cat([got[0], got[1][:, None]], 1), torch.cat(
        [t if t.dim() == 2 else t[:, None] for t in mixture_logprobs_ref(hidden, table, ids, 0.7)],
        1,
    )


def _step(backend):
    table, hidden, _, _ = _inputs()
    logits = hidden @ table.t()
    got = mixture_step(logits, table, SPEC, backend=backend)
    want = mixture_step_ref(logits, table, SPEC)
    return torch.cat([got.weights, got.embeds], 1), torch.cat([want.weights, want.embeds], 1)


# op -> (module, public launcher its Triton path calls, run(backend) -> (got, reference))
OPS = {
    "mixture_embed": ("mixture_embed", "launch_embed_forward", _embed),
    "mixture_logprobs": ("mixture_logprobs", "launch_logprobs_forward", _logprobs),
    "mixture_step": ("mixture_step", "mixture_step_triton", _step),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(
    "backend, env, expected",
    [
        (None, None, "auto"),
        ("triton", None, "triton"),
        ("reference", None, "reference"),
        (None, "triton", "triton"),
        (None, "reference", "reference"),
        ("reference", "triton", "reference"),
    ],
)
def test_dispatch_branches(monkeypatch, op, backend, env, expected):
    if env is None:
        monkeypatch.delenv("MOTG_BACKEND", raising=False)
    else:
        monkeypatch.setenv("MOTG_BACKEND", env)
    module_name, launcher, run = OPS[op]
    module = importlib.import_module(f"motg_fast.kernels.{module_name}")
    calls, original = [], getattr(module, launcher)
    monkeypatch.setattr(module, launcher, lambda *a, **k: calls.append(1) or original(*a, **k))
    got, want = run(backend)
    if expected == "auto":  # Triton on CUDA, the reference on a CPU
        expected = "triton" if DEVICE == "cuda" else "reference"
    assert len(calls) == (1 if expected == "triton" else 0)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
