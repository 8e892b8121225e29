"""Waypoints to pedals and steering: pure pursuit for steering, a PID on speed for the pedals.

It runs at the simulator's rate between policy steps, like the toy world's controller: the plan
(origin at the pose where it was made, then K waypoints ``waypoint_dt`` apart, world frame) gives
the path for pure pursuit and, through its spacing, the speed set-point. The output is a plain
``PedalCommand``; ``session.py`` turns it into ``carla.VehicleControl`` (whose steer is
normalised and positive to the *right*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from training.envs.carla.config import ControllerGains
from training.envs.carla.raster import world_to_ego

FloatArray = np.ndarray


@dataclass(frozen=True)
class PedalCommand:
    """Throttle and brake in [0, 1]; steering angle of the front wheels in rad, left > 0."""

    throttle: float
    brake: float
    steer_rad: float


class PID:
    """A PID controller with a clamped integral (anti-windup)."""

    def __init__(self, kp: float, ki: float, kd: float, integral_limit: float) -> None:
        self.kp, self.ki, self.kd = kp, ki, kd
        self.integral_limit = integral_limit
        self.reset()

    def reset(self) -> None:
        self.integral = 0.0
        self.previous_error: float | None = None

    def __call__(self, error: float, dt: float) -> float:
        self.integral = min(max(self.integral + error * dt, -self.integral_limit), self.integral_limit)
        derivative = 0.0 if self.previous_error is None else (error - self.previous_error) / dt
        self.previous_error = error
        return self.kp * error + self.ki * self.integral + self.kd * derivative


def plan_speeds(plan_world: FloatArray, waypoint_dt: float) -> FloatArray:
    """Mean speeds ``[K]`` (m/s) over a plan's intervals (origin first, then K waypoints)."""
    return np.linalg.norm(np.diff(plan_world, axis=0), axis=-1) / waypoint_dt


def speed_setpoint(speeds: FloatArray, time_in_plan_s: float, waypoint_dt: float) -> float:
    """The plan's speed at ``time_in_plan_s``, linear between interval midpoints."""
    t = time_in_plan_s / waypoint_dt - 0.5
    i0 = min(max(int(math.floor(t)), 0), len(speeds) - 1)
    i1 = min(i0 + 1, len(speeds) - 1)
    frac = min(max(t - i0, 0.0), 1.0)
    return float(speeds[i0] * (1 - frac) + speeds[i1] * frac)


def pursuit_target(plan_world: FloatArray, position: FloatArray, lookahead_m: float) -> FloatArray:
    """The farthest point of the plan's polyline at ``lookahead_m`` from ``position``; the plan's
    last point when all of it lies closer."""
    start, seg = plan_world[:-1], np.diff(plan_world, axis=0)
    rel = start - position
    a = np.maximum((seg * seg).sum(-1), 1e-9)
    b = (seg * rel).sum(-1)
    c = (rel * rel).sum(-1) - lookahead_m**2
    disc = b * b - a * c
    t = (-b + np.sqrt(np.maximum(disc, 0.0))) / a
    valid = np.flatnonzero((disc >= 0) & (t >= 0) & (t <= 1))
    if len(valid) == 0:
        return plan_world[-1]
    last = valid[-1]
    return start[last] + t[last] * seg[last]


def pure_pursuit_steer(
    plan_world: FloatArray, pose: FloatArray, speed_mps: float, wheelbase_m: float, gains: ControllerGains
) -> float:
    """Steering angle (rad, left > 0) that arcs the rear axle at ``pose`` through the pursuit target."""
    lookahead = max(gains.min_lookahead_m, gains.lookahead_time_s * speed_mps)
    target = pursuit_target(plan_world, np.asarray(pose[:2]), lookahead)
    local = world_to_ego(target, np.asarray(pose))
    dist2 = float((local**2).sum())
    if dist2 <= 0.25:  # the target is under the car: keep straight rather than spin
        return 0.0
    return math.atan(wheelbase_m * 2.0 * float(local[1]) / dist2)


class WaypointController:
    """Tracks one plan between policy steps; ``reset`` at every new episode."""

    def __init__(self, gains: ControllerGains, wheelbase_m: float, max_steer_rad: float) -> None:
        self.gains = gains
        self.wheelbase_m = wheelbase_m
        self.max_steer_rad = max_steer_rad
        self.speed_pid = PID(gains.speed_kp, gains.speed_ki, gains.speed_kd, gains.integral_limit)

    def reset(self) -> None:
        self.speed_pid.reset()

    def command(
        self,
        plan_world: FloatArray,
        pose: FloatArray,
        speed_mps: float,
        time_in_plan_s: float,
        waypoint_dt: float,
        dt: float,
    ) -> PedalCommand:
        """Pedals and steering for the next ``dt`` seconds.

        Args:
            plan_world: ``[K + 1, 2]`` the plan's origin then its waypoints, world frame (m).
            pose: rear axle ``x, y, yaw`` now, world frame.
            speed_mps: current speed.
            time_in_plan_s: seconds since the plan was made.
        """
        gains = self.gains
        steer = pure_pursuit_steer(plan_world, pose, speed_mps, self.wheelbase_m, gains)
        steer = min(max(steer, -self.max_steer_rad), self.max_steer_rad)
        speeds = plan_speeds(plan_world, waypoint_dt)
        setpoint = speed_setpoint(speeds, time_in_plan_s + gains.speed_lead_time_s, waypoint_dt)
        if setpoint < gains.stop_speed_mps:
            self.speed_pid.reset()
            return PedalCommand(throttle=0.0, brake=gains.max_brake, steer_rad=steer)
        push = self.speed_pid(setpoint - speed_mps, dt)
        throttle = min(max(push, 0.0), gains.max_throttle)
        brake = min(max(-push, 0.0), gains.max_brake)
        return PedalCommand(throttle=throttle, brake=brake, steer_rad=steer)
