"""The MetaDrive adapter: a short episode through the batched protocol, the scenario-seed
contract, the BEV layout, offline start without MetaDrive's asset archive, one-line errors for a
bad ``--sim-workers``, a config that renders without assets and a worker that dies."""

from __future__ import annotations

import os
import signal

import pytest
import torch

pytest.importorskip(
    "metadrive", reason="the metadrive extra is not installed (pip install -e '.[metadrive]')"
)

from training.common.errors import UserError
from training.envs.metadrive import MetaDriveWaypointEnv, MetaDriveWorldConfig
from training.envs.metadrive.headless import assets_installed, check_assets
from training.envs.options import EnvOptions
from training.envs.registry import make_env
from training.envs.toy import ToyWaypointEnv, ToyWorldConfig

EPISODE_STEPS = 4
SEED = 10


@pytest.fixture(scope="module")
def env() -> MetaDriveWaypointEnv:
    """Two worlds with 4-step episodes (worker start-up dominates: a few seconds per world)."""
    config = MetaDriveWorldConfig(difficulty=0.0, max_episode_steps=EPISODE_STEPS)
    with MetaDriveWaypointEnv(2, "cpu", config) as batched:
        yield batched


def test_spec_matches_the_toy_world(env: MetaDriveWaypointEnv) -> None:
    toy = ToyWaypointEnv(ToyWorldConfig(num_envs=1)).spec
    for name in ("bev_shape", "state_dim", "num_waypoints", "waypoint_dt", "policy_dt", "bev_channels"):
        assert getattr(env.spec, name) == getattr(toy, name), name
    assert env.spec.state_names == toy.state_names


def test_episode_runs_through_the_protocol(env: MetaDriveWaypointEnv) -> None:
    obs = env.reset(seed=SEED)
    assert obs.bev.shape == (2, 4, 64, 64) and obs.bev.dtype == torch.uint8
    assert obs.state.shape == (2, 5) and obs.state.dtype == torch.float32
    # the ego stands on a lane: its own pixel is drivable, the route runs ahead of it
    assert (obs.bev[:, 0, 58, 31:33] == 255).all()
    assert (obs.bev[:, 1, :58, 28:36] > 0).any(dim=-1).any(dim=-1).all()
    assert (obs.bev[:, 0] > 0).float().mean() > 0.1
    expert = env.expert_waypoints()
    assert expert.shape == (2, 8, 2)
    assert (expert[:, 1:, 0] >= expert[:, :-1, 0]).all(), "the expert plans forward along the lane"
    assert expert[:, -1, 0].min() > 5.0 and expert[:, :, 1].abs().max() < 3.0

    for step in range(1, EPISODE_STEPS + 1):
        obs, reward, terminated, truncated, info = env.step(env.expert_waypoints())
        assert torch.isfinite(reward).all() and torch.isfinite(obs.state).all()
        assert not terminated.any(), "the expert neither crashes nor leaves the road in 2 s"
        assert bool(truncated.all()) == (step == EPISODE_STEPS)
    episode = info.episode
    assert episode.done.all() and (episode.length == EPISODE_STEPS).all()
    assert episode.scenario_seed.tolist() == [SEED, SEED + 1]
    assert ((episode.route_completion > 0) & (episode.route_completion < 1)).all()
    assert not (episode.collision | episode.off_road | episode.goal_reached).any()
    assert (info.speed_mps > 1.0).all() and (info.lateral_deviation_m.abs() < 1.0).all()
    # autoreset: the returned observation starts the next scenarios (seeds SEED + 2, SEED + 3)
    assert env.scenario_seed.tolist() == [SEED + 2, SEED + 3]
    assert not torch.equal(obs.state, info.final_observation.state)
    assert info.final_observation.state[:, 0].min() > 1.0, "the finished episodes were moving"
    assert info.ego_pose.shape == (2, 3)


