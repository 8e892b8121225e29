"""PPO loss terms: clipping, KL estimate, value loss, explained variance."""

from __future__ import annotations

import math

import torch

from training.rl.losses import explained_variance, kl_to_reference, ppo_loss, residual_l2_penalty

EPS = 0.2


def _loss(new_log_prob, old_log_prob, advantages, **kwargs):
    n = advantages.shape[0]
    defaults = dict(
        new_value=torch.zeros(n),
        returns=torch.zeros(n),
        entropy=torch.zeros(n),
        clip_epsilon=EPS,
        value_coef=0.5,
        entropy_coef=0.0,
        normalize_advantages=False,
    )
    defaults.update(kwargs)
    return ppo_loss(new_log_prob, old_log_prob, advantages, **defaults)


def test_ratio_one_gives_minus_mean_advantage_and_no_clipping() -> None:
    old = torch.tensor([-1.0, -2.0, 0.5, 3.0])
    advantages = torch.tensor([1.0, -2.0, 0.5, 4.0])
    loss, stats = _loss(old.clone(), old, advantages)
    torch.testing.assert_close(stats["policy_loss"], -advantages.mean())
    torch.testing.assert_close(loss, -advantages.mean())
    assert stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0


def test_normalized_advantages_have_zero_mean_at_ratio_one() -> None:
    old = torch.zeros(4)
    _, stats = _loss(old.clone(), old, torch.tensor([1.0, 2.0, 3.0, 10.0]), normalize_advantages=True)
    assert abs(stats["policy_loss"].item()) < 1e-6


def test_ratio_outside_clip_range_is_clipped_and_passes_no_gradient() -> None:
    old = torch.zeros(4)
    # ratios: 1.5 (adv > 0, clipped), 1.5 (adv < 0, not clipped), 0.5 (adv < 0, clipped), 1.1 (inside)
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.1])).requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, stats = _loss(new, old, advantages)
    loss.backward()
    assert new.grad is not None
    assert new.grad[0].item() == 0.0  # positive advantage, ratio > 1 + eps: no incentive to go further
    assert new.grad[2].item() == 0.0  # negative advantage, ratio < 1 - eps
    assert new.grad[1].item() != 0.0  # pessimistic term is the unclipped one
    assert new.grad[3].item() != 0.0
    torch.testing.assert_close(stats["clip_fraction"], torch.tensor(0.75))
    expected_policy_loss = (-1.0 * 1.2 + 1.5 + 0.8 - 1.1) / 4
    torch.testing.assert_close(stats["policy_loss"], torch.tensor(expected_policy_loss))
    assert stats["approx_kl"].item() > 0.0


def test_approx_kl_matches_formula() -> None:
    old = torch.zeros(3)
    new = torch.tensor([0.1, -0.2, 0.3])
    _, stats = _loss(new, old, torch.ones(3))
    ratio = new.exp()
    torch.testing.assert_close(stats["approx_kl"], ((ratio - 1) - new).mean())


def test_value_loss_plain_and_clipped() -> None:
    zeros = torch.zeros(2)
    new_value = torch.tensor([1.0, 3.0])
    returns = torch.tensor([2.0, 0.0])
    _, stats = _loss(zeros, zeros, zeros, new_value=new_value, returns=returns)
    torch.testing.assert_close(stats["value_loss"], torch.tensor(0.5 * (1.0 + 9.0) / 2))
    old_value = torch.tensor([0.0, 0.0])
    _, clipped = _loss(
        zeros, zeros, zeros, new_value=new_value, returns=returns, old_value=old_value, value_clip=0.5
    )
    # clipped predictions 0.5, 0.5 -> errors 2.25, 0.25; max with unclipped 1, 9
    torch.testing.assert_close(clipped["value_loss"], torch.tensor(0.5 * (2.25 + 9.0) / 2))


def test_entropy_bonus_lowers_the_loss() -> None:
    zeros = torch.zeros(3)
    loss, stats = _loss(zeros, zeros, zeros, entropy=torch.full((3,), 2.0), entropy_coef=0.1)
    torch.testing.assert_close(loss, torch.tensor(-0.2))
    torch.testing.assert_close(stats["entropy"], torch.tensor(2.0))


def test_stats_are_detached_tensors() -> None:
    new = torch.zeros(3, requires_grad=True)
    _, stats = _loss(new, torch.zeros(3), torch.ones(3))
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in stats.values())


def test_explained_variance() -> None:
    y = torch.tensor([1.0, 2.0, 3.0, 5.0])
    assert explained_variance(y, y).item() == 1.0
    assert abs(explained_variance(torch.full_like(y, y.mean().item()), y).item()) < 1e-6
    assert explained_variance(-y, y).item() < 0
    assert math.isnan(explained_variance(y, torch.ones(4)).item())


def test_residual_penalty_and_reference_kl() -> None:
    mean = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]])  # [1, K=2, 2]
    torch.testing.assert_close(residual_l2_penalty(mean), torch.tensor(5.0 / 4))
    std = torch.full((2, 2), 0.5)
    # same std as the reference: KL = sum mean^2 / (2 * 0.25)
    torch.testing.assert_close(kl_to_reference(mean, std, 0.5), torch.tensor([5.0 / 0.5]))
    torch.testing.assert_close(kl_to_reference(torch.zeros(1, 2, 2), std, 0.5), torch.tensor([0.0]))
