"""The policy's delta distribution: log-prob, entropy and the clamped log std."""

from __future__ import annotations

import math

import torch
from torch.distributions import Independent, Normal

from tests.rl.conftest import NUM_WAYPOINTS, make_observation
from training.rl.policy import PPOPolicy


def _perturb_heads(policy: PPOPolicy) -> None:
    """Give the zero-initialised output layer some weight so the mean is not 0."""
    with torch.no_grad():
        last = policy.delta_head.net[-1]
        last.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
        last.bias.fill_(0.1)
        policy.log_std.copy_(torch.linspace(-2.0, 0.0, NUM_WAYPOINTS * 2).view(NUM_WAYPOINTS, 2))


def test_log_prob_and_entropy_match_independent_normal(policy: PPOPolicy) -> None:
    _perturb_heads(policy)
    z, sft = policy.features(*make_observation(5))
    delta = torch.randn(5, NUM_WAYPOINTS, 2, generator=torch.Generator().manual_seed(4))
    log_prob, entropy, value, mean_delta = policy.evaluate_actions(z, sft, delta)

    mean = policy.delta_head(z, sft)
    torch.testing.assert_close(mean_delta, mean)  # what the update's L2 and KL penalties read
    reference = Independent(Normal(mean, policy.log_std.exp()), 2)
    torch.testing.assert_close(log_prob, reference.log_prob(delta))
    torch.testing.assert_close(entropy, reference.entropy())
    assert log_prob.shape == entropy.shape == value.shape == (5,)

    # and by the formula, for one sample
    std = policy.log_std.exp()
    by_hand = (
        -((delta[0] - mean[0]) ** 2) / (2 * std**2) - policy.log_std - 0.5 * math.log(2 * math.pi)
    ).sum()
    torch.testing.assert_close(log_prob[0], by_hand)


def test_act_log_prob_is_that_of_the_returned_delta(policy: PPOPolicy) -> None:
    _perturb_heads(policy)
    z, sft = policy.features(*make_observation(6))
    delta, log_prob, value = policy.act(z, sft, generator=torch.Generator().manual_seed(0))
    again, _, _ = policy.act(z, sft, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(delta, again)  # seeded sampling is reproducible
    evaluated, _, evaluated_value, _ = policy.evaluate_actions(z, sft, delta)
    torch.testing.assert_close(log_prob, evaluated)
    torch.testing.assert_close(value, evaluated_value)

    mean_delta, _, _ = policy.act(z, sft, deterministic=True)
    torch.testing.assert_close(mean_delta, policy.delta_head(z, sft))


def test_log_std_is_clamped_where_used(policy: PPOPolicy) -> None:
    z, sft = policy.features(*make_observation(2))
    with torch.no_grad():
        policy.log_std.fill_(-50.0)
    torch.testing.assert_close(
        policy.distribution(z, sft).stddev,
        torch.full((2, NUM_WAYPOINTS, 2), math.exp(policy.settings.min_log_std)),
    )
    with torch.no_grad():
        policy.log_std.fill_(50.0)
    dist = policy.distribution(z, sft)
    torch.testing.assert_close(
        dist.stddev, torch.full((2, NUM_WAYPOINTS, 2), math.exp(policy.settings.max_log_std))
    )
    assert torch.isfinite(dist.entropy()).all()


def test_initial_std_is_from_init_log_std(policy: PPOPolicy) -> None:
    torch.testing.assert_close(policy.std(), torch.full((NUM_WAYPOINTS, 2), math.exp(-1.6)))