def test_same_seed_same_scenario(env: MetaDriveWaypointEnv) -> None:
    first = env.reset(seed=SEED + 1)
    again = env.reset(seed=SEED)
    assert torch.equal(first.bev[0], again.bev[1]) and torch.equal(first.state[0], again.state[1])


def test_too_few_sim_workers_is_refused_before_starting() -> None:
    with pytest.raises(UserError, match="one world per worker process"):
        make_env("metadrive", 3, "cpu", options=EnvOptions(sim_workers=2))


def test_rendering_without_assets_is_one_clear_error() -> None:
    check_assets({"use_render": False, "image_observation": False})  # headless never needs them
    if assets_installed():
        check_assets({"use_render": True})
        return
    with pytest.raises(UserError, match=r"metadrive\.pull_asset") as error:
        check_assets({"image_observation": True})
    assert "\n" not in str(error.value)


def test_a_dead_worker_is_one_clear_error_and_close_stops_the_rest() -> None:
    batched = MetaDriveWaypointEnv(1, "cpu", MetaDriveWorldConfig(difficulty=0.0, max_episode_steps=2))
    try:
        batched.reset(seed=0)
        pid = batched.worker_pids()[0]  # world 0 (the spare comes last)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(UserError, match=r"MetaDrive worker 0 died \(exit code -9\)") as error:
            batched.step(batched.expert_waypoints())
        assert "\n" not in str(error.value)
    finally:
        batched.close()
    assert batched.worker_pids() == []
    batched.close()  # idempotent


def test_a_world_stepping_apart_whose_worker_dies_is_one_clear_error() -> None:
    config = MetaDriveWorldConfig(difficulty=0.0, max_episode_steps=2)
    with MetaDriveWaypointEnv(2, "cpu", config, asynchronous=True) as batched:
        batched.reset(seed=0)
        os.kill(batched.worker_pids()[1], signal.SIGKILL)
        plan = batched.expert_waypoints()[[1]]
        with pytest.raises(UserError, match=r"MetaDrive worker 1 died \(exit code -9\)") as error:
            batched.send([1], plan)  # raises here if the worker is already gone, else in recv()
            batched.recv()
        assert "\n" not in str(error.value)


def test_closing_keeps_no_entry_per_possible_seed() -> None:
    """MetaDrive's own ``clear_stored_maps`` (called on close) refills one dict entry per possible
    seed: 2^32 here, tens of GB. The adapter's map manager clears without refilling."""
    from metadrive.manager.pg_map_manager import PGMapManager

    from training.envs.metadrive.headless import HeadlessMetaDriveEnv, _OpenSeedMapManager

    assert _OpenSeedMapManager.clear_stored_maps is not PGMapManager.clear_stored_maps
    env = HeadlessMetaDriveEnv(MetaDriveWorldConfig(difficulty=0.0).metadrive_config())
    try:
        env.reset(seed=SEED)
        env.engine.map_manager.clear_stored_maps()
        assert len(env.engine.map_manager.maps) == 0
    finally:
        env.close()


def _play_with_a_swerving_world(spare_world: bool, steps: int) -> tuple[list[tuple], list[int], list[int]]:
    """World 0 follows its expert; world 1 plans a hard left and leaves the road early, so worlds
    finish both apart and (at the time limit) together."""
    config = MetaDriveWorldConfig(difficulty=0.0, max_episode_steps=6)
    swerve = torch.tensor([[1.0 * (k + 1), 2.0 * (k + 1)] for k in range(8)])
    with MetaDriveWaypointEnv(2, "cpu", config, spare_world=spare_world) as batched:
        batched.reset(seed=SEED)
        pids_at_start = batched.worker_pids()
        trace = []
        for _ in range(steps):
            plans = batched.expert_waypoints().clone()
            plans[1] = swerve
            obs, reward, terminated, truncated, _info = batched.step(plans)
            done = (terminated | truncated).tolist()
            trace.append((obs.bev, obs.state, reward, done, batched.scenario_seed.tolist()))
        return trace, pids_at_start, batched.worker_pids()


