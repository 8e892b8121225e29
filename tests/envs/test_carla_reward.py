"""CARLA route geometry, the expert's plan and the per-step reward."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from training.envs.carla.config import CarlaConfig, CarlaRewardWeights
from training.envs.carla.reward import StepOutcome, step_reward
from training.envs.carla.route import (
    RoutePosition,
    build_route,
    expert_plan,
    interpolate,
    plan_quality,
    project,
)
from training.envs.toy import RewardWeights

CFG = CarlaConfig()
STRAIGHT = build_route(np.stack([np.arange(0.0, 200.0), np.zeros(200)], axis=-1), CFG)


def quarter_circle(radius: float) -> np.ndarray:
    angles = np.linspace(0, math.pi / 2, int(radius * math.pi / 2) + 1)
    return np.stack([radius * np.sin(angles), radius * (1 - np.cos(angles))], axis=-1)


def test_projection_gives_arc_length_and_signed_offset() -> None:
    left = project(STRAIGHT, np.array([42.3, 1.5]))
    right = project(STRAIGHT, np.array([42.3, -0.7]))
    assert (left.s, left.d, left.heading) == pytest.approx((42.3, 1.5, 0.0))
    assert (right.s, right.d) == pytest.approx((42.3, -0.7))


def test_projection_window_keeps_a_looping_route_apart() -> None:
    """A route that comes back past its start: the window picks the pass the ego is on."""
    out = np.stack([np.arange(0.0, 50.0), np.zeros(50)], axis=-1)
    back = np.stack([np.arange(50.0, 0.0, -1.0), np.full(50, 4.0)], axis=-1)
    route = build_route(np.concatenate([out, back]), CFG)
    point = np.array([10.0, 1.5])
    assert project(route, point, (0.0, 40.0)).s == pytest.approx(10.0)
    late = project(route, point, (60.0, 120.0))
    assert late.s > 80.0 and late.d == pytest.approx(2.5)


def test_target_speed_slows_for_curves_and_brakes_ahead_of_them() -> None:
    straight_in = np.stack([np.arange(-60.0, 0.0), np.zeros(60)], axis=-1)
    route = build_route(np.concatenate([straight_in, quarter_circle(10.0)[1:]]), CFG)
    curve_speed = math.sqrt(CFG.max_lateral_accel * 10.0)
    in_curve = route.target_speed[(route.s > 65) & (route.s < 70)]
    assert in_curve == pytest.approx(curve_speed, rel=0.1)
    assert route.target_speed[0] == CFG.target_speed_mps
    allowed = np.sqrt(route.target_speed[1:] ** 2 + 2 * CFG.expert_decel * np.diff(route.s))
    assert (route.target_speed[:-1] <= allowed + 1e-9).all()


def test_expert_on_the_centre_line_drives_straight_at_the_target_speed() -> None:
    pose = np.array([10.0, 0.0, 0.0])
    plan = expert_plan(STRAIGHT, pose, CFG.target_speed_mps, project(STRAIGHT, pose[:2]), CFG)
    assert plan.shape == (CFG.num_waypoints, 2)
    assert plan[:, 1] == pytest.approx(0.0, abs=1e-9)
    assert np.diff(plan[:, 0], prepend=0.0) == pytest.approx(CFG.target_speed_mps * CFG.waypoint_dt)


def test_expert_recovers_towards_the_centre_line() -> None:
    pose = np.array([10.0, 1.2, 0.0])  # 1.2 m left of the centre line
    plan = expert_plan(STRAIGHT, pose, 6.0, project(STRAIGHT, pose[:2]), CFG)
    offsets = plan[:, 1] + 1.2  # world y of the waypoints
    assert (np.diff(offsets) < 0).all() and abs(offsets[-1]) < 0.2


def test_expert_stops_before_the_stop_point() -> None:
    pose = np.array([10.0, 0.0, 0.0])
    position = project(STRAIGHT, pose[:2])
    plan = expert_plan(STRAIGHT, pose, 8.0, position, CFG, stop_s=25.0)
    assert plan[:, 0].max() <= 15.0 + 1e-9
    assert np.diff(plan[:, 0])[-3:] == pytest.approx(0.0, abs=1e-6)  # stands still at the end


def test_expert_from_standstill_obeys_its_acceleration() -> None:
    pose = np.array([0.0, 0.0, 0.0])
    plan = expert_plan(STRAIGHT, pose, 0.0, RoutePosition(0.0, 0.0, 0.0), CFG)
    speeds = np.diff(plan[:, 0], prepend=0.0) / CFG.waypoint_dt
    assert np.diff(speeds, prepend=0.0).max() <= CFG.expert_accel * CFG.waypoint_dt + 1e-9


def test_plan_quality_measures_offset_and_speed_error() -> None:
    """Waypoints 0.5 m left of the centre line at 6 m/s on a road whose target is 8 m/s."""
    plan = np.stack([10.0 + 6.0 * CFG.waypoint_dt * np.arange(9), np.full(9, 0.5)], axis=-1)
    plan[0, 1] = 0.0  # the plan starts at the ego, on the centre line
    lateral, speed_error = plan_quality(STRAIGHT, plan, 10.0, CFG.waypoint_dt)
    assert lateral == pytest.approx(0.5)
    first = abs(math.hypot(3.0, 0.5) / CFG.waypoint_dt - 8.0)
    assert speed_error == pytest.approx((first + 7 * 2.0) / 8)


def test_interpolate_between_points() -> None:
    xy, heading = interpolate(STRAIGHT, np.array([12.25, 150.5]))
    assert xy == pytest.approx(np.array([[12.25, 0.0], [150.5, 0.0]]))
    assert heading == pytest.approx([0.0, 0.0])


GOOD = StepOutcome(
    progress_m=4.0,
    speed_mps=8.0,
    target_speed_mps=8.0,
    lateral_m=0.0,
    heading_error_rad=0.0,
    plan_lateral_m=0.0,
    plan_speed_error_mps=0.0,
    jerk_mps3=0.0,
    steer_rate_radps=0.0,
    lane_invasions=0,
    collision=False,
    off_road=False,
)


def test_reward_weights_are_the_toy_worlds_plus_lane_invasions() -> None:
    toy = dataclasses.asdict(RewardWeights())
    carla = dataclasses.asdict(CarlaRewardWeights())
    assert {k: carla[k] for k in toy} == toy and set(carla) - set(toy) == {"lane_invasion"}


def test_perfect_step_earns_the_progress_weight() -> None:
    assert step_reward(GOOD, CarlaRewardWeights(), 8.0, 0.5) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "change, penalty",
    [
        ({"speed_mps": 4.0}, 0.5 * 0.5),
        ({"lateral_m": -0.8}, 0.5 * 0.8),
        ({"heading_error_rad": -0.2}, 1.0 * 0.2),
        ({"plan_lateral_m": 0.3}, 1.0 * 0.3),
        ({"plan_speed_error_mps": 2.0}, 1.0 * 0.25),
        ({"jerk_mps3": 3.0}, 0.1 * 3.0),
        ({"steer_rate_radps": 0.2}, 1.5 * 0.2),
        ({"lane_invasions": 2}, 2.0),
        ({"collision": True}, 10.0),
        ({"off_road": True}, 10.0),
    ],
)
def test_each_term_costs_its_weight(change: dict[str, object], penalty: float) -> None:
    outcome = dataclasses.replace(GOOD, **change)
    assert step_reward(outcome, CarlaRewardWeights(), 8.0, 0.5) == pytest.approx(1.0 - penalty)


def test_backing_up_is_not_rewarded() -> None:
    backwards = dataclasses.replace(GOOD, progress_m=-2.0)
    assert step_reward(backwards, CarlaRewardWeights(), 8.0, 0.5) < 0
