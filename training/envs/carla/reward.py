"""The per-step reward of the CARLA world, the toy world's terms plus lane invasions.

Route progress dominates (CaRL: simple rewards with infractions ending the episode scale
best); progress is measured along the route only, so circling earns nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.envs.carla.config import CarlaRewardWeights


@dataclass(frozen=True)
class StepOutcome:
    """What one policy step did, measured by the adapter (metres, m/s, radians)."""

    progress_m: float  # arc length gained along the route (negative when backing up)
    speed_mps: float
    target_speed_mps: float  # the route's curvature-limited speed at the ego
    lateral_m: float  # distance of the ego from the route centre line
    heading_error_rad: float
    plan_lateral_m: float  # mean distance of the plan's waypoints from the route centre line
    plan_speed_error_mps: float  # mean |planned speed - target speed| over the plan
    jerk_mps3: float  # mean |jerk| over the step's simulator ticks
    steer_rate_radps: float  # mean |steering rate| over the step's simulator ticks
    lane_invasions: int  # lane markings crossed (CARLA lane-invasion sensor)
    collision: bool
    off_road: bool


def step_reward(outcome: StepOutcome, weights: CarlaRewardWeights, road_speed_mps: float, dt: float) -> float:
    """The reward of one policy step of ``dt`` seconds; speeds are normalised by ``road_speed_mps``."""
    w, o = weights, outcome
    return (
        w.progress * o.progress_m / (road_speed_mps * dt)
        - w.speed * abs(o.speed_mps - o.target_speed_mps) / road_speed_mps
        - w.lateral * abs(o.lateral_m)
        - w.heading * abs(o.heading_error_rad)
        - w.plan_lateral * o.plan_lateral_m
        - w.plan_speed * o.plan_speed_error_mps / road_speed_mps
        - w.jerk * o.jerk_mps3
        - w.steer_rate * o.steer_rate_radps
        - w.lane_invasion * o.lane_invasions
        - w.collision * float(o.collision)
        - w.off_road * float(o.off_road)
    )
