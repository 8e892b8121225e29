"""PPOPolicy: SFT plan at initialisation, bounded residual, frozen SFT model, NaN safety net, settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.rl.conftest import FEATURE_DIM, NUM_WAYPOINTS, FakeSFT, make_observation, policy_settings
from training.common.errors import UserError
from training.rl.buffer import RolloutBuffer
from training.rl.checkpoint import load_rl_checkpoint, save_rl_checkpoint, trained_policy
from training.rl.config import PPOConfig
from training.rl.policy import PolicySettings, PPOPolicy
from training.rl.trainer import ppo_update


def test_initial_plan_is_exactly_the_sft_plan(policy: PPOPolicy, sft_model: FakeSFT) -> None:
    bev, state = make_observation(7)
    with torch.no_grad():
        sft_plan = sft_model.head(sft_model.encode(bev, state))
    assert torch.equal(policy.deterministic_waypoints(bev, state), sft_plan)
    z, sft = policy.features(bev, state)
    assert torch.equal(policy.distribution(z, sft).mean, torch.zeros(7, NUM_WAYPOINTS, 2))


def test_final_waypoints_never_move_further_than_max_delta(policy: PPOPolicy) -> None:
    bev, state = make_observation(16)
    z, sft = policy.features(bev, state)
    with torch.no_grad():
        policy.delta_head.net[-1].bias.fill_(1e6)  # huge raw output: tanh saturates
        policy.delta_head.net[-1].bias[::2] = -1e6
        policy.log_std.fill_(policy.settings.max_log_std)
    mean = policy.distribution(z, sft).mean
    assert mean.abs().max().item() <= policy.settings.max_delta
    for deterministic in (True, False):
        delta, _, _ = policy.act(z, sft, deterministic=deterministic)
        final = policy.final_waypoints(sft, delta * 100.0)
        assert (final - sft).abs().max().item() <= policy.settings.max_delta + 1e-6
    assert (
        (policy.deterministic_waypoints(bev, state) - sft).abs() <= policy.settings.max_delta + 1e-6
    ).all()


def test_non_finite_delta_falls_back_to_sft_plan(policy: PPOPolicy) -> None:
    _, sft = policy.features(*make_observation(3))
    delta = torch.full((3, NUM_WAYPOINTS, 2), 0.3)
    delta[0, 1, 0] = float("nan")
    delta[2, 3, 1] = float("inf")
    final = policy.final_waypoints(sft, delta)
    assert torch.isfinite(final).all()
    assert torch.equal(final[0], sft[0])
    assert torch.equal(final[2], sft[2])
    torch.testing.assert_close(final[1], sft[1] + 0.3)


def test_nan_head_output_never_reaches_the_world(policy: PPOPolicy) -> None:
    bev, state = make_observation(4)
    z, sft = policy.features(bev, state)
    with torch.no_grad():
        policy.delta_head.net[-1].bias.fill_(float("nan"))
    assert torch.equal(policy.deterministic_waypoints(bev, state), sft)
    delta, _, _ = policy.act(z, sft)
    assert torch.equal(policy.final_waypoints(sft, delta), sft)


def test_features_are_usable_with_gradients_later(policy: PPOPolicy) -> None:
    z, sft = policy.features(*make_observation(4))
    assert not z.requires_grad and not sft.requires_grad
    assert z.shape == (4, FEATURE_DIM) and sft.shape == (4, NUM_WAYPOINTS, 2)
    log_prob, _, value, _ = policy.evaluate_actions(z, sft, torch.zeros(4, NUM_WAYPOINTS, 2))
    (log_prob.sum() + value.sum()).backward()
    assert policy.log_std.grad is not None


def test_sft_model_is_frozen_and_stays_in_eval_mode(policy: PPOPolicy, sft_model: FakeSFT) -> None:
    before = {name: p.detach().clone() for name, p in sft_model.named_parameters()}
    policy.train()
    assert policy.training and policy.delta_head.training
    assert not sft_model.training and not sft_model.dropout.training
    assert all(not p.requires_grad for p in sft_model.parameters())
    trainable = {id(p) for p in policy.trainable_parameters()}
    assert not trainable & {id(p) for p in sft_model.parameters()}

    # a few real PPO updates on a random rollout
    num_steps, num_envs = 4, 8
    buffer = RolloutBuffer(num_steps, num_envs, FEATURE_DIM, NUM_WAYPOINTS)
    generator = torch.Generator().manual_seed(0)
    for step in range(num_steps):
        z, sft = policy.features(*make_observation(num_envs, seed=step))
        delta, log_prob, value = policy.act(z, sft, generator=generator)
        buffer.add(
            step, z=z, sft_waypoints=sft, delta=delta, log_prob=log_prob, value=value,
            reward=torch.randn(num_envs, generator=generator),
            terminated=torch.zeros(num_envs, dtype=torch.bool),
            truncated=torch.zeros(num_envs, dtype=torch.bool),
            next_value=torch.zeros(num_envs),
        )  # fmt: skip
    buffer.compute_advantages(0.99, 0.95)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    stats = ppo_update(
        policy, optimizer, buffer, update_epochs=3, minibatch_size=8, clip_epsilon=0.2,
        value_coef=0.5, entropy_coef=0.01, max_grad_norm=0.5, generator=generator,
    )  # fmt: skip
    assert stats["minibatch_updates"] == 12
    for name, p in sft_model.named_parameters():
        assert p.grad is None
        assert torch.equal(p, before[name]), name
    assert not sft_model.training
    assert policy.delta_head.net[-1].weight.abs().sum() > 0  # the heads did move


def test_heads_state_dict_round_trip_without_sft_weights(policy: PPOPolicy) -> None:
    with torch.no_grad():
        policy.log_std.fill_(-1.0)
        policy.delta_head.net[-1].bias.fill_(0.25)
    state = policy.heads_state_dict()
    assert not any(name.startswith("sft_model.") for name in state)
    assert {"log_std", "delta_head.net.0.weight", "value_head.net.0.weight"} <= set(state)

    torch.manual_seed(5)
    other = PPOPolicy(FakeSFT(), policy_settings())
    other.load_heads_state_dict(state)
    bev, state_obs = make_observation(3)
    torch.testing.assert_close(
        other.deterministic_waypoints(bev, state_obs), policy.deterministic_waypoints(bev, state_obs)
    )
    wrong = PPOPolicy(FakeSFT(), policy_settings(hidden_size=16))
    with pytest.raises(UserError):
        wrong.load_heads_state_dict(state)


def test_bad_constructor_values_are_user_errors(sft_model: FakeSFT) -> None:
    with pytest.raises(UserError):
        PPOPolicy(sft_model, policy_settings(max_delta=0.0))
    with pytest.raises(UserError):
        PPOPolicy(sft_model, policy_settings(init_log_std=-10.0))
    with pytest.raises(UserError):
        PPOPolicy(sft_model, policy_settings(activation="relu6"))


# ------------------------------------------------------------------------------------ settings
def test_the_run_config_flags_are_the_policy_settings_with_their_defaults_and_help() -> None:
    """One home per setting: PPOConfig's policy flags take default and help from PolicySettings."""
    config_fields = {field.name: field for field in dataclasses.fields(PPOConfig)}
    flagged = [field for field in dataclasses.fields(PolicySettings) if "help" in field.metadata]
    assert len(flagged) == 7
    for setting in flagged:
        assert config_fields[setting.name].default == setting.default, setting.name
        assert config_fields[setting.name].metadata == setting.metadata, setting.name
    assert PPOConfig(sft_checkpoint="unused").policy_settings() == PolicySettings()