def test_the_spare_world_changes_no_batch() -> None:
    """With a spare worker preparing the next scenario, every observation, reward, end and seed is
    the one the worlds give when they reset in place."""
    with_spare, start, end = _play_with_a_swerving_world(True, 14)
    in_place, _, _ = _play_with_a_swerving_world(False, 14)
    ends = [done for _, _, _, done, _ in in_place]
    assert [True, False] in ends or [False, True] in ends, "a world finished alone"
    assert [True, True] in ends, "both worlds finished in one step"
    assert len(start) == 3 and sorted(start) == sorted(end) and start != end, "the spare took a world"
    for (bev, state, reward, done, seeds), (bev0, state0, reward0, done0, seeds0) in zip(
        with_spare, in_place, strict=True
    ):
        assert torch.equal(bev, bev0) and torch.equal(state, state0) and torch.equal(reward, reward0)
        assert done == done0 and seeds == seeds0


def _per_world(trace: list[tuple[int, tuple]]) -> dict[int, list[tuple]]:
    worlds: dict[int, list[tuple]] = {0: [], 1: []}
    for world, row in trace:
        worlds[world].append(row)
    return worlds


def _swerving_plans(batched: MetaDriveWaypointEnv, worlds: list[int]) -> torch.Tensor:
    swerve = torch.tensor([[1.0 * (k + 1), 2.0 * (k + 1)] for k in range(8)])
    plans = batched.expert_waypoints()[worlds].clone()
    plans[[i for i, w in enumerate(worlds) if w == 1]] = swerve
    return plans


def _rows(result, row: int) -> tuple:
    episode = result.info.episode
    done = bool(episode.done[row])
    return (
        result.obs.bev[row],
        result.obs.state[row],
        float(result.reward[row]),
        done,
        int(episode.scenario_seed[row]) if done else None,
    )


def test_worlds_stepping_apart_play_their_own_seeds_whatever_the_order() -> None:
    """World 1 leaves the road early, world 0 follows its expert. Stepped together, or one world
    running many steps ahead of the other: each world's observations, rewards and ends are the
    same, and world ``i`` plays seeds ``SEED + i``, ``SEED + i + 2``, ..."""
    config = MetaDriveWorldConfig(difficulty=0.0, max_episode_steps=6)
    steps = 13
    with MetaDriveWaypointEnv(2, "cpu", config, asynchronous=True) as batched:
        assert len(batched.worker_pids()) == 2, "no spare worker"
        batched.reset(seed=SEED)
        together = []
        for _ in range(steps):
            result = batched.step(_swerving_plans(batched, [0, 1]))
            together += [(world, _rows(result, world)) for world in (0, 1)]
        batched.reset(seed=SEED)
        apart = []
        for world in [0] * steps + [1] * steps:  # world 0 all its steps first, then world 1
            batched.send([world], _swerving_plans(batched, [world]))
            stepped = batched.recv()
            assert stepped.worlds == [world]
            apart.append((world, _rows(stepped.result, 0)))
        with pytest.raises(RuntimeError, match="no world stepping"):
            batched.recv()
        batched.send([0], _swerving_plans(batched, [0]))
        with pytest.raises(RuntimeError, match="sent twice"):
            batched.send([0], _swerving_plans(batched, [0]))
        with pytest.raises(RuntimeError, match="still stepping"):
            batched.reset(seed=SEED)
        batched.recv()
    together, apart = _per_world(together), _per_world(apart)
    for world in (0, 1):
        ended = [row[4] for row in together[world] if row[3]]
        assert ended == [SEED + world + 2 * k for k in range(len(ended))] and len(ended) >= 2
        for (bev, state, reward, done, seed), (bev0, state0, reward0, done0, seed0) in zip(
            apart[world], together[world], strict=True
        ):
            assert torch.equal(bev, bev0) and torch.equal(state, state0)
            assert (reward, done, seed) == (reward0, done0, seed0)
