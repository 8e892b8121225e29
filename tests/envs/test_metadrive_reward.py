"""The MetaDrive world's reward, term by term, on recorded drives: a fixed scenario seed is driven
with recorded plans once per reward term (that term's weight 1, every other 0), and each term's
reward is checked against what the simulator and the episode report independently (distance
travelled along the route, distance from the centre line, the episode's mean jerk and steering
rate, its off-road flag). The default reward must then be the weighted sum of the terms.

MetaDrive replays a seed and a list of plans to the same frames up to its float32 physics (checked
below: rewards agree to about 1e-8), so sums over replays are compared to ``REPLAY_RTOL``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip(
    "metadrive", reason="the metadrive extra is not installed (pip install -e '.[metadrive]')"
)

from training.envs.metadrive.config import MetaDriveWorldConfig
from training.envs.metadrive.world import MetaDriveWorld
from training.envs.toy.config import RewardWeights

SEED = 10
STEPS = 4
REPLAY_RTOL = 1e-6
TERMS = tuple(field.name for field in dataclasses.fields(RewardWeights))


@dataclasses.dataclass
class Drive:
    """What one replay of the recorded plans produced, step by step."""

    rewards: list[float]
    progress_m: list[float]
    lateral_m: list[float]
    terminated: list[bool]
    episode: dict


@pytest.fixture(scope="module")
def world() -> MetaDriveWorld:
    world = MetaDriveWorld(MetaDriveWorldConfig(difficulty=0.0, max_episode_steps=STEPS))
    yield world
    world.close()


def _swerving(expert: np.ndarray, step: int) -> np.ndarray:
    """The expert's plan pushed sideways, alternating sides: every shaping term is then non-zero."""
    index = np.arange(1, len(expert) + 1, dtype=np.float32)
    return expert + np.stack([np.zeros_like(index), (-1) ** step * 0.15 * index], -1)


def _drive(world: MetaDriveWorld, weights: RewardWeights, plans: list[np.ndarray]) -> Drive:
    world.config = dataclasses.replace(world.config, reward=weights)
    world.reset(SEED)
    drive = Drive([], [], [], [], {})
    for plan in plans:
        before = world.navigation.travelled_length
        outcome = world.step(plan)
        drive.rewards.append(outcome.reward)
        drive.progress_m.append(world.navigation.travelled_length - before)
        drive.lateral_m.append(outcome.frame.lateral_m)
        drive.terminated.append(outcome.terminated)
        drive.episode = outcome.episode
        if outcome.terminated or outcome.truncated:
            break
    return drive


def _only(term: str) -> RewardWeights:
    return RewardWeights(**{name: float(name == term) for name in TERMS})


@pytest.fixture(scope="module")
def recorded_plans(world: MetaDriveWorld) -> list[np.ndarray]:
    """Swerving plans recorded from one drive of the scenario (each built on that moment's expert)."""
    frame = world.reset(SEED)
    plans = []
    for step in range(STEPS):
        plans.append(_swerving(frame.expert, step))
        frame = world.step(plans[-1]).frame
    return plans


@pytest.fixture(scope="module")
def terms(world: MetaDriveWorld, recorded_plans: list[np.ndarray]) -> dict[str, Drive]:
    return {term: _drive(world, _only(term), recorded_plans) for term in TERMS}


def test_replaying_the_recorded_plans_drives_the_same_frames(world, recorded_plans) -> None:
    first = _drive(world, RewardWeights(), recorded_plans)
    again = _drive(world, RewardWeights(), recorded_plans)
    np.testing.assert_allclose(again.rewards, first.rewards, rtol=REPLAY_RTOL)
    np.testing.assert_allclose(again.progress_m, first.progress_m, rtol=REPLAY_RTOL)
    assert len(first.rewards) == STEPS and not any(first.terminated)


def test_progress_is_route_distance_over_what_the_road_speed_covers_in_a_step(world, terms) -> None:
    g = world.geometry
    drive = terms["progress"]
    assert min(drive.progress_m) > 0.1, "the recorded drive moves along the route"
    expected = np.array(drive.progress_m) / (g.road_speed_mps * g.policy_dt)
    np.testing.assert_allclose(drive.rewards, expected, rtol=1e-9)


def test_lateral_costs_the_body_centres_distance_from_the_centre_line(terms) -> None:
    drive = terms["lateral"]
    assert max(np.abs(drive.lateral_m)) > 0.05, "the swerving plans leave the centre line"
    np.testing.assert_allclose(drive.rewards, -np.abs(drive.lateral_m), rtol=1e-9)


@pytest.mark.parametrize("term, metric", [("jerk", "mean_abs_jerk"), ("steer_rate", "mean_abs_steer_rate")])
def test_comfort_terms_cost_each_steps_mean_over_its_simulator_ticks(terms, term, metric) -> None:
    """Every step drove the same number of ticks, so the steps' means average to the episode's."""
    drive = terms[term]
    assert drive.episode[metric] > 1e-3
    assert all(reward <= 0 for reward in drive.rewards)
    assert -np.mean(drive.rewards) == pytest.approx(drive.episode[metric], rel=1e-9)


@pytest.mark.parametrize("term", ["speed", "heading", "plan_lateral", "plan_speed"])
def test_shaping_terms_are_costs_the_swerving_drive_pays(terms, term) -> None:
    rewards = np.array(terms[term].rewards)
    assert (rewards <= 0).all() and rewards.min() < -1e-3


def test_the_default_reward_is_the_weighted_sum_of_its_terms(world, recorded_plans, terms) -> None:
    weights = RewardWeights()
    total = _drive(world, weights, recorded_plans)
    expected = sum(getattr(weights, term) * np.array(terms[term].rewards) for term in TERMS)
    np.testing.assert_allclose(total.rewards, expected, rtol=REPLAY_RTOL)
    assert total.episode["episode_return"] == pytest.approx(sum(total.rewards))


def test_leaving_the_road_costs_the_off_road_weight_once_and_ends_the_episode(world) -> None:
    world.config = dataclasses.replace(world.config, max_episode_steps=12)
    try:
        world.reset(SEED)
        hard_left = np.stack([np.arange(1, 9) * 2.0, np.arange(1, 9) * 3.0], -1).astype(np.float32)
        plans = [hard_left] * world.config.max_episode_steps
        drive = _drive(world, _only("off_road"), plans)
    finally:
        world.config = dataclasses.replace(world.config, max_episode_steps=STEPS)
    assert drive.terminated[-1] and drive.episode["off_road"] and not drive.episode["collision"]
    assert drive.rewards == [0.0] * (len(drive.rewards) - 1) + [-1.0]
