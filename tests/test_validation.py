"""Bad input fails with a clear error naming the problem; backend choice."""

import pytest
import torch

from motg_fast.kernels import (
    MixtureSpec,
    StepNoise,
    mixture_embed,
    mixture_logprobs,
    mixture_step,
    resolve_backend,
)

SPEC_FIELDS = MixtureSpec.field_names()
NOISE_STREAMS = {f"{name}_noise": name for name in StepNoise._fields}


def _step(**kw):
    """`mixture_step` of a small batch: spec fields, `<stream>_noise` and call options."""
    logits = kw.pop("logits", torch.randn(2, 10))
    embedding = kw.pop("embedding", torch.randn(10, 4))
    kw.setdefault("k", 2)
    spec = MixtureSpec(**{name: kw.pop(name) for name in SPEC_FIELDS if name in kw})
    noise = StepNoise(
        **{NOISE_STREAMS[name]: kw.pop(name) for name in list(kw) if name in NOISE_STREAMS}
    )
    return mixture_step(logits, embedding, spec, noise=noise, **kw)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": 11}, "exceeds the vocabulary size 10"),
        ({"k": 2.0}, "k must be an integer"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"temperature": -1.0}, "temperature must be"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"concentration": 0.0}, "concentration must be"),
        ({"gumbel_temperature": -0.5}, "gumbel_temperature must be"),
        ({"selection": "nucleus"}, "unknown selection 'nucleus'"),
        ({"weighting": "average"}, "unknown weighting 'average'"),
        ({"representative": "last"}, "unknown representative"),
        ({"top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
        ({"min_p": 1.5}, r"min_p must lie in \[0, 1\]"),
        ({"embedding": torch.randn(9, 4)}, "embedding has 9 rows but logits have 10"),
        ({"logits": torch.randn(10)}, "logits must be 2-D"),
        ({"logits": torch.ones(2, 10, dtype=torch.long)}, "logits must be a floating-point"),
        ({"embedding": torch.randn(10, 4, device="meta")}, "must share one device"),
        ({"selection_noise": torch.randn(2, 9)}, r"selection noise must have shape \(2, 10\)"),
        (
            {"weight_noise": torch.randn(2, 3), "weighting": "gumbel"},
            "weight noise must have shape",
        ),
        ({"backend": "cuda"}, "unknown backend 'cuda'"),
    ],
)
def test_step_argument_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _step(**kwargs)


@pytest.mark.parametrize(
    ("value", "message"),
    [(float("nan"), "NaN in rows \\[1\\]"), (float("inf"), "\\+inf in rows \\[1\\]")],
)
def test_nan_and_posinf_rows_are_errors(value, message):
    logits = torch.randn(3, 10)
    logits[1, 4] = value
    with pytest.raises(ValueError, match=message):
        _step(logits=logits)


def test_fully_masked_row_is_an_error_partially_masked_is_fine():
    logits = torch.randn(3, 10)
    logits[2] = float("-inf")
    with pytest.raises(ValueError, match="rows \\[2\\] have no finite entry"):
        _step(logits=logits)
    logits[2, 3] = 0.0
    step = _step(logits=logits, k=3)
    assert step.ids[2, 0] == 3 and step.mask[2].tolist() == [True, False, False]


def test_dirichlet_rejects_explicit_noise():
    with pytest.raises(ValueError, match="weight noise applies to weighting='gumbel' only"):
        _step(weighting="dirichlet", weight_noise=torch.randn(2, 2))


def test_embed_and_logprobs_argument_errors():
    e = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        mixture_embed(e, torch.tensor([[0, 10]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="must share one shape"):
        mixture_embed(e, torch.tensor([[0, 1]]), torch.ones(1, 3))
    with pytest.raises(TypeError, match="ids must be an int32 or int64"):
        mixture_embed(e, torch.tensor([[0.0, 1.0]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="hidden size 5 does not match"):
        mixture_logprobs(torch.randn(3, 5), e, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="leading shape of hidden"):
        mixture_logprobs(torch.randn(3, 4), e, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be"):
        mixture_logprobs(torch.randn(3, 4), e, torch.zeros(3, 2, dtype=torch.long), temperature=0)


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("op", None, cpu) == "reference"
    assert resolve_backend("op", "reference", cpu) == "reference"
    assert resolve_backend("op", None, cpu, auto_cpu="chunked") == "chunked"  # mixture_logprobs
    monkeypatch.setenv("MOTG_BACKEND", "reference")
    assert resolve_backend("op", None, torch.device("cuda")) == "reference"
    assert resolve_backend("op", None, cpu, auto_cpu="chunked") == "reference"
    monkeypatch.setenv("MOTG_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown MOTG_BACKEND 'fast'"):
        resolve_backend("op", None, cpu)
    monkeypatch.delenv("MOTG_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("op", "triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("op", "triton", cpu) == "triton"
