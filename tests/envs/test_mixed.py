"""A weighted mix of environments behind one batched protocol, with per-environment metrics."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from training.common.errors import UserError
from training.envs.mixed import MixedEnv
from training.envs.registry import split_env_mix
from training.envs.toy import ToyWaypointEnv, ToyWorldConfig
from training.rl.episodes import EpisodeTally


def _toy(num_envs: int, difficulty: float = 0.5, **overrides) -> ToyWaypointEnv:
    return ToyWaypointEnv(ToyWorldConfig(num_envs=num_envs, difficulty=difficulty, **overrides))


@pytest.mark.parametrize(
    ("env", "weights", "num_envs", "expected"),
    [
        ("toy", None, 8, [("toy", 8)]),
        ("toy,metadrive", None, 8, [("toy", 4), ("metadrive", 4)]),
        ("toy,metadrive", "3,1", 8, [("toy", 6), ("metadrive", 2)]),
        ("toy,metadrive", "1,1", 3, [("toy", 2), ("metadrive", 1)]),
        ("toy,metadrive", "100,1", 4, [("toy", 3), ("metadrive", 1)]),  # each keeps at least one world
        ("toy, carla", "0.5,0.5", 2, [("toy", 1), ("carla", 1)]),
    ],
)
def test_worlds_are_shared_by_weight(env: str, weights: str | None, num_envs: int, expected) -> None:
    mix = split_env_mix(env, weights, num_envs)
    assert mix == expected
    assert sum(count for _, count in mix) == num_envs


@pytest.mark.parametrize(
    ("env", "weights", "num_envs", "message"),
    [
        ("toy,toy", None, 4, "twice"),
        ("toy,bogus", None, 4, "unknown --env"),
        ("toy,metadrive", "1", 4, "1 weights for 2"),
        ("toy,metadrive", "1,0", 4, "> 0"),
        ("toy,metadrive", "a,b", 4, "numbers"),
        ("toy,metadrive", "1e308,1e308", 4, "too large"),
        ("toy,metadrive", None, 1, "cannot give each"),
    ],
)
def test_malformed_mixes_are_one_line_errors(
    env: str, weights: str | None, num_envs: int, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        split_env_mix(env, weights, num_envs)


def test_the_mix_is_its_parts_side_by_side() -> None:
    """World i of the mix is exactly world i - start of its part, seeds included."""
    mixed = MixedEnv([("easy", _toy(2, 0.1)), ("hard", _toy(3, 0.9))])
    alone = [_toy(2, 0.1), _toy(3, 0.9)]
    obs = mixed.reset(seed=100)
    parts = [alone[0].reset(seed=100), alone[1].reset(seed=102)]
    assert mixed.num_envs == 5 and mixed.groups == {"easy": slice(0, 2), "hard": slice(2, 5)}
    assert torch.equal(obs.bev, torch.cat([p.bev for p in parts]))
    for _ in range(30):  # long enough for episodes to end and autoreset
        plan = mixed.expert_waypoints()
        result = mixed.step(plan)
        expected = [env.step(plan[group]) for env, group in zip(alone, mixed.groups.values(), strict=True)]
        assert torch.equal(result.reward, torch.cat([e.reward for e in expected]))
        assert torch.equal(result.obs.state, torch.cat([e.obs.state for e in expected]))
        assert torch.equal(
            result.info.episode.scenario_seed, torch.cat([e.info.episode.scenario_seed for e in expected])
        )
        assert torch.equal(
            result.info.expert_waypoints, torch.cat([e.info.expert_waypoints for e in expected])
        )


def test_state_round_trip_and_difficulty_reach_every_part() -> None:
    mixed = MixedEnv([("a", _toy(2)), ("b", _toy(2))])
    mixed.reset(seed=5)
    mixed.step(mixed.expert_waypoints())
    saved = mixed.state_dict()
    first = mixed.step(mixed.expert_waypoints())
    mixed.load_state_dict(saved)
    again = mixed.step(mixed.expert_waypoints())
    assert torch.equal(first.obs.bev, again.obs.bev) and torch.equal(first.reward, again.reward)
    mixed.set_difficulty(0.8)
    assert [env.difficulty for env in mixed.envs] == [0.8, 0.8]


def test_parts_with_other_shapes_cannot_mix() -> None:
    with pytest.raises(UserError, match="num_waypoints"):
        MixedEnv([("a", _toy(1)), ("b", _toy(1, num_waypoints=6))])


def test_the_tally_reports_each_environment_and_their_total() -> None:
    mixed = MixedEnv([("a", _toy(2, max_episode_steps=3)), ("b", _toy(3, max_episode_steps=5))])
    mixed.reset(seed=0)
    tally = EpisodeTally.zeros(mixed.device, mixed.num_envs, mixed.groups)
    for _ in range(5):
        tally.add(mixed.step(mixed.expert_waypoints()))
    means = tally.means()
    assert means["a/episodes"] == 2 and means["b/episodes"] == 3  # a: one truncation each, b: at step 5
    assert means["episodes"] == 5
    assert means["route_completion"] == pytest.approx(
        (2 * means["a/route_completion"] + 3 * means["b/route_completion"]) / 5
    )
    assert dataclasses.is_dataclass(tally)
