import math

import numpy as np
import pytest
import torch

from eval.closed_loop import collisions_closed_by, ego_to_world, run_closed_loop


def test_only_first_episode_counts_and_ade_is_exact(fake):
    env = fake.Env(num_envs=7)
    result = run_closed_loop(env, fake.offset_policy, seed=10, num_episodes=7)
    assert [e["scenario_seed"] for e in result.episodes] == list(range(10, 17))
    for ep in result.episodes:
        s = ep["scenario_seed"]
        length = min(fake.episode_length(s), fake.max_episode_steps)
        assert ep["length"] == length
        assert ep["ade"] == pytest.approx(1.0 + (length - 1) / 2.0)
        assert ep["fde"] == pytest.approx(ep["ade"])
        assert ep["episode_return"] == pytest.approx(length * (1.0 + 0.1 * s))
        assert ep["collision"] == int(s % 3 == 0)
        assert ep["off_road"] == int(s % 4 == 1)
        assert ep["goal_reached"] == int(fake.episode_length(s) <= fake.max_episode_steps)
        assert ep["mean_abs_jerk"] == pytest.approx(0.02 * s)
        assert ep["nonfinite_actions"] == 0
    assert env.step_calls <= fake.max_episode_steps
    assert result.nonfinite_actions == 0
    assert result.env_steps == 7 * env.step_calls
    assert result.wall_time_s > 0


def test_chunks_play_consecutive_seeds_like_one_batch(fake):
    one = run_closed_loop(fake.Env(num_envs=7), fake.offset_policy, seed=3, num_episodes=7)
    chunked = run_closed_loop(fake.Env(num_envs=3), fake.offset_policy, seed=3, num_episodes=7)
    assert chunked.episodes == one.episodes
    fewer = run_closed_loop(fake.Env(num_envs=9), fake.offset_policy, seed=3, num_episodes=7)
    assert fewer.episodes == one.episodes


def test_a_world_goes_on_to_the_next_seed_without_waiting_for_the_others(fake):
    seed, episodes, worlds = 3, 20, 2
    lengths = [min(fake.episode_length(seed + j), fake.max_episode_steps) for j in range(episodes)]
    # the protocol's order: a world that finishes takes the next unused seed at once
    free_at, next_episode = [lengths[0], lengths[1]], worlds
    while next_episode < episodes:
        world = min(range(worlds), key=lambda w: (free_at[w], w))
        free_at[world] += lengths[next_episode]
        next_episode += 1
    last_end = max(free_at)
    env = fake.Env(num_envs=worlds)
    result = run_closed_loop(env, fake.offset_policy, seed=seed, num_episodes=episodes)
    assert [e["length"] for e in result.episodes] == lengths
    assert env.step_calls == math.ceil(last_end / 8) * 8  # all done at last_end, seen at the next check
    assert env.step_calls < sum(max(lengths[i : i + worlds]) for i in range(0, episodes, worlds))


def test_an_env_that_hands_out_other_seeds_is_refused(fake):
    class SameSeedAgain(fake.Env):
        def step(self, waypoints):
            done_seeds = self.seed.clone()
            result = super().step(waypoints)
            restarted = result.info.episode.done
            self.seed[restarted] = done_seeds[restarted]  # replays its scenario instead of the next one
            return result

    with pytest.raises(RuntimeError, match="scenario seeds"):
        run_closed_loop(SameSeedAgain(num_envs=2), fake.offset_policy, seed=0, num_episodes=6)


