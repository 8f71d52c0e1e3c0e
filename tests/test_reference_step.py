"""The PyTorch reference of the rollout step against the math of its module docstring."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from motg_fast.kernels import (
    SELECTIONS,
    WEIGHTINGS,
    MixtureSpec,
    StepNoise,
    gumbel_noise,
    mixture_step,
    ordering_keys,
    plackett_luce_logprob,
    token_slot,
)
from motg_fast.kernels.mixture_math import (
    mixture_weight_logits,
    select_candidates,
    slot_mask,
    weights_from_logits,
)

MODES = list(itertools.product(SELECTIONS, WEIGHTINGS))


def _rep(weighting: str) -> str:
    """The representative of a mode: Mixture of Inputs' `blend` feeds back slot 0."""
    return "first" if weighting == "blend" else "sample"


def _batch(rows=6, vocab=37, hidden=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 2).to(dtype)
    embedding = torch.randn(vocab, hidden, generator=g).to(dtype)
    return logits, embedding


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_k1_topk_is_greedy(weighting, generator):
    logits, embedding = _batch()
    step = mixture_step(
        logits,
        embedding,
        MixtureSpec(k=1, weighting=weighting, representative=_rep(weighting)),
        generator=generator,
    )
    assert torch.equal(step.ids[:, 0], logits.argmax(-1))
    assert torch.equal(step.token, logits.argmax(-1))
    assert torch.equal(step.weights, torch.ones(6, 1))
    assert torch.equal(step.embeds, embedding[logits.argmax(-1)])


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_k1_sample_is_gumbel_max_from_full_softmax(weighting, temperature, generator):
    logits, embedding = _batch()
    noise = gumbel_noise((6, 37), device=logits.device, generator=generator)
    spec = MixtureSpec(
        k=1,
        temperature=temperature,
        selection="sample",
        weighting=weighting,
        representative=_rep(weighting),
    )
    step = mixture_step(
        logits, embedding, spec, noise=StepNoise(selection=noise), generator=generator
    )
    expected = (logits / temperature + noise).argmax(-1)
    assert torch.equal(step.token, expected)
    assert torch.equal(step.embeds, embedding[expected])
    assert torch.equal(step.weights, torch.ones(6, 1))


def test_k1_sample_frequencies_follow_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    embedding = torch.eye(4)
    g = torch.Generator().manual_seed(7)
    draws = 20000
    counts = torch.zeros(4)
    spec = MixtureSpec(k=1, temperature=0.8, selection="sample")
    step = mixture_step(logits.expand(draws, 4), embedding, spec, generator=g)
    counts += torch.bincount(step.token, minlength=4)
    expected = torch.softmax(logits[0] / 0.8, -1)
    assert torch.allclose(counts / draws, expected, atol=0.012)


@pytest.mark.parametrize(("selection", "weighting"), MODES)
@pytest.mark.parametrize("filters", [{}, {"top_p": 0.6}, {"min_p": 0.3}])
def test_weights_form_a_distribution_and_embeds_are_the_weighted_sum(
    selection, weighting, filters, generator
):
    logits, embedding = _batch(rows=16, vocab=41, hidden=7)
    logits[3, 5:] = float("-inf")  # a masked vocabulary with fewer finite entries than k
    spec = MixtureSpec(
        k=6,
        selection=selection,
        weighting=weighting,
        temperature=0.9,
        representative=_rep(weighting),
        **filters,
    )
    step = mixture_step(logits, embedding, spec, generator=generator)
    assert step.ids.shape == step.weights.shape == step.mask.shape == (16, 6)
    assert (step.weights >= 0).all()
    assert torch.equal(step.weights[~step.mask], torch.zeros_like(step.weights[~step.mask]))
    assert torch.allclose(step.weights.sum(-1), torch.ones(16), atol=1e-6)
    assert step.mask[:, 0].all()
    if selection != "iid":  # iid draws may repeat the 5 finite entries of row 3
        assert not step.mask[3, 5:].any()  # only 5 finite entries in row 3
    explicit = (step.weights.unsqueeze(-1) * embedding[step.ids]).sum(1)
    assert torch.allclose(step.embeds, explicit, atol=1e-6)
    slots = token_slot(step.ids, step.token)
    assert step.mask.gather(-1, slots.unsqueeze(-1)).all()  # y is a valid slot
    assert step.mask.gather(-1, step.token_slot.unsqueeze(-1)).all()  # the drawn slot too
    assert torch.equal(step.ids.gather(-1, step.token_slot.unsqueeze(-1))[:, 0], step.token)
    for row in step.ids if selection != "iid" else []:  # ids are distinct (iid may repeat)
        assert len(set(row.tolist())) == 6


