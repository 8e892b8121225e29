"""The CARLA environment behind the batched protocol, on fake servers (and, marked ``carla``, on a
live one when ``CARLA_HOST`` is set)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.envs.test_carla_fakes import FakeClient, fake_carla_module
from training.common.errors import UserError
from training.envs.carla import CarlaConfig, CarlaWaypointEnv
from training.envs.carla.connection import ServerAddress
from training.envs.carla.session import CarlaSession
from training.envs.protocol import BatchedWaypointEnv
from training.envs.toy import ToyWaypointEnv, ToyWorldConfig

SHORT = CarlaConfig(difficulty=0.0, route_length_m=25.0, max_episode_steps=6)


def fake_env(
    num_envs: int = 2, cfg: CarlaConfig = SHORT
) -> tuple[CarlaWaypointEnv, list[FakeClient], list[bool]]:
    clients = [FakeClient() for _ in range(num_envs)]
    sessions = [
        CarlaSession(fake_carla_module(), client, ServerAddress("fake", 2000 + 4 * i), cfg, 1.0)
        for i, client in enumerate(clients)
    ]
    closed: list[bool] = []
    env = CarlaWaypointEnv(sessions, cfg, on_close=lambda: closed.append(True))
    env.open()
    return env, clients, closed


def test_spec_matches_the_toy_world_so_one_sft_model_fits_both() -> None:
    env, _, _ = fake_env(1)
    try:
        assert isinstance(env, BatchedWaypointEnv)
        toy = ToyWaypointEnv(ToyWorldConfig(num_envs=1)).spec
        for name in (
            "bev_shape",
            "state_dim",
            "num_waypoints",
            "waypoint_dt",
            "policy_dt",
            "bev_channels",
            "state_names",
        ):
            assert getattr(env.spec, name) == getattr(toy, name), name
        obs = env.reset(seed=0)
        assert obs.bev.shape == (1, 4, 64, 64) and obs.bev.dtype == torch.uint8
        assert obs.state.shape == (1, 5) and obs.state.dtype == torch.float32
        assert obs.bev[0, 0, 58, 31] == 255  # the ego stands on the drivable area
        assert obs.state[0, 4] == pytest.approx(SHORT.route_length_m, abs=0.5)  # distance to goal
    finally:
        env.close()


def test_expert_reaches_the_goal_and_finished_worlds_take_the_next_seeds() -> None:
    cfg = CarlaConfig(difficulty=0.0, route_length_m=20.0, max_episode_steps=15)
    env, _, _ = fake_env(2, cfg)
    finished: list[tuple[int, int]] = []  # (world, scenario seed) in the order episodes end
    try:
        env.reset(seed=7)
        while len(finished) < 4:
            result = env.step(env.expert_waypoints())
            stats = result.info.episode
            for world in torch.nonzero(stats.done).flatten().tolist():
                finished.append((world, int(stats.scenario_seed[world])))
                assert stats.goal_reached[world] and result.terminated[world] and not result.truncated[world]
                assert stats.route_completion[world] == 1.0 and stats.mean_abs_lateral_m[world] < 0.3
                assert not stats.collision[world] and not stats.off_road[world]
                # autoreset: the returned observation starts a new episode, the final one ended near the goal
                assert result.obs.state[world, 4] == pytest.approx(cfg.route_length_m, abs=0.5)
                assert result.info.final_observation.state[world, 4] < 1.0
    finally:
        env.close()
    first_round = sorted(seed for _, seed in finished[:2])
    assert first_round == [7, 8]
    next_seed = {world: seed for world, seed in finished[2:]}
    first_to_finish = finished[0][0]
    assert next_seed[first_to_finish] == 9 and next_seed[1 - first_to_finish] == 10


def test_standing_still_is_truncated_not_terminated() -> None:
    env, _, _ = fake_env(1)
    try:
        env.reset(seed=0)
        stand_still = torch.zeros(1, SHORT.num_waypoints, 2)
        for step in range(SHORT.max_episode_steps):
            result = env.step(stand_still)
            assert result.info.episode.done.item() == (step == SHORT.max_episode_steps - 1)
        assert result.truncated.item() and not result.terminated.item()
        assert result.info.episode.length.item() == SHORT.max_episode_steps
        assert result.info.speed_mps.item() < 0.5
    finally:
        env.close()


def test_leaving_the_road_terminates_with_a_penalty() -> None:
    env, _, _ = fake_env(1)
    try:
        env.reset(seed=0)
        swerve = env.expert_waypoints()
        swerve[..., 1] += torch.linspace(2.0, 8.0, SHORT.num_waypoints)  # far to the left
        for _ in range(SHORT.max_episode_steps):
            result = env.step(swerve)
            if result.terminated.any():
                break
        assert result.info.episode.off_road.item() and result.terminated.item()
        assert result.reward.item() < -5.0
    finally:
        env.close()


def test_rear_ending_traffic_is_a_collision() -> None:
    cfg = CarlaConfig(difficulty=1.0, route_length_m=120.0, max_episode_steps=20)
    env, _, _ = fake_env(1, cfg)
    try:
        env.reset(seed=4)
        rush = torch.zeros(1, cfg.num_waypoints, 2)
        rush[..., 0] = 15.0 * cfg.waypoint_dt * torch.arange(1, cfg.num_waypoints + 1)  # 15 m/s, straight on
        for _ in range(cfg.max_episode_steps):
            result = env.step(rush)
            if result.terminated.any():
                break
        assert result.info.episode.collision.item() and result.terminated.item()
    finally:
        env.close()


def test_same_seed_same_first_observation() -> None:
    first, _, _ = fake_env(1)
    second, _, _ = fake_env(1)
    try:
        a, b = first.reset(seed=12), second.reset(seed=12)
        assert torch.equal(a.bev, b.bev) and torch.equal(a.state, b.state)
        assert torch.equal(first.ego_pose(), second.ego_pose())
        c = second.reset(seed=13)  # another start speed (and on a real map another spawn point)
        assert not torch.equal(first.reset(seed=12).state, c.state)
    finally:
        first.close()
        second.close()


def test_a_server_dying_mid_episode_is_one_error_and_everything_is_cleaned_up() -> None:
    env, clients, closed = fake_env(2)
    env.reset(seed=0)
    clients[1].world.fail_tick_after = clients[1].world.ticks + 2
    with pytest.raises(UserError, match=r"CARLA server at fake:2004 failed: time-out"):
        env.step(env.expert_waypoints())
    for client in clients:
        assert client.world.actors == {}
        assert client.log[-2:] == [("tm_sync", False), ("settings", False, None)]
    assert closed == [True]
    env.close()  # idempotent
    assert closed == [True]
    with pytest.raises(RuntimeError, match="closed"):
        env.reset(seed=0)


@pytest.mark.carla
def test_live_server_short_episode() -> None:
    """A few expert steps against a real server: ``CARLA_HOST`` (and optionally ``CARLA_PORT``)."""
    host = os.environ.get("CARLA_HOST")
    if not host:
        pytest.skip("CARLA_HOST is not set")
    from training.envs.options import EnvOptions
    from training.envs.registry import make_env

    port = int(os.environ.get("CARLA_PORT", "2000"))
    options = EnvOptions(carla_host=host, carla_port=port, carla_timeout=20.0, difficulty=0.2)
    env = make_env("carla", 1, "cpu", options=options)
    try:
        obs = env.reset(seed=0)
        assert obs.bev.shape == (1, 4, 64, 64) and obs.bev[0, 0].any()
        for _ in range(6):
            result = env.step(env.expert_waypoints())
        assert torch.isfinite(result.reward).all()
        assert result.info.speed_mps.item() > 0.5 or result.info.episode.done.item()
    finally:
        env.close()
    import carla

    client = carla.Client(host, port)
    client.set_timeout(20.0)
    world = client.get_world()
    assert not world.get_settings().synchronous_mode
    assert not [a for a in world.get_actors() if a.attributes.get("role_name") == "hero"]
