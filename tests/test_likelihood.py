"""Action log-likelihoods: densities vs torch.distributions, normalisation, gradients, and the
defining property of an exact likelihood, a score whose mean over draws is zero, on the
confident steps language models spend most of their time on."""

import itertools
import math

import pytest
import torch

from motg_fast.kernels import (
    SELECTIONS,
    WEIGHTINGS,
    MixtureSpec,
    action_logprob,
    concrete_log_density,
    dirichlet_log_density,
    mixture_logprobs,
    mixture_step,
    plackett_luce_logprob,
    renormalised_logprobs,
    token_slot,
)
from motg_fast.kernels.spec import METHODS


def _action(rows=5, k=3, seed=0, dtype=torch.float64):
    """Log-probs at k of 20 tokens, Dirichlet weights as weight logits (their logs), a mask,
    a slot and the log-mass outside the k ids."""
    g = torch.Generator().manual_seed(seed)
    full = torch.log_softmax(torch.randn(rows, 20, generator=g, dtype=dtype), -1)
    logprobs, rest = full[:, :k], full[:, k:].logsumexp(-1)
    weights = torch.distributions.Dirichlet(torch.ones(k, dtype=dtype)).sample((rows,))
    mask = torch.ones(rows, k, dtype=torch.bool)
    slot = torch.randint(0, k, (rows,), generator=g)
    return logprobs, weights.log(), mask, slot, rest


@pytest.mark.parametrize("c", [0.3, 1.0, 4.0])
def test_dirichlet_density_matches_torch(c):
    logprobs, log_w, mask, _, _ = _action()
    log_pt = renormalised_logprobs(logprobs, mask)
    ours = dirichlet_log_density(log_pt, log_w, mask, c)
    theirs = torch.distributions.Dirichlet(c * log_pt.exp()).log_prob(log_w.exp())
    assert torch.allclose(ours, theirs, atol=1e-10)


@pytest.mark.parametrize("lam", [0.3, 1.0, 2.0])
def test_concrete_density_matches_torch(lam):
    logprobs, log_w, mask, _, _ = _action()
    log_pt = renormalised_logprobs(logprobs, mask)
    ours = concrete_log_density(log_pt, log_w, mask, lam)
    dist = torch.distributions.RelaxedOneHotCategorical(
        torch.tensor(lam, dtype=torch.float64), logits=log_pt
    )
    assert torch.allclose(ours, dist.log_prob(log_w.exp()), atol=1e-10)


def test_densities_are_taken_over_valid_slots_only():
    logprobs, log_w, _, _, _ = _action(k=4)
    mask = torch.tensor([[True, True, True, False]]).expand(5, 4)
    w = log_w.exp()
    w[:, 3] = 0
    w = w / w.sum(-1, keepdim=True)
    log_pt = renormalised_logprobs(logprobs, mask)
    sub = renormalised_logprobs(logprobs[:, :3], mask[:, :3])
    assert torch.allclose(
        dirichlet_log_density(log_pt, w.log(), mask, 2.0),
        torch.distributions.Dirichlet(2.0 * sub.exp()).log_prob(w[:, :3]),
    )
    relaxed = torch.distributions.RelaxedOneHotCategorical(
        torch.tensor(0.7, dtype=torch.float64), logits=sub
    )
    assert torch.allclose(
        concrete_log_density(log_pt, w.log(), mask, 0.7), relaxed.log_prob(w[:, :3])
    )


def test_single_valid_slot_has_zero_weight_density():
    logprobs, _, _, _, _ = _action()
    mask = torch.zeros(5, 3, dtype=torch.bool)
    mask[:, 0] = True
    log_w = torch.zeros(5, 3, dtype=torch.float64)
    log_pt = renormalised_logprobs(logprobs, mask)
    zero = torch.zeros(5, dtype=torch.float64)
    assert torch.allclose(dirichlet_log_density(log_pt, log_w, mask, 1.0), zero)
    assert torch.allclose(concrete_log_density(log_pt, log_w, mask, 0.5), zero)


def test_token_and_weighted_likelihoods():
    logprobs, log_w, mask, slot, _ = _action()
    spec = MixtureSpec(selection="topk", weighting="prob")
    token = action_logprob(logprobs, mask, slot, spec, likelihood="token")
    assert torch.equal(token, logprobs.gather(-1, slot[:, None]).squeeze(-1))
    mask[0, 2] = False
    weighted = action_logprob(
        logprobs,
        mask,
        slot.clamp(max=1),
        MixtureSpec(selection="sample", weighting="dirichlet"),
        likelihood="weighted",
        weight_logits=log_w,
    )
    p = logprobs.exp() * mask
    expected = ((p / p.sum(-1, keepdim=True)) * logprobs * mask).sum(-1)
    assert torch.allclose(weighted, expected)