def test_logprobs_logsumexp_entropy_match_log_softmax():
    logits, embedding = _batch(vocab=53)
    logits[1, ::3] = float("-inf")
    step = mixture_step(logits, embedding, MixtureSpec(k=4, temperature=0.7))
    log_p = torch.log_softmax(logits / 0.7, -1)
    assert torch.allclose(step.logprobs, log_p.gather(-1, step.ids), atol=1e-6)
    assert torch.allclose(step.logsumexp, torch.logsumexp(logits / 0.7, -1), atol=1e-6)
    p = log_p.exp()
    entropy = -(p * log_p.nan_to_num(neginf=0.0)).sum(-1)
    assert torch.allclose(step.entropy, entropy, atol=1e-5)
    assert torch.isfinite(step.entropy).all()


def test_topk_ties_break_towards_lower_ids():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -0.0, 1.0]])
    step = mixture_step(logits, torch.eye(7), MixtureSpec(k=5))
    assert step.ids.tolist() == [[1, 3, 4, 2, 6]]
    zeros = torch.tensor([[-0.0, 0.0, -0.0]])
    assert select_candidates(zeros, 3).tolist() == [[0, 1, 2]]


def test_ordering_keys_follow_float_order():
    values = torch.tensor([[-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")]])
    keys = ordering_keys(values)
    # keys grow with the score; equal scores (−0.0, 0.0) rank the lower id higher
    assert keys[0, 0] < keys[0, 1] < keys[0, 2] < keys[0, 4] < keys[0, 3] < keys[0, 5]
    assert keys[0, 5] < keys[0, 6] < keys[0, 7]


def test_bf16_and_fp16_logits_give_float32_outputs(generator):
    for dtype in (torch.bfloat16, torch.float16):
        logits, embedding = _batch(dtype=dtype)
        spec = MixtureSpec(k=3, weighting="gumbel")
        step = mixture_step(logits, embedding, spec, generator=generator)
        assert step.weights.dtype == step.logprobs.dtype == torch.float32
        assert step.embeds.dtype == dtype
        ref = torch.log_softmax(logits.float(), -1).gather(-1, step.ids)
        assert torch.allclose(step.logprobs, ref, atol=1e-5)


def test_noncontiguous_logits_rows():
    logits, embedding = _batch(rows=4, vocab=30)
    wide = torch.zeros(4, 64)
    wide[:, :30] = logits
    step = mixture_step(wide[:, :30], embedding, MixtureSpec(k=3))
    assert torch.equal(step.ids, mixture_step(logits, embedding, MixtureSpec(k=3)).ids)


def test_top_p_keeps_smallest_prefix_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    for top_p, kept in [(0.4, 1), (0.49, 1), (0.79, 2), (0.81, 3), (1.0, 4)]:
        step = mixture_step(logits, torch.eye(4), MixtureSpec(k=4, top_p=top_p))
        assert step.mask.sum().item() == kept, top_p
        assert step.mask[0, :kept].all()


def test_min_p_filters_relative_to_the_max_probability():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    for min_p, mask in [
        (0.7, [True, False, False, False]),
        (0.31, [True, True, False, False]),
        (0.29, [True, True, True, False]),
        (0.0, [True, True, True, True]),
    ]:
        step = mixture_step(probs.log(), torch.eye(4), MixtureSpec(k=4, min_p=min_p))
        assert step.mask.tolist() == [mask], min_p


def test_slot_zero_is_never_filtered():
    logp = torch.tensor([[-5.0, -0.1]])
    mask = slot_mask(logp, torch.tensor([-0.1]), min_p=0.9)
    assert mask.tolist() == [[True, True]]


def _all_ordered_subsets_pl(log_p, k):
    subsets = list(itertools.permutations(range(log_p.numel()), k))
    ids = torch.tensor(subsets)
    outside = torch.ones(len(subsets), log_p.numel(), dtype=torch.bool).scatter(1, ids, False)
    rest = log_p.expand(len(subsets), -1).masked_fill(~outside, float("-inf")).logsumexp(-1)
    pl = plackett_luce_logprob(log_p[ids].double(), rest).exp()
    return subsets, pl


@pytest.mark.parametrize("k", [1, 2, 3])
def test_plackett_luce_sums_to_one_over_ordered_subsets(k):
    log_p = torch.log_softmax(torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0], dtype=torch.float64), -1)
    _, pl = _all_ordered_subsets_pl(log_p, k)
    assert abs(pl.sum().item() - 1.0) < 1e-9


def test_sample_selection_frequencies_match_plackett_luce():
    logits = torch.tensor([[1.0, -0.5, 0.3, 0.8]])
    temperature, k, draws = 1.3, 2, 30000
    g = torch.Generator().manual_seed(11)
    spec = MixtureSpec(k=k, temperature=temperature, selection="sample")
    step = mixture_step(logits.expand(draws, 4), torch.eye(4), spec, generator=g)
    subsets, pl = _all_ordered_subsets_pl(torch.log_softmax(logits[0] / temperature, -1), k)
    index = {s: i for i, s in enumerate(subsets)}
    counts = torch.zeros(len(subsets), dtype=torch.float64)
    for row in step.ids.tolist():
        counts[index[tuple(row)]] += 1
    freq = counts / draws
    # 4.5 standard errors per cell: a wrong sampler is far outside, a right one inside
    stderr = (pl * (1 - pl) / draws).sqrt()
    assert ((freq - pl).abs() <= 4.5 * stderr + 1e-4).all(), (freq, pl)


def test_representative_token_frequencies_follow_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = 20000
    g = torch.Generator().manual_seed(5)
    step = mixture_step(logits.expand(draws, 4), torch.eye(4), MixtureSpec(k=3), generator=g)
    freq = torch.bincount(token_slot(step.ids, step.token), minlength=3).double() / draws
    assert torch.allclose(freq, step.weights[0].double(), atol=0.012)


def test_argmax_representative_picks_heaviest_slot(generator):
    logits, embedding = _batch(rows=32)
    spec = MixtureSpec(k=3, weighting="dirichlet", representative="argmax")
    step = mixture_step(logits, embedding, spec, generator=generator)
    assert torch.equal(token_slot(step.ids, step.token), step.weights.argmax(-1))


def mixture_weights(log_p, mask, weighting, **options):
    """The weights `softmax(ω)` of `mixture_weight_logits`."""
    return weights_from_logits(mixture_weight_logits(log_p, mask, weighting, **options), mask)


def test_dirichlet_weights_have_the_beta_moments():
    log_p = torch.tensor([[-0.2, -1.5]]).expand(40000, 2)
    mask = torch.ones(40000, 2, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    c = 2.5
    w = mixture_weights(log_p, mask, "dirichlet", concentration=c, generator=g)[:, 0].double()
    p0 = torch.softmax(log_p[0], -1)[0].item()
    a, b = c * p0, c * (1 - p0)
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert abs(w.mean().item() - mean) < 4 * math.sqrt(var / 40000)
    assert abs(w.var().item() - var) < 0.05 * var


def test_dirichlet_tiny_concentration_never_degenerates():
    log_p = torch.log_softmax(torch.randn(2000, 8), -1)
    mask = torch.ones(2000, 8, dtype=torch.bool)
    w = mixture_weights(log_p, mask, "dirichlet", concentration=1e-3)
    assert torch.isfinite(w).all()
    assert torch.allclose(w.sum(-1), torch.ones(2000), atol=1e-6)


def test_gumbel_weights_argmax_follows_p_tilde():
    # Gumbel-softmax: argmax of w is Gumbel-max of log p̃, whatever the temperature
    log_p = torch.tensor([[-0.4, -1.3, -2.0]]).expand(30000, 3)
    mask = torch.ones(30000, 3, dtype=torch.bool)
    g = torch.Generator().manual_seed(9)
    w = mixture_weights(log_p, mask, "gumbel", gumbel_temperature=0.5, generator=g)
    freq = torch.bincount(w.argmax(-1), minlength=3).double() / 30000
    assert torch.allclose(freq, torch.softmax(log_p[0].double(), -1), atol=0.01)


def test_generator_makes_steps_reproducible():
    logits, embedding = _batch(rows=8)
    spec = MixtureSpec(k=3, selection="sample", weighting="dirichlet")
    a = mixture_step(logits, embedding, spec, generator=torch.Generator().manual_seed(42))
    b = mixture_step(logits, embedding, spec, generator=torch.Generator().manual_seed(42))
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    vocab=st.integers(2, 40),
    k=st.integers(1, 8),
    temperature=st.floats(0.1, 3.0),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**31 - 1),
)
def test_invariants_hold_for_random_shapes(rows, vocab, k, temperature, mode, seed):
    k = min(k, vocab)
    logits, embedding = _batch(rows=rows, vocab=vocab, hidden=3, seed=seed)
    spec = MixtureSpec(
        k=k,
        temperature=temperature,
        selection=mode[0],
        weighting=mode[1],
        representative=_rep(mode[1]),
    )
    step = mixture_step(logits, embedding, spec, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(step.weights.sum(-1), torch.ones(rows), atol=1e-5)
    assert (step.weights >= 0).all() and step.mask[:, 0].all()
    assert torch.isfinite(step.logprobs).all()
    assert (step.logprobs <= 1e-6).all()
