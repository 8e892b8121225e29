"""The single-world Gymnasium view ``ToyWaypoint-v0``."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import training  # noqa: F401  (registers ToyWaypoint-v0)
from training.envs.toy import ToyWaypointEnv, ToyWorldConfig
from training.envs.toy.gym_view import ENV_ID, ToyWaypointGymEnv

EPISODE_KEYS = {
    "route_completion",
    "collision",
    "off_road",
    "goal_reached",
    "episode_return",
    "episode_length",
}
# Warnings check_env gives by design: the state is unbounded (as the spec says), and the made env is
# wrapped (PassiveEnvChecker, OrderEnforcing).
_EXPECTED_WARNINGS = ("infinity", "different from the unwrapped version")


def _check_env_without_surprises(env: gym.Env) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    surprises = [str(w.message) for w in caught if not any(e in str(w.message) for e in _EXPECTED_WARNINGS)]
    assert not surprises, surprises


def test_make_after_import_training_and_check_env_passes() -> None:
    env = gym.make(ENV_ID)
    assert isinstance(env.unwrapped, ToyWaypointGymEnv)
    # No TimeLimit wrapper: the world truncates itself.
    assert env.spec is not None and env.spec.max_episode_steps is None
    assert "TimeLimit" not in str(env)
    _check_env_without_surprises(env.unwrapped)
    _check_env_without_surprises(env)
    env.close()


def test_spaces_match_the_world() -> None:
    env = ToyWaypointGymEnv(difficulty=0.2)
    spec = env.world.spec
    assert env.observation_space["bev"].shape == spec.bev_shape
    assert env.observation_space["bev"].dtype == np.uint8
    assert env.observation_space["state"].shape == (spec.state_dim,)
    assert env.observation_space["state"].dtype == np.float32
    assert env.action_space.shape == (spec.num_waypoints, 2)
    assert env.action_space.dtype == np.float32
    assert env.world.num_envs == 1 and env.world.device.type == "cpu"
    assert env.config.difficulty == 0.2


def test_reset_with_a_seed_plays_that_scenario_and_unseeded_resets_are_reproducible() -> None:
    env = ToyWaypointGymEnv()
    obs, info = env.reset(seed=17)
    assert info["scenario_seed"] == 17
    batched = ToyWaypointEnv(ToyWorldConfig(num_envs=3)).reset(seed=15)
    np.testing.assert_array_equal(obs["bev"], batched.bev[2].numpy())
    np.testing.assert_array_equal(obs["state"], batched.state[2].numpy())
    assert info["expert_waypoints"].shape == (8, 2) and info["expert_waypoints"].dtype == np.float32
    seeds = [env.reset()[1]["scenario_seed"] for _ in range(3)]
    env.reset(seed=17)
    assert [env.reset()[1]["scenario_seed"] for _ in range(3)] == seeds
    assert len(set(seeds)) == 3


def test_expert_episode_ends_with_the_statistics() -> None:
    env = gym.make(ENV_ID, difficulty=0.5)
    obs, info = env.reset(seed=3)
    steps, total = 0, 0.0
    while True:
        obs, reward, terminated, truncated, info = env.step(info["expert_waypoints"])
        steps += 1
        total += reward
        assert isinstance(reward, float)
        assert obs in env.observation_space
        assert {"expert_waypoints", "scenario_seed", "speed_mps", "lateral_deviation_m"} <= info.keys()
        if terminated or truncated:
            break
        assert not EPISODE_KEYS & info.keys()
    assert terminated and not truncated
    assert info.keys() >= EPISODE_KEYS
    assert info["goal_reached"] and not info["collision"] and not info["off_road"]
    assert info["route_completion"] == pytest.approx(1.0)
    assert info["episode_length"] == steps
    assert info["episode_return"] == pytest.approx(total, rel=1e-5)
    # The episode is over: the next step needs a reset.
    with pytest.raises(RuntimeError, match="reset"):
        env.step(info["expert_waypoints"])
    env.reset()
    env.step(env.action_space.sample())


def test_the_final_observation_of_a_truncated_episode_is_returned() -> None:
    limit = 5
    env = ToyWaypointGymEnv(max_episode_steps=limit, difficulty=0.0)
    # A world with a longer limit does not end there: its step `limit` is the truth to compare with.
    reference = ToyWaypointEnv(ToyWorldConfig(num_envs=1, difficulty=0.0, max_episode_steps=50))
    _, info = env.reset(seed=8)
    reference.reset(seed=8)
    plan = np.zeros((8, 2), dtype=np.float32)  # stop
    for step in range(1, limit + 1):
        obs, _, terminated, truncated, info = env.step(plan)
        ref = reference.step(torch.from_numpy(plan)[None])
        assert truncated == (step == limit) and not terminated
        np.testing.assert_array_equal(obs["bev"], ref.obs.bev[0].numpy())
        np.testing.assert_array_equal(obs["state"], ref.obs.state[0].numpy())
        np.testing.assert_array_equal(info["expert_waypoints"], ref.info.expert_waypoints[0].numpy())
    assert info["episode_length"] == limit and not info["goal_reached"]
    # Not the next episode's first observation: the car has stopped.
    assert obs["state"][0] < 0.5
    # The batched world underneath did autoreset; the view must not have leaked it.
    assert int(env.world.state.t[0]) == 0
    assert float(env.world.state.vehicle.speed[0]) >= ToyWorldConfig().start_speed_range[0]


def test_bad_actions() -> None:
    env = ToyWaypointGymEnv()
    with pytest.raises(RuntimeError):
        env.step(np.zeros((8, 2), dtype=np.float32))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(16, dtype=np.float32))
    # Non-finite plans stop the car and keep everything finite.
    obs, reward, *_ = env.step(np.full((8, 2), np.nan, dtype=np.float32))
    assert np.isfinite(obs["state"]).all() and np.isfinite(reward)
    with pytest.raises(ValueError, match="render_mode"):
        ToyWaypointGymEnv(render_mode="human")


def test_render_returns_a_coloured_bev() -> None:
    env = gym.make(ENV_ID, render_mode="rgb_array")
    obs, _ = env.reset(seed=1)
    image = env.render()
    assert isinstance(image, np.ndarray)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    drivable = obs["bev"][0] == 255
    # Road pixels look different from the background.
    assert not np.array_equal(image[drivable].mean(axis=0), image[~drivable].mean(axis=0))
    obs, *_ = env.step(env.action_space.sample())
    assert env.render().shape == (64, 64, 3)
    with pytest.warns(UserWarning, match="render_mode"):
        assert ToyWaypointGymEnv().render() is None  # no render mode: warns and returns nothing
