"""Action log-likelihoods: densities vs torch.distributions, normalisation, gradients."""

import itertools

import pytest
import torch

from motg_fast.kernels import (
    SELECTIONS,
    WEIGHTINGS,
    MixtureSpec,
    action_logprob,
    concrete_log_density,
    dirichlet_log_density,
    mixture_step,
    renormalised_logprobs,
    token_slot,
)


def _action(rows=5, k=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(torch.randn(rows, 20, generator=g, dtype=dtype), -1)[:, :k]
    weights = torch.distributions.Dirichlet(torch.ones(k, dtype=dtype)).sample((rows,))
    mask = torch.ones(rows, k, dtype=torch.bool)
    slot = torch.randint(0, k, (rows,), generator=g)
    return logprobs, weights, mask, slot


@pytest.mark.parametrize("c", [0.3, 1.0, 4.0])
def test_dirichlet_density_matches_torch(c):
    logprobs, weights, mask, _ = _action()
    log_pt = renormalised_logprobs(logprobs, mask)
    ours = dirichlet_log_density(log_pt, weights, mask, c)
    theirs = torch.distributions.Dirichlet(c * log_pt.exp()).log_prob(weights)
    assert torch.allclose(ours, theirs, atol=1e-10)


@pytest.mark.parametrize("lam", [0.3, 1.0, 2.0])
def test_concrete_density_matches_torch(lam):
    logprobs, weights, mask, _ = _action()
    log_pt = renormalised_logprobs(logprobs, mask)
    ours = concrete_log_density(log_pt, weights, mask, lam)
    dist = torch.distributions.RelaxedOneHotCategorical(
        torch.tensor(lam, dtype=torch.float64), logits=log_pt
    )
    assert torch.allclose(ours, dist.log_prob(weights), atol=1e-10)


def test_densities_are_taken_over_valid_slots_only():
    logprobs, weights, _, _ = _action(k=4)
    mask = torch.tensor([[True, True, True, False]]).expand(5, 4)
    w = weights.clone()
    w[:, 3] = 0
    w = w / w.sum(-1, keepdim=True)
    log_pt = renormalised_logprobs(logprobs, mask)
    sub = renormalised_logprobs(logprobs[:, :3], mask[:, :3])
    assert torch.allclose(
        dirichlet_log_density(log_pt, w, mask, 2.0),
        torch.distributions.Dirichlet(2.0 * sub.exp()).log_prob(w[:, :3]),
    )
    relaxed = torch.distributions.RelaxedOneHotCategorical(
        torch.tensor(0.7, dtype=torch.float64), logits=sub
    )
    assert torch.allclose(concrete_log_density(log_pt, w, mask, 0.7), relaxed.log_prob(w[:, :3]))


def test_single_valid_slot_has_zero_weight_density():
    logprobs, _, _, _ = _action()
    mask = torch.zeros(5, 3, dtype=torch.bool)
    mask[:, 0] = True
    w = mask.double()
    log_pt = renormalised_logprobs(logprobs, mask)
    assert torch.allclose(
        dirichlet_log_density(log_pt, w, mask, 1.0), torch.zeros(5, dtype=torch.float64)
    )
    assert torch.allclose(
        concrete_log_density(log_pt, w, mask, 0.5), torch.zeros(5, dtype=torch.float64)
    )


def test_token_and_weighted_likelihoods():
    logprobs, weights, mask, slot = _action()
    spec = MixtureSpec(selection="topk", weighting="prob")
    token = action_logprob(logprobs, weights, mask, slot, spec, likelihood="token")
    assert torch.equal(token, logprobs.gather(-1, slot[:, None]).squeeze(-1))
    mask[0, 2] = False
    weighted = action_logprob(
        logprobs,
        weights,
        mask,
        slot.clamp(max=1),
        MixtureSpec(selection="sample", weighting="dirichlet"),
        likelihood="weighted",
    )
    p = logprobs.exp() * mask
    expected = ((p / p.sum(-1, keepdim=True)) * logprobs * mask).sum(-1)
    assert torch.allclose(weighted, expected)


def test_exact_topk_prob_sampled_token_is_log_renormalised_prob():
    logprobs, weights, mask, slot = _action()
    spec = MixtureSpec(selection="topk", weighting="prob")
    ell = action_logprob(logprobs, weights, mask, slot, spec, likelihood="exact")
    p = logprobs.exp()
    assert torch.allclose(
        ell, (p / p.sum(-1, keepdim=True)).gather(-1, slot[:, None]).log().squeeze(-1)
    )


def test_exact_sample_prob_is_a_normalised_distribution_over_actions():
    """Σ over all ordered k-subsets S and tokens y ∈ S of exp(ℓ) = 1."""
    log_p = torch.log_softmax(torch.tensor([0.2, 1.1, -0.7, 0.4], dtype=torch.float64), -1)
    k = 2
    total = 0.0
    for subset in itertools.permutations(range(4), k):
        lp = log_p[list(subset)].expand(k, k)
        slots = torch.arange(k)
        ell = action_logprob(
            lp,
            torch.zeros(k, k, dtype=torch.float64),
            torch.ones(k, k, dtype=torch.bool),
            slots,
            MixtureSpec(selection="sample", weighting="prob"),
            likelihood="exact",
        )
        total += ell.exp().sum().item()
    assert abs(total - 1.0) < 1e-12


def test_exact_adds_plackett_luce_density_and_token_terms():
    logprobs, weights, mask, slot = _action()
    spec = MixtureSpec(selection="sample", weighting="dirichlet", concentration=1.5)
    ell = action_logprob(logprobs, weights, mask, slot, spec, likelihood="exact")
    lp = logprobs
    pl = lp.sum(-1) - torch.log1p(-(lp.exp().cumsum(-1) - lp.exp())).sum(-1)
    log_pt = renormalised_logprobs(logprobs, mask)
    dens = torch.distributions.Dirichlet(1.5 * log_pt.exp()).log_prob(weights)
    expected = pl + dens + weights.gather(-1, slot[:, None]).log().squeeze(-1)
    assert torch.allclose(ell, expected)
    argmax_spec = spec.replace(representative="argmax")
    argmax = action_logprob(logprobs, weights, mask, slot, argmax_spec, likelihood="exact")
    assert torch.allclose(argmax, pl + dens)


def test_exact_with_no_random_part_is_an_error():
    logprobs, weights, mask, slot = _action()
    with pytest.raises(ValueError, match="deterministic"):
        action_logprob(
            logprobs,
            weights,
            mask,
            slot,
            MixtureSpec(selection="topk", weighting="prob", representative="argmax"),
            likelihood="exact",
        )


def test_exact_skips_never_drawn_slots():
    logits = torch.full((1, 10), float("-inf"))
    logits[0, :2] = torch.tensor([0.3, -0.2])
    spec = MixtureSpec(k=4, selection="sample", weighting="prob")
    step = mixture_step(logits, torch.eye(10), spec, generator=torch.Generator().manual_seed(0))
    ell = action_logprob(
        step.logprobs,
        step.weights,
        step.mask,
        token_slot(step.ids, step.token),
        spec,
        likelihood="exact",
    )
    # both finite entries are drawn, in some order (a, b): PL = p_a · p_b / (1 − p_a) = p_a;
    # the −inf slots are never drawn and contribute nothing; y ~ p̃ = p on {a, b}
    assert step.mask[0].tolist() == [True, True, False, False]
    p = step.logprobs[0, :2].double().exp()
    y = token_slot(step.ids, step.token)[0]
    assert torch.allclose(ell.double(), (p[0] * p[y]).log().unsqueeze(0), atol=1e-6)


@pytest.mark.parametrize(
    ("selection", "weighting"), list(itertools.product(SELECTIONS, WEIGHTINGS))
)
@pytest.mark.parametrize("likelihood", ["token", "weighted", "exact"])
def test_likelihood_gradcheck(selection, weighting, likelihood):
    logprobs, weights, mask, slot = _action(rows=3)
    mask[1, 2] = False
    weights[1] = torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64)
    slot[1] = 0
    logprobs.requires_grad_(True)

    spec = MixtureSpec(
        selection=selection,
        weighting=weighting,
        concentration=0.8,
        gumbel_temperature=0.6,
        representative="first" if weighting == "blend" else "sample",
    )

    def fn(lp):
        return action_logprob(lp, weights, mask, slot, spec, likelihood=likelihood)

    if likelihood not in spec.likelihoods:  # nothing random: no exact likelihood
        with pytest.raises(ValueError, match="is undefined"):
            fn(logprobs)
        return
    assert torch.autograd.gradcheck(fn, (logprobs,))


def test_action_shape_errors():
    logprobs, weights, mask, slot = _action()
    spec = MixtureSpec(selection="topk", weighting="prob")
    with pytest.raises(ValueError, match="share one shape"):
        action_logprob(logprobs, weights[:, :2], mask, slot, spec, likelihood="token")
    with pytest.raises(ValueError, match="token_slot must lie"):
        action_logprob(logprobs, weights, mask, slot + 3, spec, likelihood="token")
    with pytest.raises(ValueError, match="unknown likelihood"):
        action_logprob(logprobs, weights, mask, slot, spec, likelihood="exactly")
    with pytest.raises(ValueError, match="concentration"):
        action_logprob(
            logprobs,
            weights,
            mask,
            slot,
            MixtureSpec(selection="topk", weighting="dirichlet", concentration=0.0),
            likelihood="exact",
        )
