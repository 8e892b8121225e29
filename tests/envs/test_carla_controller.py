"""The CARLA waypoint controller: PID behaviour, pure-pursuit signs, closed loop on a kinematic car."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.envs.carla.config import ControllerGains
from training.envs.carla.controller import (
    PID,
    WaypointController,
    pure_pursuit_steer,
    pursuit_target,
    speed_setpoint,
)
from training.envs.carla.raster import ego_to_world

GAINS = ControllerGains()
WHEELBASE, MAX_STEER = 2.9, 0.5
WAYPOINT_DT, DT = 0.5, 0.1


def straight_plan(speed: float, lateral: float = 0.0, k: int = 8) -> np.ndarray:
    """Origin then K waypoints ``WAYPOINT_DT`` apart at ``speed``, ending ``lateral`` metres left."""
    x = speed * WAYPOINT_DT * np.arange(k + 1)
    y = np.concatenate([[0.0], np.full(k, lateral)])
    return np.stack([x, y], axis=-1)


def test_pid_terms_and_anti_windup() -> None:
    pid = PID(kp=2.0, ki=1.0, kd=0.5, integral_limit=0.3)
    assert pid(1.0, 0.1) == pytest.approx(2.0 + 0.1)  # no derivative on the first call
    assert pid(1.0, 0.1) == pytest.approx(2.0 + 0.2)
    for _ in range(50):
        out = pid(1.0, 0.1)
    assert out == pytest.approx(2.0 + 0.3)  # integral clamped
    assert pid(0.0, 0.1) == pytest.approx(0.3 - 0.5 * 10.0)  # derivative of a 1 -> 0 step
    pid.reset()
    assert pid(0.0, 0.1) == 0.0


def test_speed_setpoint_reads_the_plan_spacing() -> None:
    speeds = np.array([2.0, 4.0, 6.0])
    assert speed_setpoint(speeds, 0.0, 0.5) == 2.0  # before the first midpoint
    assert speed_setpoint(speeds, 0.5, 0.5) == pytest.approx(3.0)  # between midpoints 0.25 and 0.75
    assert speed_setpoint(speeds, 10.0, 0.5) == 6.0


def test_pursuit_target_is_on_the_lookahead_circle() -> None:
    plan = straight_plan(8.0)
    target = pursuit_target(plan, np.zeros(2), 5.0)
    assert target == pytest.approx([5.0, 0.0])
    assert pursuit_target(plan, np.zeros(2), 100.0) == pytest.approx(plan[-1])


@pytest.mark.parametrize("lateral, sign", [(2.0, 1), (-2.0, -1), (0.0, 0)])
def test_steering_turns_towards_the_plan(lateral: float, sign: int) -> None:
    plan = straight_plan(6.0, lateral)
    steer = pure_pursuit_steer(plan, np.zeros(3), 6.0, WHEELBASE, GAINS)
    assert np.sign(round(steer, 9)) == sign


def test_pedals_saturate_and_a_stop_plan_holds_the_brake() -> None:
    controller = WaypointController(GAINS, WHEELBASE, MAX_STEER)
    fast = controller.command(straight_plan(30.0), np.zeros(3), 0.0, 0.0, WAYPOINT_DT, DT)
    assert fast.throttle == GAINS.max_throttle and fast.brake == 0.0
    controller.reset()
    slow = controller.command(straight_plan(2.0), np.zeros(3), 15.0, 0.0, WAYPOINT_DT, DT)
    assert slow.throttle == 0.0 and slow.brake > 0.5
    stop = controller.command(straight_plan(0.0), np.zeros(3), 3.0, 0.0, WAYPOINT_DT, DT)
    assert (stop.throttle, stop.brake) == (0.0, GAINS.max_brake)
    sharp = controller.command(straight_plan(3.0, -30.0), np.zeros(3), 3.0, 0.0, WAYPOINT_DT, DT)
    assert sharp.steer_rad == -MAX_STEER


def simulate(plan_ego: np.ndarray, seconds: float, start_speed: float) -> tuple[np.ndarray, float]:
    """Drive a kinematic bicycle (throttle 4 m/s^2, brake 8 m/s^2) along a plan re-anchored to
    the car's pose every policy step, as the environment does; returns the final pose and speed."""
    controller = WaypointController(GAINS, WHEELBASE, MAX_STEER)
    pose, speed = np.zeros(3), start_speed
    for step in range(int(seconds / DT)):
        if step % round(WAYPOINT_DT / DT) == 0:
            plan_world, time_in_plan = ego_to_world(plan_ego, pose), 0.0
        command = controller.command(plan_world, pose, speed, time_in_plan, WAYPOINT_DT, DT)
        speed = max(speed + (4.0 * command.throttle - 8.0 * command.brake) * DT, 0.0)
        yaw_rate = speed * math.tan(command.steer_rad) / WHEELBASE
        pose = pose + DT * np.array([speed * math.cos(pose[2]), speed * math.sin(pose[2]), yaw_rate])
        time_in_plan += DT
    return pose, speed


def test_closed_loop_reaches_the_planned_speed() -> None:
    _, speed = simulate(straight_plan(7.0), seconds=12.0, start_speed=0.0)
    assert speed == pytest.approx(7.0, abs=0.3)
    _, speed = simulate(straight_plan(3.0), seconds=12.0, start_speed=9.0)
    assert speed == pytest.approx(3.0, abs=0.3)


def test_closed_loop_follows_a_circle() -> None:
    """A plan along a circle of radius 20 m: the car keeps turning left at about that radius
    (a little inside it: pure pursuit aims at the chords between waypoints 2.5 m apart)."""
    radius, speed = 20.0, 5.0
    angles = speed * WAYPOINT_DT * np.arange(9) / radius
    plan = np.stack([radius * np.sin(angles), radius * (1 - np.cos(angles))], axis=-1)
    pose, final_speed = simulate(plan, seconds=8.0, start_speed=speed)
    distance_from_centre = math.hypot(pose[0], pose[1] - radius)
    assert radius - 2.5 < distance_from_centre < radius + 0.5
    assert pose[2] == pytest.approx(speed * 8.0 / radius, abs=0.3)  # heading turned by the arc
    assert final_speed == pytest.approx(speed, abs=0.5)
