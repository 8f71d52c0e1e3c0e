"""GRPO math on hand-computed cases."""

import math

import pytest
import torch

from motg_fast.training.grpo import aggregate, clipped_surrogate, group_advantages, grpo_loss, k3_kl


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    adv = group_advantages(rewards, 2, eps=0.0)
    # groups (1,0), (0,1), (2,2): centred ±0.5 with std 0.5; the last group has no spread
    assert adv.tolist() == [1.0, -1.0, -1.0, 1.0, 0.0, 0.0]
    unscaled = group_advantages(rewards, 3, scaling="none")
    assert torch.allclose(unscaled, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    batch = group_advantages(rewards, 2, scaling="batch", eps=0.0)
    std = rewards.std(correction=0)
    assert torch.allclose(batch, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0]) / std)


def test_zero_variance_group_gives_zero_advantage_without_nan():
    adv = group_advantages(torch.full((4,), 3.0), 4)
    assert torch.equal(adv, torch.zeros(4))
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0]), 1), torch.zeros(2))


def test_group_advantage_errors():
    with pytest.raises(ValueError, match="groups of group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="unknown advantage scaling"):
        group_advantages(torch.zeros(4), 2, scaling="global")


def test_clipped_surrogate_both_branches():
    old = torch.zeros(1, 4)
    logp = torch.tensor([[math.log(1.5), math.log(1.1), math.log(0.5), math.log(0.9)]])
    pos = torch.tensor([2.0])
    obj, ratio, clipped = clipped_surrogate(logp, old, pos, eps_low=0.2, eps_high=0.3)
    # A > 0: min(ρA, clip(ρ)A) caps ρ at 1.3 above and keeps ρ below
    assert torch.allclose(obj, torch.tensor([[2.6, 2.2, 1.0, 1.8]]))
    assert clipped.tolist() == [[True, False, False, False]]
    neg = torch.tensor([-2.0])
    obj, _, clipped = clipped_surrogate(logp, old, neg, eps_low=0.2, eps_high=0.3)
    # A < 0: the pessimistic branch floors ρ at 0.8 below and keeps ρ above
    assert torch.allclose(obj, torch.tensor([[-3.0, -2.2, -1.6, -1.8]]))
    assert clipped.tolist() == [[False, False, True, False]]
    assert torch.allclose(ratio, torch.tensor([[1.5, 1.1, 0.5, 0.9]]))


def test_clipped_branch_has_no_gradient():
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    obj, _, _ = clipped_surrogate(
        logp, torch.zeros(1, 2), torch.tensor([1.0]), eps_low=0.2, eps_high=0.2
    )
    obj.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 1.1]]))


def test_k3_kl_hand_computed_and_nonnegative():
    logp = torch.tensor([0.0, -1.0, -2.0])
    ref = torch.tensor([0.0, -2.0, -1.0])
    expected = torch.tensor([0.0, math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1])
    assert torch.allclose(k3_kl(logp, ref), expected)
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_aggregations_hand_computed():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert aggregate(values, mask, "grpo").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(values, mask, "dapo").item() == pytest.approx(10.0 / 4)
    assert aggregate(values, mask, "dr_grpo").item() == pytest.approx(10.0 / (2 * 3))
    assert aggregate(values, mask, "dr_grpo", max_len=5).item() == pytest.approx(10.0 / 10)
    empty = torch.tensor([[True, True, True], [False, False, False]])
    assert aggregate(values, empty, "grpo").item() == pytest.approx(2.0 / 2)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(values, mask, "mean")


def test_grpo_loss_with_kl_and_metrics():
    logp = torch.tensor([[math.log(1.5), 0.0], [0.0, 0.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    ref = torch.tensor([[0.0, -1.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -1.0])
    loss, metrics = grpo_loss(
        logp, old, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.5, ref_logp=ref, aggregation="dapo"
    )
    kl = k3_kl(logp.detach(), ref)
    per_pos = -torch.tensor([[1.2, 1.0], [-1.0, 0.0]]) + 0.5 * kl
    assert loss.item() == pytest.approx((per_pos * mask).sum().item() / 3)
    assert metrics["clip_fraction"].item() == pytest.approx(1 / 3)
    assert metrics["kl"].item() == pytest.approx((kl * mask).sum().item() / 3)
    loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_grpo_loss_mu1_gradient_is_advantage_times_score():
    logp = torch.randn(3, 4, requires_grad=True)
    adv = torch.tensor([0.5, -1.0, 2.0])
    mask = torch.ones(3, 4, dtype=torch.bool)
    loss, metrics = grpo_loss(logp, logp.detach(), adv, mask, aggregation="dr_grpo", max_len=4)
    loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None].expand(3, 4) / 12)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)


def test_grpo_loss_errors():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(x, x, torch.zeros(2), m, beta=0.1)
    with pytest.raises(ValueError, match="share one shape"):
        grpo_loss(x, x[:, :2], torch.zeros(2), m)