def test_exact_topk_prob_sampled_token_is_log_renormalised_prob():
    logprobs, _, mask, slot, _ = _action()
    spec = MixtureSpec(selection="topk", weighting="prob")
    ell = action_logprob(logprobs, mask, slot, spec, likelihood="exact")
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
        rest = log_p[[v for v in range(4) if v not in subset]].logsumexp(-1).expand(k)
        ell = action_logprob(
            lp,
            torch.ones(k, k, dtype=torch.bool),
            torch.arange(k),
            MixtureSpec(selection="sample", weighting="prob"),
            likelihood="exact",
            rest_logprob=rest,
        )
        total += ell.exp().sum().item()
    assert abs(total - 1.0) < 1e-12


def test_exact_adds_plackett_luce_density_and_token_terms():
    logprobs, log_w, mask, slot, rest = _action()
    spec = MixtureSpec(selection="sample", weighting="dirichlet", concentration=1.5)
    ell = action_logprob(
        logprobs, mask, slot, spec, likelihood="exact", weight_logits=log_w, rest_logprob=rest
    )
    lp = logprobs
    pl = lp.sum(-1) - torch.log1p(-(lp.exp().cumsum(-1) - lp.exp())).sum(-1)
    log_pt = renormalised_logprobs(logprobs, mask)
    dens = torch.distributions.Dirichlet(1.5 * log_pt.exp()).log_prob(log_w.exp())
    expected = pl + dens + log_w.gather(-1, slot[:, None]).squeeze(-1)
    assert torch.allclose(ell, expected)
    argmax_spec = spec.replace(representative="argmax")
    argmax = action_logprob(
        logprobs,
        mask,
        slot,
        argmax_spec,
        likelihood="exact",
        weight_logits=log_w,
        rest_logprob=rest,
    )
    assert torch.allclose(argmax, pl + dens)


def test_weight_logits_are_log_weights_up_to_a_constant():
    logprobs, log_w, mask, slot, rest = _action()
    spec = MixtureSpec(selection="sample", weighting="gumbel", gumbel_temperature=0.4)
    args = dict(likelihood="exact", rest_logprob=rest)
    base = action_logprob(logprobs, mask, slot, spec, weight_logits=log_w, **args)
    shifted = action_logprob(logprobs, mask, slot, spec, weight_logits=log_w + 7.5, **args)
    assert torch.allclose(base, shifted)


def test_plackett_luce_keeps_its_digits_when_the_top_token_rounds_to_certainty():
    """The top token's float32 log-prob is exactly 0: `1 − Σp` is 0, the rest is not."""
    logits = torch.tensor([[40.0, 0.0, -1.0, -2.0]])
    logp = torch.log_softmax(logits, -1)
    assert logp[0, 0].item() == 0.0
    rest = logp[:, 2:].logsumexp(-1)
    ell = plackett_luce_logprob(logp[:, :2], rest)
    exact = torch.log_softmax(logits.double(), -1)
    want = exact[0, 0] + exact[0, 1] - exact[0, 1:].logsumexp(-1)
    assert abs(ell.item() - want.item()) < 1e-6
    assert math.isfinite(ell.item())


def test_exact_with_no_random_part_is_an_error():
    logprobs, _, mask, slot, _ = _action()
    with pytest.raises(ValueError, match="deterministic"):
        action_logprob(
            logprobs,
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
        step.mask,
        token_slot(step.ids, step.token),
        spec,
        likelihood="exact",
        weight_logits=step.weight_logits,
        rest_logprob=step.rest_logprob,
    )
    # both finite entries are drawn, in some order (a, b): PL = p_a · p_b / (1 − p_a) = p_a;
    # the −inf slots are never drawn and contribute nothing; y ~ p̃ = p on {a, b}
    assert step.mask[0].tolist() == [True, True, False, False]
    assert step.rest_logprob.item() == float("-inf")
    p = step.logprobs[0, :2].double().exp()
    y = token_slot(step.ids, step.token)[0]
    assert torch.allclose(ell.double(), (p[0] * p[y]).log().unsqueeze(0), atol=1e-6)


