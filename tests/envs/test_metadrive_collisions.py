"""Who was moving into whom when MetaDrive flags a collision: box geometry and closing speeds (no
simulator), and, through the batched env, on a development seed where a turning truck drives into
the expert (MetaDrive)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from training.envs.metadrive.collisions import STANDING_MPS, box_gap, closed_by, closing_speeds

CAR = (4.5, 1.8)  # length, width


def box(x: float, y: float, heading_deg: float = 0.0) -> np.ndarray:
    return np.array([x, y, math.radians(heading_deg), *CAR])


def test_box_gap_is_zero_for_touching_boxes_and_the_distance_between_disjoint_ones() -> None:
    assert box_gap(box(0, 0), box(4.0, 0)) == 0.0  # overlapping by half a metre
    assert box_gap(box(0, 0), box(6.5, 0)) == pytest.approx(2.0)  # bumper to bumper
    assert box_gap(box(0, 0), box(0, 3.8)) == pytest.approx(2.0)  # side by side
    # a car across the ego's path, 5 m ahead of its front bumper: its side faces the bumper
    assert box_gap(box(0, 0), box(2.25 + 5 + 0.9, 0, 90)) == pytest.approx(5.0)
    # corner to corner, diagonally
    assert box_gap(box(0, 0), box(4.5 + 3, 1.8 + 4)) == pytest.approx(5.0)


def test_the_ego_running_into_a_slower_car_ahead_closed_the_gap() -> None:
    ego_closing, other_closing = closing_speeds(box(0, 0), 8.0, box(5, 0), 3.0)
    assert (ego_closing, other_closing) == pytest.approx((8.0, -3.0))
    assert closed_by(8.0, ego_closing, other_closing) == "ego"


def test_a_car_turning_into_the_side_of_a_slow_ego_closed_the_gap() -> None:
    # the other car comes from the ego's left front, heading back across it at 7 m/s
    ego_closing, other_closing = closing_speeds(box(0, 0), 1.5, box(3, 3, -135), 7.0)
    assert other_closing == pytest.approx(7.0) and ego_closing == pytest.approx(1.5 / math.sqrt(2))
    assert closed_by(1.5, ego_closing, other_closing) == "other"


def test_a_standing_ego_is_reported_as_standing_whatever_the_speeds() -> None:
    assert closed_by(STANDING_MPS / 2, 0.1, 0.0) == "ego standing"


@pytest.mark.skipif(
    importlib.util.find_spec("metadrive") is None, reason="the metadrive extra is not installed"
)
def test_the_env_reports_a_car_turning_into_the_expert_beside_it() -> None:
    from training.envs.metadrive import MetaDriveWaypointEnv

    # development seed 1e9 + 700085: in a roundabout a car in the lane to the expert's right turns
    # into it while beside it (docs/metadrive.md)
    seed = 1_000_700_085
    with MetaDriveWaypointEnv(1) as env:
        env.reset(seed=seed)
        assert env.collision_reports() == {}
        for _ in range(env.spec.max_episode_steps):
            episode = env.step(env.expert_waypoints()).info.episode
            if bool(episode.done[0]):
                break
        assert bool(episode.collision[0])
        report = env.collision_reports()[seed]
    assert report["other"] == "SVehicle" and report["closed_by"] == "other", report
    assert report["other_left_m"] < 0  # from the right
    assert report["gap_m"] < 0.5 and report["other_speed_mps"] > report["ego_speed_mps"]