def test_the_policy_settings_round_trip_through_a_checkpoint(tmp_path: Path, sft_model: FakeSFT) -> None:
    config = PPOConfig(sft_checkpoint="unused", max_delta=1.5, hidden_size=16, action_scale=0.5)
    torch.manual_seed(2)
    policy = PPOPolicy(sft_model, config.policy_settings())
    with torch.no_grad():
        policy.delta_head.net[-1].bias.fill_(0.3)
    run = {"config": dataclasses.asdict(config), "sft_checkpoint": "unused", "sft_sha256": "0" * 64}
    save_rl_checkpoint(tmp_path / "final.pt", policy.heads_state_dict(), run, iteration=1)

    checkpoint = load_rl_checkpoint(tmp_path / "final.pt")
    assert PolicySettings.from_config(checkpoint["config"]) == config.policy_settings()
    restored = trained_policy(checkpoint, sft_model)
    assert restored.settings == policy.settings
    bev, state = make_observation(4)
    assert torch.equal(
        restored.deterministic_waypoints(bev, state), policy.deterministic_waypoints(bev, state)
    )


def test_an_old_config_json_gives_the_settings_and_a_foreign_one_is_refused() -> None:
    """config.json stores the flat PPOConfig fields; JSON may give whole numbers for floats."""
    stored = json.loads(json.dumps(dataclasses.asdict(PPOConfig(sft_checkpoint="unused", max_delta=2))))
    settings = PolicySettings.from_config(stored)
    assert settings == PolicySettings(max_delta=2.0) and isinstance(settings.max_delta, float)
    with pytest.raises(UserError, match="init_log_std"):
        PolicySettings.from_config({k: v for k, v in stored.items() if k != "init_log_std"})