@pytest.mark.parametrize(
    ("selection", "weighting"), list(itertools.product(SELECTIONS, WEIGHTINGS))
)
@pytest.mark.parametrize("likelihood", ["token", "weighted", "exact", "clamped_gumbel"])
def test_likelihood_gradcheck(selection, weighting, likelihood):
    logprobs, log_w, mask, slot, rest = _action(rows=3)
    mask[1, 2] = False
    slot[1] = 0
    logprobs.requires_grad_(True)
    rest.requires_grad_(True)
    spec = MixtureSpec(
        selection=selection,
        weighting=weighting,
        concentration=0.8,
        gumbel_temperature=0.6,
        representative="first" if weighting == "blend" else "sample",
    )

    def fn(lp, r):
        return action_logprob(
            lp, mask, slot, spec, likelihood=likelihood, weight_logits=log_w, rest_logprob=r
        )

    if likelihood not in spec.likelihoods:
        with pytest.raises(ValueError, match="undefined|needs weighting"):
            fn(logprobs, rest)
        return
    assert torch.autograd.gradcheck(fn, (logprobs, rest))


def test_action_errors_are_one_line_and_name_the_problem():
    logprobs, log_w, mask, slot, rest = _action()
    spec = MixtureSpec(selection="topk", weighting="prob")
    with pytest.raises(ValueError, match="share one shape"):
        action_logprob(logprobs, mask[:, :2], slot, spec, likelihood="token")
    with pytest.raises(ValueError, match="token_slot must lie"):
        action_logprob(logprobs, mask, slot + 3, spec, likelihood="token")
    with pytest.raises(ValueError, match="unknown likelihood"):
        action_logprob(logprobs, mask, slot, spec, likelihood="exactly")
    with pytest.raises(TypeError, match="positional"):  # the old argument order
        action_logprob(logprobs, log_w.exp(), mask, slot, spec, likelihood="token")
    dirichlet = MixtureSpec(selection="sample", weighting="dirichlet")
    with pytest.raises(ValueError, match="needs the stored weight_logits"):
        action_logprob(logprobs, mask, slot, dirichlet, likelihood="exact", rest_logprob=rest)
    with pytest.raises(ValueError, match="needs rest_logprob"):
        action_logprob(logprobs, mask, slot, dirichlet, likelihood="exact", weight_logits=log_w)
    bad_w = log_w.clone()
    bad_w[0, 1] = float("-inf")
    with pytest.raises(ValueError, match="weight_logits are not finite"):
        action_logprob(
            logprobs,
            mask,
            slot,
            dirichlet,
            likelihood="exact",
            weight_logits=bad_w,
            rest_logprob=rest,
        )
    bad_lp = logprobs.clone()
    bad_lp[2, 0] = float("nan")
    with pytest.raises(ValueError, match="logprobs hold NaN"):
        action_logprob(bad_lp, mask, slot, spec, likelihood="token")
    with pytest.raises(ValueError, match="rest_logprob holds NaN"):
        action_logprob(
            logprobs,
            mask,
            slot,
            dirichlet,
            likelihood="exact",
            weight_logits=log_w,
            rest_logprob=rest * float("nan"),
        )
    clamped = MixtureSpec(weighting="gumbel", gumbel_noise_min=-1.5, gumbel_noise_max=3.0)
    with pytest.raises(ValueError, match="clamped Gumbel noise"):
        action_logprob(logprobs, mask, slot, clamped, likelihood="exact", weight_logits=log_w)


# ------------------------------------------------------------------ the score has mean zero
# Logits of a 32-token vocabulary (8 leading values, then a tail from −4 to −9): flat,
# peaked, confident (top 22 above the rest) and near-certain (40 above: the top token's
# float32 log-prob is exactly 0).
_TAIL = torch.linspace(-4.0, -9.0, 24).tolist()
SCORE_CASES = {
    "flat": [0.3, -0.2, 0.5, 0.1, -0.4, 0.2, 0.0, -0.1, *[x / 8 for x in _TAIL]],
    "peaked": [5.0, 0.3, -1.0, -2.0, -2.5, -3.0, -3.5, -4.0, *_TAIL],
    "confident": [22.0, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5, -3.0, *_TAIL],
    "near_certain": [40.0, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5, -3.0, *_TAIL],
}
# Gaussian soft tokens' exact term needs the embeddings: its score test is in test_methods.py.
EXACT_METHODS = [
    n for n, m in METHODS.items() if "exact" in m.spec.likelihoods and m.spec.noise_std == 0
]
EXTRA_SPECS = {  # random parts the presets do not combine
    "sample_dirichlet": MixtureSpec(
        k=3, temperature=0.9, selection="sample", weighting="dirichlet"
    ),
    "sample_gumbel": MixtureSpec(
        k=3, temperature=0.9, selection="sample", weighting="gumbel", gumbel_temperature=0.5
    ),
    "unclamped_softgrpo": METHODS["softgrpo"].spec.replace(
        gumbel_noise_min=None, gumbel_noise_max=None
    ),
}


