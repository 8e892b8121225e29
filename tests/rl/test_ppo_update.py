"""ppo_update on a tiny bandit: learning direction, KL early stop, NaN guard, critic warm-up."""

from __future__ import annotations

import pytest
import torch

from tests.rl.conftest import FEATURE_DIM, NUM_WAYPOINTS, make_observation
from training.rl.buffer import RolloutBuffer
from training.rl.policy import PPOPolicy
from training.rl.trainer import ppo_update

NUM_STEPS, NUM_ENVS = 4, 16

SETTINGS = dict(
    update_epochs=4,
    minibatch_size=16,
    clip_epsilon=0.2,
    value_coef=0.5,
    entropy_coef=0.0,
    max_grad_norm=1.0,
)


def _bandit_buffer(policy: PPOPolicy, seed: int = 0) -> RolloutBuffer:
    """One-step episodes (every step terminates) whose reward is the sum of the delta's x."""
    generator = torch.Generator().manual_seed(seed)
    buffer = RolloutBuffer(NUM_STEPS, NUM_ENVS, FEATURE_DIM, NUM_WAYPOINTS)
    for step in range(NUM_STEPS):
        z, sft = policy.features(*make_observation(NUM_ENVS, seed=seed + step))
        delta, log_prob, value = policy.act(z, sft, generator=generator)
        buffer.add(
            step, z=z, sft_waypoints=sft, delta=delta, log_prob=log_prob, value=value,
            reward=delta[..., 0].sum(dim=-1),
            terminated=torch.ones(NUM_ENVS, dtype=torch.bool),
            truncated=torch.zeros(NUM_ENVS, dtype=torch.bool),
            next_value=torch.zeros(NUM_ENVS),
        )  # fmt: skip
    buffer.compute_advantages(gamma=0.99, gae_lambda=0.95)
    return buffer


def _flat_params(policy: PPOPolicy) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in policy.trainable_parameters()])


def test_update_raises_log_prob_of_positive_advantage_actions(policy: PPOPolicy) -> None:
    buffer = _bandit_buffer(policy)
    z, sft = buffer.z.flatten(0, 1), buffer.sft_waypoints.flatten(0, 1)
    delta, advantages = buffer.delta.flatten(0, 1), buffer.advantages.flatten()
    good = advantages > advantages.median()
    before = policy.evaluate_actions(z, sft, delta).log_prob

    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        stats = ppo_update(policy, optimizer, buffer, generator=generator, **SETTINGS)
    after = policy.evaluate_actions(z, sft, delta).log_prob

    assert (after - before)[good].mean() > 0
    assert (after - before)[good].mean() > (after - before)[~good].mean()
    assert policy.distribution(z, sft).mean[..., 0].mean() > 0  # pushed forward, as rewarded
    assert stats["skipped_updates"] == 0
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "explained_variance"):
        assert isinstance(stats[key], float)


def test_update_is_deterministic(policy: PPOPolicy) -> None:
    buffer = _bandit_buffer(policy)
    initial = policy.heads_state_dict()
    results = []
    for _ in range(2):
        policy.load_heads_state_dict(initial)
        optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-3)
        stats = ppo_update(policy, optimizer, buffer, generator=torch.Generator().manual_seed(7), **SETTINGS)
        results.append((stats, _flat_params(policy)))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def compile_loss(request: pytest.FixtureRequest) -> bool:
    """The eager update, then ``--compile-update``'s (one compiled graph per minibatch step)."""
    if request.param:
        torch._dynamo.reset()  # graphs of other tests (other sizes, terms) count towards the recompile limit
    return request.param


def test_target_kl_stops_the_update_at_the_first_minibatch_beyond_it(
    policy: PPOPolicy, compile_loss: bool
) -> None:
    buffer = _bandit_buffer(policy)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    settings = {**SETTINGS, "update_epochs": 10, "compile_loss": compile_loss}
    stats = ppo_update(
        policy, optimizer, buffer, target_kl=1e-9, generator=torch.Generator().manual_seed(0), **settings
    )
    assert stats["early_stopped"] == 1.0
    assert stats["epochs"] == 1.0
    # The first minibatch sees the rollout policy itself (KL 0) and steps; the next one has moved
    # beyond 1.5 x target_kl and stops the update before its own step.
    assert stats["minibatch_updates"] == 1.0
    assert all(float(optimizer.state[p]["step"]) == 1 for p in policy.trainable_parameters())

    relaxed = ppo_update(
        policy, optimizer, buffer, target_kl=1e9, generator=torch.Generator().manual_seed(0), **settings
    )
    assert relaxed["early_stopped"] == 0.0 and relaxed["epochs"] == 10.0