def test_deterministic(fake):
    runs = [
        run_closed_loop(fake.Env(num_envs=5), fake.offset_policy, 0, 5, record_trajectories=2)
        for _ in range(2)
    ]
    assert runs[0].episodes == runs[1].episodes
    assert len(runs[0].trajectories) == 2
    for a, b in zip(runs[0].trajectories, runs[1].trajectories, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_trajectories_in_world_frame(fake):
    result = run_closed_loop(fake.Env(num_envs=2), fake.offset_policy, 20, 4, record_trajectories=3)
    assert len(result.trajectories) == 3
    for traj, ep in zip(result.trajectories, result.episodes, strict=False):
        s, length = ep["scenario_seed"], ep["length"]
        assert traj["scenario_seed"] == s
        assert traj["ego_pose"].shape == (length, 3)
        assert traj["policy_waypoints_world"].shape == (length, fake.num_waypoints, 2)
        np.testing.assert_allclose(traj["ego_pose"][:, 0], np.arange(length))
        yaw = fake.scenario_yaw(s)
        expert_ego = fake.expert_plan(torch.full((length,), s), torch.arange(length)).numpy()
        np.testing.assert_allclose(traj["expert_waypoints_ego"], expert_ego, atol=1e-6)
        rot = np.array([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
        origin = np.stack([np.arange(length), np.full(length, s)], -1)[:, None, :]
        np.testing.assert_allclose(traj["expert_waypoints_world"], expert_ego @ rot.T + origin, atol=1e-5)


def test_ego_to_world_rotates_forward_axis():
    pose = torch.tensor([[1.0, 2.0, math.pi / 2]])
    out = ego_to_world(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), pose)
    assert torch.allclose(out, torch.tensor([[[1.0, 3.0], [0.0, 2.0]]]), atol=1e-6)


def test_nan_actions_are_counted_and_passed_on(fake):
    def nan_policy(obs):
        plan = fake.offset_policy(obs)
        plan[(obs.state[:, 0] == 1) & (obs.state[:, 1] == 1)] = float("nan")
        return plan

    env = fake.Env(num_envs=3)
    result = run_closed_loop(env, nan_policy, seed=0, num_episodes=3)
    assert result.nonfinite_actions == 1
    assert env.nan_actions_seen >= 1
    ep = result.episodes[1]  # seed 1: 3 steps; t = 1 is left out -> mean of 1 and 3
    assert ep["nonfinite_actions"] == 1
    assert ep["ade"] == pytest.approx(2.0)


def test_per_step_errors_of_every_episode(fake):
    """The offset policy misses the expert by 1 + t metres at episode step t; steps of episodes that
    other worlds played before must not leak in, and a NaN plan is a NaN step."""

    def nan_policy(obs):
        plan = fake.offset_policy(obs)
        plan[(obs.state[:, 0] == 1) & (obs.state[:, 1] == 1)] = float("nan")
        return plan

    result = run_closed_loop(fake.Env(num_envs=2), nan_policy, seed=0, num_episodes=9)
    assert len(result.step_errors) == 9
    for episode, errors in zip(result.episodes, result.step_errors, strict=True):
        expected = 1.0 + np.arange(episode["length"], dtype=np.float64)
        if episode["scenario_seed"] == 1:
            expected[1] = np.nan
        np.testing.assert_allclose(errors[:, 0], expected)
        np.testing.assert_allclose(errors[:, 1], expected)
    one_batch = run_closed_loop(fake.Env(num_envs=9), nan_policy, seed=0, num_episodes=9)
    for a, b in zip(one_batch.step_errors, result.step_errors, strict=True):
        np.testing.assert_array_equal(a, b)


def test_env_that_never_ends_is_an_error(fake):
    class Endless(fake.Env):
        def step(self, waypoints):
            result = super().step(waypoints)
            result.info.episode.done[:] = False
            return result

    with pytest.raises(RuntimeError):
        run_closed_loop(Endless(num_envs=2), fake.offset_policy, seed=0, num_episodes=2)


def test_first_pose_unknown_without_ego_pose_method(fake):
    class NoPose(fake.Env):
        def ego_pose(self):  # the protocol's default: the pose is unknown
            return None

    result = run_closed_loop(NoPose(num_envs=2), fake.offset_policy, 4, 2, record_trajectories=1)
    traj = result.trajectories[0]
    assert np.isnan(traj["ego_pose"][0]).all() and np.isnan(traj["policy_waypoints_world"][0]).all()
    assert np.isfinite(traj["ego_pose"][1:]).all()


def test_collisions_are_counted_by_who_closed_the_gap():
    episodes = [
        {"scenario_seed": 1, "collision": 1},
        {"scenario_seed": 2, "collision": 0},
        {"scenario_seed": 3, "collision": 1},
        {"scenario_seed": 4, "collision": 1},
    ]
    reports = {1: {"closed_by": "other"}, 2: {"closed_by": "ego"}, 3: {"closed_by": "ego standing"}}
    counts = collisions_closed_by(reports, episodes)
    # seed 2's report is from another episode of that seed, which did not collide here; seed 4 has none
    assert counts == {"ego": 0, "ego standing": 1, "other": 1, "not found": 1}
    assert collisions_closed_by(None, episodes) is None