def _score_spec(name: str) -> MixtureSpec:
    return EXTRA_SPECS[name] if name in EXTRA_SPECS else METHODS[name].spec


def score_means(spec, draws, backend, dtype, seed=3):
    """`(mean [C,V], standard error [C,1])` over `draws` actions per case of
    ∇_z ℓ_exact(action; z), the actions drawn by `mixture_step` from the case's logits z
    (in `dtype`), ℓ through `mixture_logprobs` with an identity head (so its logits are z).
    The standard error is the case's largest over tokens: a rare token a small sample never
    draws has a constant score there, and its own spread would read as zero."""
    logits = torch.tensor(list(SCORE_CASES.values()), dtype=torch.float32).to(dtype)
    cases, vocab = logits.shape
    rows = logits.repeat_interleave(draws, 0)
    step = mixture_step(
        rows,
        torch.eye(vocab),
        spec,
        generator=torch.Generator().manual_seed(seed),
        backend=backend,
    )
    hidden = rows.clone().requires_grad_(True)
    logp, _, *rest = mixture_logprobs(
        hidden,
        torch.eye(vocab, dtype=dtype),
        step.ids,
        temperature=spec.temperature,
        backend=backend,
        return_rest=spec.needs_rest,
    )
    ell = action_logprob(
        logp,
        step.mask,
        step.token_slot,
        spec,
        likelihood="exact",
        weight_logits=step.weight_logits,
        rest_logprob=rest[0] if rest else None,
    )
    (grad,) = torch.autograd.grad(ell.float().sum(), hidden)
    grad = grad.double().view(cases, draws, vocab)
    return grad.mean(1), grad.std(1).amax(-1, keepdim=True) / math.sqrt(draws)


def assert_mean_zero(mean, se, what, draws=20000):
    """Every coordinate within 5 standard errors of zero, plus `max(2e-3, 4/draws)`: a
    sample can miss every draw of an event of probability below ~3/draws (then the spread
    reads zero and the mean is off by up to that share of the score's range, ≤ 1/τ per draw
    here). The biases this guards against are ~1/τ."""
    se = se.expand_as(mean)
    excess = mean.abs() - 5 * se - max(2e-3, 4 / draws)
    worst = excess.flatten().argmax()
    case, token = divmod(int(worst), mean.shape[1])
    assert excess.max() <= 0, (
        f"{what}: mean score {float(mean.flatten()[worst]):+.4f} ± "
        f"{float(se.flatten()[worst]):.4f} on token {token} for {list(SCORE_CASES)[case]} logits"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", EXACT_METHODS + list(EXTRA_SPECS))
def test_exact_score_has_mean_zero_on_the_reference_path(name, dtype):
    spec = _score_spec(name)
    mean, se = score_means(spec, draws=20000, backend="reference", dtype=dtype)
    assert_mean_zero(mean, se, f"{name} reference {dtype}")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", EXACT_METHODS + list(EXTRA_SPECS))
def test_exact_score_has_mean_zero_on_the_triton_path(name, dtype):
    spec = _score_spec(name)
    mean, se = score_means(spec, draws=64, backend="triton", dtype=dtype)
    assert_mean_zero(mean, se, f"{name} triton {dtype}", draws=64)


def test_the_score_check_catches_the_float32_cancellation_bias():
    """Negative control: Plackett–Luce's remaining mass as `1 − Σ p` from float32 log-probs
    (clamped when it rounds to 0) fails the check on near-certain logits."""
    spec = MixtureSpec(k=2, temperature=0.9, selection="sample", weighting="prob")
    z = torch.tensor([SCORE_CASES["near_certain"]]).expand(20000, -1).contiguous()
    step = mixture_step(z, torch.eye(32), spec, generator=torch.Generator().manual_seed(0))
    hidden = z.clone().requires_grad_(True)
    logp = torch.log_softmax(hidden / 0.9, -1).gather(-1, step.ids)
    left = (1.0 - (logp.exp().cumsum(-1) - logp.exp())).clamp(min=torch.finfo(torch.float32).tiny)
    cancelled = (logp[:, :1].sum(-1) + logp[:, 1] - left[:, 1].log()).squeeze()
    y_term = renormalised_logprobs(logp, step.mask).gather(-1, step.token_slot[:, None])
    (grad,) = torch.autograd.grad((cancelled + y_term.squeeze(-1)).sum(), hidden)
    mean = grad.double().mean(0, keepdim=True)
    se = grad.double().std(0).amax().reshape(1, 1) / math.sqrt(len(grad))
    with pytest.raises(AssertionError, match="mean score"):
        assert_mean_zero(mean.expand(4, -1), se.expand(4, 1), "float32 1 − Σp")