def test_non_finite_loss_skips_the_step_and_leaves_parameters_unchanged(
    policy: PPOPolicy, compile_loss: bool
) -> None:
    buffer = _bandit_buffer(policy)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    settings = {**SETTINGS, "compile_loss": compile_loss}
    ppo_update(policy, optimizer, buffer, generator=generator, **settings)  # Adam now has momentum

    before = _flat_params(policy)
    adam_before = [
        {k: v.clone() for k, v in optimizer.state[p].items()} for p in policy.trainable_parameters()
    ]
    buffer.returns[1, 3] = float("nan")  # poisons the value loss of every minibatch it lands in
    settings |= {"minibatch_size": NUM_STEPS * NUM_ENVS, "update_epochs": 2}
    stats = ppo_update(policy, optimizer, buffer, generator=generator, **settings)
    assert stats["skipped_updates"] == 2.0
    assert stats["minibatch_updates"] == 0.0
    assert torch.equal(_flat_params(policy), before)
    assert all(p.grad is None for p in policy.trainable_parameters())
    for param, state in zip(policy.trainable_parameters(), adam_before, strict=True):  # nor Adam's state
        for key, value in state.items():
            assert torch.equal(optimizer.state[param][key], value), key


def test_critic_only_warm_up_leaves_the_actor_unchanged(policy: PPOPolicy, compile_loss: bool) -> None:
    buffer = _bandit_buffer(policy)
    actor_before = [p.detach().clone() for p in [*policy.delta_head.parameters(), policy.log_std]]
    critic_before = torch.cat([p.detach().flatten() for p in policy.value_head.parameters()])
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    stats = ppo_update(
        policy, optimizer, buffer, critic_only=True, residual_l2_coef=1.0, target_kl=1e-9,
        compile_loss=compile_loss, generator=torch.Generator().manual_seed(0), **SETTINGS,
    )  # fmt: skip
    assert all(not optimizer.state[p] for p in [*policy.delta_head.parameters(), policy.log_std])
    for p, old in zip([*policy.delta_head.parameters(), policy.log_std], actor_before, strict=True):
        assert torch.equal(p, old)
    assert not torch.equal(
        torch.cat([p.detach().flatten() for p in policy.value_head.parameters()]), critic_before
    )
    # the actor did not move: no KL (compiled: to rounding) and no early stop
    assert stats["approx_kl"] == pytest.approx(0.0, abs=0.0 if not compile_loss else 1e-8)
    assert stats["early_stopped"] == 0.0


def test_the_update_scores_with_the_policy_and_penalises_its_kl_to_sft(
    policy: PPOPolicy, monkeypatch
) -> None:
    """The update has no distribution code of its own: it asks the policy for log-probs and the KL,
    so its kl_to_reference is the policy's kl_to_sft of the minibatch's mean delta."""
    with torch.no_grad():
        policy.delta_head.net[-1].bias.fill_(0.2)  # a residual: the KL to SFT is not 0
    buffer = _bandit_buffer(policy)
    scored: list[torch.Tensor] = []
    evaluate_actions = policy.evaluate_actions

    def recording(z, sft_waypoints, delta, std=None):
        scores = evaluate_actions(z, sft_waypoints, delta, std)
        scored.append(policy.kl_to_sft(scores.mean_delta).mean().detach())
        return scores

    monkeypatch.setattr(policy, "evaluate_actions", recording)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)  # nothing moves
    stats = ppo_update(policy, optimizer, buffer, kl_coef=1.0, **{**SETTINGS, "update_epochs": 1})
    assert len(scored) == stats["minibatch_updates"] == NUM_STEPS * NUM_ENVS // SETTINGS["minibatch_size"]
    assert stats["kl_to_reference"] > 0
    assert stats["kl_to_reference"] == torch.stack(scored).mean().item()
